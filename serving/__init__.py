"""Ray Serve batch-identification application."""
