"""Ray job entry points: `ray job submit --working-dir . -- python -m jobs.<name> --config ...`."""
