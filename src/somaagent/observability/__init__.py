"""Observability: request ids, structured JSON logs, Prometheus metrics, the HTTP edge middleware.

Owns: how the process reports on itself. May import: core. Never: a domain package.
"""
