"""Configs under configs/ve (package so they import as `configs.ve.<name>`)."""
