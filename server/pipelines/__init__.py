"""Pipelines: models that wrap other models with pre- and post-processing (detection)."""
