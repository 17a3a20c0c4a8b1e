"""ml_collections configs. Each module has ``get_config()``; ``default_*_configs`` hold the shared
defaults.
"""
