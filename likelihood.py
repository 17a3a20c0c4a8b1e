"""likelihood: not built yet."""
