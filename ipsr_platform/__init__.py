"""The platform layer: configuration, storage, tracking, cluster connection and the `ipsr` CLI.

Named `ipsr_platform` because a top-level `platform` package would shadow Python's standard library.
"""
