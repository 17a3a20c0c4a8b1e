"""Configs of ``--mode tables`` (package so they import as `configs.tables.<name>`)."""
