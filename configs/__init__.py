"""Run configurations (`get_config(arg)` per file)."""
