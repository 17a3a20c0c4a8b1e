"""losses: not built yet."""
