"""sampling: not built yet."""
