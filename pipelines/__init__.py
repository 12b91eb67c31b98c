"""Pipelines of querycache's build pipeline."""
