"""`python -m benchmarks run [--model demo|25m] [--quick] [--out DIR]`: one run, every system, ratios side by side;
`python -m benchmarks equality [--model demo|25m]`: tokens that differ between batched and solo decoding;
`python -m benchmarks switching [--model demo|25m]`: the first token of an evicted model against its plain load;
`python -m benchmarks http_edge [--rounds N] [--out DIR]`: the HTTP edge's h11 server against aiohttp.web and
uvicorn+starlette (RSS, SSE tokens/s, small-request latency);
`python -m benchmarks multi_turn [--model demo|25m] [--quick] [--out DIR]`: prefix reuse under multi-turn
conversations, mpsd's cache on and off, prefix-aware routing, and peers with prompt caches of their own;
`python -m benchmarks engines [--model demo|25m] [--quick] [--engines mlx,llama-cpp] [--jitter-ms MS] [--out DIR]`: an
external engine (mlx_lm.server, llama.cpp's server) through mpsd's `backend = "engine"` against the same engine called
directly, at 1 and 8 streams, and 2 replicas against 1;
`python -m benchmarks engine_memory [--model 25m|demo] [--out DIR]`: two replicas of one GGUF under mpsd, each
one's footprint against its RSS, USS and PSS, and the shared part shown once;
`python -m benchmarks hop [--setups A,B,C] [--seconds N] [--streams N] [--max-tokens N] [--measure-only] [--out DIR]
[--code-root DIR]`: CPU per 1k tokens in the worker -> daemon -> client hop, and where it goes by py-spy samples;
`python -m benchmarks constrained [--model demo|25m] [--streams N] [--max-tokens N] [--rounds N] [--ttft-rounds N]
[--out DIR]`: decode throughput with every row grammar-constrained against free, mask time per token, and the TTFT a
new tool schema's compilation adds;
`python -m benchmarks predict [--model mlp-9m|mlp-1m] [--seconds S] [--no-peer] [--out DIR]`: a small MLP's Predict
throughput and p50/p99 latency at 1, 8 and 32 clients, mpsd batched against unbatched and LitServe's batching."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from benchmarks import models, multi_turn_peers, report, run
from benchmarks.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="measure and write results.json, results.md and chart.png")
    go.add_argument("--model", choices=models.MODEL_CHOICES, default="demo",
                    help="demo: mpsd's demo models; 25m: a ~25M-parameter GPT-2 and MLX llama, built on first use")
    go.add_argument("--quick", action="store_true", help="small settings: under 3 minutes with the demo model")
    go.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    go.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
    go.add_argument("--model-dir", default=None, help="another Hugging Face causal LM directory for the torch systems")
    go.add_argument("--no-peers", action="store_true", help="skip Ray Serve, LitServe and mlx_lm.server")
    same = commands.add_parser("equality", help="count tokens that differ between batched and solo decoding")
    same.add_argument("--model", choices=models.MODEL_CHOICES, default="demo")
    same.add_argument("--requests", type=int, default=24)
    same.add_argument("--max-tokens", type=int, default=64)
    switch = commands.add_parser("switching", help="TTFT of a model that was evicted, against its plain load")
    switch.add_argument("--model", choices=models.MODEL_CHOICES, default="demo")
    edge = commands.add_parser("http_edge", help="the HTTP edge: mpsd's h11 server against aiohttp.web and uvicorn")
    edge.add_argument("--rounds", type=int, default=5, help="each server once per round, in a rotated order")
    edge.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/http-edge"))
    edge.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run: h11 alone
    turns = commands.add_parser("multi_turn", help="prefix reuse: multi-turn conversations, cache on/off, peers")
    turns.add_argument("--model", choices=models.MODEL_CHOICES, default="demo")
    turns.add_argument("--quick", action="store_true", help="fewer conversations, one no-reuse round")
    turns.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    turns.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/multi-turn"))
    turns.add_argument("--conversations", type=int, default=None, help="conversations at once (C)")
    turns.add_argument("--turns", type=int, default=None, help="turns per conversation (T)")
    turns.add_argument("--skip", default="", help="mpsd systems not to run, comma-separated (mpsd-mlx, "
                       "mpsd-torch-2x-prefix, mpsd-torch-2x-least-loaded)")
    turns.add_argument("--no-reuse-rounds", type=int, default=None, help="rounds of the no-reuse load (3)")
    turns.add_argument("--prefix-cache", default=None,
                       help="prefix_cache of the cache-on mpsd systems (default: mpsd's own, 25%%)")
    turns.add_argument("--peers", default=",".join(multi_turn_peers.PEERS),
                       help=f"peers to run, comma-separated, '' for none (default: {','.join(multi_turn_peers.PEERS)})")
    engine = commands.add_parser("engines", help="an engine through mpsd (backend engine) against it called directly")
    engine.add_argument("--model", choices=models.MODEL_CHOICES, default="demo")
    engine.add_argument("--quick", action="store_true", help="two rounds, fewer requests per cell")
    engine.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    engine.add_argument("--rounds", type=int, default=None, help="rounds of every cell (4)")
    engine.add_argument("--max-tokens", type=int, default=None, help="tokens per request (64)")
    engine.add_argument("--engines", default="mlx,llama-cpp", help="engines to run, comma-separated (mlx: "
                        "mlx_lm.server; llama-cpp: what mpsd runs for a GGUF)")
    engine.add_argument("--jitter-ms", type=float, default=None, help="a random pause of 0 to this many ms before "
                        "each request, the same pauses for every system: arrivals not in lockstep (0)")
    engine.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/engines"))
    memory = commands.add_parser("engine_memory", help="two replicas of one GGUF: footprint against RSS, USS, PSS")
    memory.add_argument("--model", choices=models.MODEL_CHOICES, default="25m",
                        help="25m: the 25M GPT-2 as a 100 MiB GGUF (default); demo: the 3 MiB GGUF demo")
    memory.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/engine-memory"))
    hop = commands.add_parser("hop", help="CPU per token in the worker -> daemon -> client hop, by part (py-spy)")
    hop.add_argument("--setups", default="A,B,C", help="A: null-lm, B: torch-lm demo GPT-2, C: mlx-lm demo llama")
    hop.add_argument("--seconds", type=float, default=25.0, help="seconds of load per phase (25)")
    hop.add_argument("--streams", type=int, default=16, help="streams at once, the model's concurrency too (16)")
    hop.add_argument("--max-tokens", type=int, default=192, help="tokens per request (192)")
    hop.add_argument("--measure-only", action="store_true", help="no py-spy: CPU per 1k tokens by process and thread")
    hop.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/hop"))
    hop.add_argument("--code-root", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1],
                     help="the checkout whose mpsd and harness run (another commit's worktree); default: this one")
    shaped = commands.add_parser("constrained", help="constrained decoding: throughput, mask time, compile TTFT")
    shaped.add_argument("--model", choices=models.MODEL_CHOICES, default="demo")
    shaped.add_argument("--streams", type=int, default=16, help="rows in the batch (16)")
    shaped.add_argument("--max-tokens", type=int, default=128, help="tokens per row (128)")
    shaped.add_argument("--rounds", type=int, default=4, help="rounds of free and constrained batches, alternating (4)")
    shaped.add_argument("--ttft-rounds", type=int, default=15, help="requests of each kind for the TTFT (15)")
    shaped.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/constrained"))
    batched = commands.add_parser("predict", help="batched Predict: mpsd batched, unbatched and LitServe, side by side")
    batched.add_argument("--model", choices=("mlp-9m", "mlp-1m"), default="mlp-9m",
                         help="mlp-9m: 9M parameters; mlp-1m: 1.3M, whose forward pass is less than its serving")
    batched.add_argument("--seconds", type=float, default=None, help="measured seconds per cell and round (6)")
    batched.add_argument("--no-peer", action="store_true", help="skip LitServe")
    batched.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    batched.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/predict"))
    args = parser.parse_args(argv)
    if args.command == "predict":
        return _predict(args, argv)
    if args.command == "constrained":
        return _constrained(args, argv)
    if args.command == "hop":
        return _hop(args, argv)
    if args.command == "engines":
        return _engines(args, argv)
    if args.command == "engine_memory":
        from benchmarks import engine_memory

        command = _command(argv)
        print(engine_memory.run(args.model, args.out, command, lambda line: print(line, file=sys.stderr)))
        return 0
    if args.command == "multi_turn":
        return _multi_turn(args, argv)
    if args.command == "equality":
        return _equality(args)
    if args.command == "switching":
        return _switching(args)
    if args.command == "http_edge":
        return _http_edge(args, argv)
    settings = Settings.tiny() if args.tiny else Settings.quick() if args.quick else Settings.full()
    started = time.perf_counter()
    progress = _progress(started)
    model = models.resolve(args.model, progress, args.model_dir)
    results = run.run(settings, model, progress, peers=not args.no_peers)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["command"] = _command(argv)
    print(report.write(results, args.out))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'chart.png'}", file=sys.stderr)
    return 0


def _constrained(args, argv) -> int:
    from benchmarks import constrained

    started = time.perf_counter()
    progress = _progress(started)
    model = models.resolve(args.model, progress)
    results = constrained.run(model, args.streams, args.max_tokens, args.rounds, args.ttft_rounds, progress)
    results["command"] = _command(argv)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(constrained.report(results, args.out))
    return 0


def _predict(args, argv) -> int:
    import dataclasses

    from benchmarks import predict, predict_report
    from benchmarks.predict_models import MODELS

    sizes = predict.Sizes.tiny() if args.tiny else predict.Sizes()
    sizes = dataclasses.replace(sizes, **{k: v for k, v in (("seconds", args.seconds),) if v})
    if args.no_peer:
        sizes = dataclasses.replace(sizes, peer=False)
    results = predict.run(MODELS[args.model], sizes, _progress(time.perf_counter()), args.out, _command(argv))
    print(predict_report.markdown(results))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'} ({results['elapsed_s']}s)",
          file=sys.stderr)
    return 0


def _equality(args) -> int:
    from benchmarks import equality

    model = models.resolve(args.model, lambda line: print(line, file=sys.stderr))
    for name, make in equality.engines(model).items():
        for mode, figures in equality.compare(make(), args.requests, args.max_tokens).items():
            print(f"{args.model} {name} {mode}: {figures['differing_tokens']} of {figures['tokens']} tokens differ "
                  f"({figures['requests_differing']} of {args.requests} requests), widest batch "
                  f"{figures['widest_batch']}")
    return 0


def _switching(args) -> int:
    from benchmarks import switching

    model = models.resolve(args.model, lambda line: print(line, file=sys.stderr))
    figures = switching.measure(model.torch_dir)
    print(f"{args.model}: plain load TTFT {figures['plain_load_ttft_s']:.2f}s, warm TTFT {figures['warm_ttft_s'] * 1000:.0f}ms, "
          f"after eviction {', '.join(f'{s:.2f}s' for s in figures['switch_ttft_s'])} "
          f"({figures['switch_vs_plain']:.2f}x the plain load; {figures['evictions']} evictions)")
    return 0


def _http_edge(args, argv: list[str] | None) -> int:
    import dataclasses

    from benchmarks import http_edge

    started = time.perf_counter()
    progress = _progress(started)
    sizes = http_edge.Sizes.tiny() if args.tiny else dataclasses.replace(http_edge.Sizes(), rounds=args.rounds)
    servers = (http_edge.BASELINE,) if args.tiny else http_edge.SERVERS
    command = _command(argv)
    results = http_edge.run(sizes, progress, args.out, servers, command)
    print(http_edge.table(results))
    print(f"\nwritten: {args.out / 'results.json'} ({results['elapsed_s']}s)", file=sys.stderr)
    return 0


def _multi_turn(args, argv: list[str] | None) -> int:
    import dataclasses

    from benchmarks import multi_turn, multi_turn_report

    started = time.perf_counter()
    progress = _progress(started)
    sizes = (multi_turn.Sizes.tiny() if args.tiny else multi_turn.Sizes.quick() if args.quick
             else multi_turn.Sizes())
    sizes = dataclasses.replace(sizes, **{k: v for k, v in (("conversations", args.conversations),
                                                           ("turns", args.turns),
                                                           ("no_reuse_rounds", args.no_reuse_rounds),
                                                           ("prefix_cache", args.prefix_cache),
                                                           ("skip", tuple(n for n in args.skip.split(",") if n)))
                                                 if v})
    peers = tuple(name for name in args.peers.split(",") if name)
    unknown = set(peers) - set(multi_turn_peers.PEERS)
    if unknown:
        print(f"--peers: unknown {', '.join(sorted(unknown))}; known: {', '.join(multi_turn_peers.PEERS)}",
              file=sys.stderr)
        return 2
    model = models.resolve(args.model, progress)
    command = _command(argv)
    results = multi_turn.run(sizes, model, progress, args.out, peers, command)
    print(multi_turn_report.markdown(results))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'} ({results['elapsed_s']}s)",
          file=sys.stderr)
    return 0


def _hop(args, argv: list[str] | None) -> int:
    from benchmarks import hop

    setups = [name for name in args.setups.split(",") if name]
    unknown = set(setups) - set(hop.SETUPS)
    if unknown or not setups:
        print(f"--setups: unknown {', '.join(sorted(unknown)) or '(none given)'}; known: {','.join(hop.SETUPS)}",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    progress = _progress(started)
    command = _command(argv)
    print(hop.run(setups, args.seconds, args.streams, args.max_tokens, args.measure_only, args.out, args.code_root,
                  command, progress))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'summary.md'} ({time.perf_counter() - started:.0f}s)",
          file=sys.stderr)
    return 0


def _engines(args, argv: list[str] | None) -> int:
    import dataclasses

    from benchmarks import engines, engines_report

    started = time.perf_counter()
    progress = _progress(started)
    sizes = engines.Sizes.tiny() if args.tiny else engines.Sizes.quick() if args.quick else engines.Sizes()
    sizes = dataclasses.replace(sizes, **{k: v for k, v in (("rounds", args.rounds), ("max_tokens", args.max_tokens),
                                                              ("jitter_ms", args.jitter_ms)) if v})
    chosen = tuple(name for name in args.engines.split(",") if name)
    unknown = set(chosen) - set(engines.ENGINES)
    if unknown:
        print(f"--engines: unknown {', '.join(sorted(unknown))}; known: {', '.join(engines.ENGINES)}", file=sys.stderr)
        return 2
    model = models.resolve(args.model, progress)
    command = _command(argv)
    results = engines.run(sizes, model, progress, args.out, chosen, command)
    print(engines_report.markdown(results))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'} ({results['elapsed_s']}s)",
          file=sys.stderr)
    return 0



def _progress(started: float):
    """A progress line on stderr, stamped with the seconds since `started` (time.perf_counter())."""
    return lambda line: print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)


def _command(argv: list[str] | None) -> str:
    """The command line as the user typed it, for the reports."""
    return " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
