"""Configs under configs/subvp (package so they import as `configs.subvp.<name>`)."""
