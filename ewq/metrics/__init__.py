"""Metrics, each written once against backends.base.Backend."""
