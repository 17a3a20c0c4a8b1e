"""Configs under configs/ve/ncsn (package so they import as `configs.ve.ncsn.<name>`)."""
