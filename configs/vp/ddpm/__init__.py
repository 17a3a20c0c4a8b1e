"""Configs under configs/vp/ddpm (package so they import as `configs.vp.ddpm.<name>`)."""
