"""The supervisor side of mpsd (the daemon): never imports torch, mlx or the worker backends.

Subpackages by what they own, each importing only those below it:

    daemon.py, listeners.py, demo_build.py   wiring: builds the parts, binds the edge, drains on a signal
    edge/        what clients and operators speak to: gRPC, HTTP (OpenAI, /metrics, status page), admin, access
    fleet/       every worker's lifecycle: records, processes, exits, backoff, health, operator commands, demand
    memory/      probes, footprints, admission and the demand policy: pure decisions over plain numbers
    routing/     which READY worker serves a request: per-model pools of slots and a bounded queue

memory/ and routing/ import neither each other nor anything above; fleet/ imports memory/; edge/ imports
fleet/, memory/ and routing/; only the wiring imports edge/. tests/unit/test_layers.py holds this.
"""
