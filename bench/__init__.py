"""Benchmarks: the gateway against direct access, nginx and configurable-http-proxy, side by side (issue 6)."""
