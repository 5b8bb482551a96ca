"""Health, readiness, Prometheus metrics and structured logs of a running node."""
