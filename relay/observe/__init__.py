"""What operators watch: structured JSON logs, Prometheus metrics, the health endpoints, and
the supervisor's merged metrics.

May import config, store, message and errors.
"""
