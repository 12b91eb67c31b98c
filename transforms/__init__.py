"""Transforms of querycache's build pipeline."""
