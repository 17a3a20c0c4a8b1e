"""Configs under configs/vp (package so they import as `configs.vp.<name>`)."""
