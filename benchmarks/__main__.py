"""`python -m benchmarks run [--quick] [--out DIR]`: one run, every system, ratios side by side."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from benchmarks import report, run
from benchmarks.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="measure and write results.json, results.md and chart.png")
    go.add_argument("--quick", action="store_true", help="small settings: under 3 minutes")
    go.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    go.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
    go.add_argument("--model-dir", default=None, help="a Hugging Face causal LM directory (default: the demo model)")
    go.add_argument("--no-peers", action="store_true", help="skip Ray Serve and LitServe")
    args = parser.parse_args(argv)
    settings = Settings.tiny() if args.tiny else Settings.quick() if args.quick else Settings.full()
    model_dir = args.model_dir or run.default_model_dir()
    started = time.perf_counter()
    progress = lambda line: print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)  # noqa: E731
    results = run.run(settings, model_dir, progress, peers=not args.no_peers)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(report.write(results, args.out))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'chart.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
