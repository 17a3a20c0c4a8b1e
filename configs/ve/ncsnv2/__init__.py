"""Configs under configs/ve/ncsnv2 (package so they import as `configs.ve.ncsnv2.<name>`)."""
