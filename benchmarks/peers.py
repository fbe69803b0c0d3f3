"""Peer servers (Ray Serve, LitServe) under the same load as mpsd. Placeholder until built."""

from __future__ import annotations

PEERS = ("ray-serve", "litserve")


def run_peers(settings, model_dir: str, progress) -> dict:
    return {name: {"error": "peer harness not built yet"} for name in PEERS}
