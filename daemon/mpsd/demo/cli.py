"""The command-line contract both builders keep with the daemon that runs them in a child.

The daemon logs the child's output line by line from a pipe and shows the last
lines when it fails, so progress is flushed as it comes and a failure is one
readable line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable

from mpsd.demo.models import DemoModel, Progress


def parser(demo: DemoModel, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {demo.builder_module}", description=doc.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path, metavar="OUT_DIR", help="directory to hold the model")
    return parser


def run(demo: DemoModel, build: Callable[[Progress], pathlib.Path]) -> int:
    """Runs build(progress) and turns its outcome into the exit status the daemon reads."""
    try:
        out_dir = build(lambda line: print(line, flush=True))
    except Exception as exc:  # noqa: BLE001 - the contract is one readable line, not a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{demo.label}: error: {message}", file=sys.stderr, flush=True)
        return 1
    print(f"{demo.label}: ready in {out_dir}", flush=True)
    return 0
