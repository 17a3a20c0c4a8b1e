"""run_lib: not built yet."""
