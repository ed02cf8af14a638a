"""Benchmarks of the control plane against a real RabbitMQ broker and Docker engine.

``python -m bench.lifecycle`` runs the lifecycle benchmark; see bench/README.md.
"""
