"""Routing: which READY worker serves a request (pool.py: per-model slots, least outstanding first, a bounded
queue in arrival order).

Owns in-flight counts and queues; the fleet tells it when workers come and go, through the daemon's wiring.
Imports nothing of the supervisor.
"""
