"""Ray entrypoints, each a function taking a config and runnable as `python -m jobs.<name>` on a cluster."""
