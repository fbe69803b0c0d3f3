"""The command line every peer server takes from the harness (benchmarks/servers.py starts them)."""

from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    return parser
