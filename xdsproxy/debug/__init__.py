"""Observability: Prometheus metrics (and, later, the debug HTTP endpoint)."""
