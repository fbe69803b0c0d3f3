"""`python -m benchmarks constrained`: what constrained decoding costs, measured side by side in one run.

1. Decode throughput at a batch of `streams` (16), in-process on the engine and decode loop a worker runs: every
   row constrained by a JSON Schema against every row free, in alternating rounds. End of text is switched off for
   both (the engine's eos_ids emptied, a schema whose one string needs more characters than the budget can write),
   so every row runs to max_tokens and both batches hold the same rows at every step; tokens/s is counted over
   steps that decoded every row and prefilled nothing.
2. Mask time per token: RowGrammar.allowed() and consume() for one row walking a JSON object, per token.
3. TTFT through a real daemon (gRPC Chat, one torch-lm worker of the demo model, whatever --model says: its chat
   template writes tool calls, and the compile depends on the tokenizer, which every model here shares): a typical
   set of three tools with tool_choice "required", the same tools every time (the grammar kept compiled) against
   new tools every time (compiled per request: one enum value changed), and against no tools.
"""

from __future__ import annotations

import json
import pathlib
import random
import statistics
import threading
import time
from typing import Callable

from benchmarks.models import BenchModel

Progress = Callable[[str], None]
NEVER_ENDS = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100000}}, "required": ["text"]}
PROMPTS = ["The module", "Return the number of", "A class that", "def main():", "Raise an error if", "The file"]


def typical_tools(city_variant: str = "") -> list[dict]:
    """Three tools of the size agents send: enums, bounded strings, an integer range, an optional field."""
    cities = ["Paris", "Rome", "Tokyo"] + ([city_variant] if city_variant else [])
    return [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                          "parameters": {"type": "object", "properties": {
                                              "city": {"enum": cities}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                                              "required": ["city", "unit"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "search", "description": "Search the documents.",
                                          "parameters": {"type": "object", "properties": {
                                              "query": {"type": "string", "maxLength": 40},
                                              "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                                              "required": ["query"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "send_message", "description": "Send a message to someone.",
                                          "parameters": {"type": "object", "properties": {
                                              "to": {"type": "string", "maxLength": 30},
                                              "subject": {"type": "string", "maxLength": 40},
                                              "urgent": {"type": "boolean"}},
                                              "required": ["to", "subject"], "additionalProperties": False}}},
    ]


# -- 1 and 2: in-process ------------------------------------------------------------


def engines(model: BenchModel, streams: int) -> dict[str, Callable[[], object]]:
    from mpsd.worker.backends.torch_lm import TorchCausalLM

    made = {"torch-lm": lambda: TorchCausalLM(model.torch_dir, "cpu")}
    if model.mlx_dir:
        from mpsd.worker.backends.mlx_lm import MlxCausalLM

        made["mlx-lm"] = lambda: MlxCausalLM(model.mlx_dir, max_sequences=streams)
    return made


def throughput(engine, streams: int, max_tokens: int, rounds: int, progress: Progress) -> dict:
    """tokens/s of full-batch decode steps, free and constrained rounds alternating."""
    from mpsd.generate_params import Constraint, GenerateParams
    from mpsd.worker.agents.matcher import GrammarCompiler
    from mpsd.worker.scheduler import DecodeScheduler

    engine.eos_ids = frozenset()  # every row runs to max_tokens, free or not
    compiler = GrammarCompiler(engine.grammar_tokenizer(), engine.logits_width)
    constraint = Constraint("json_schema", json.dumps(NEVER_ENDS), "json_schema")
    scheduler = DecodeScheduler(engine, streams)
    scheduler.start()
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    try:
        for round_ in range(rounds):
            for kind in ("free", "constrained") if round_ % 2 == 0 else ("constrained", "free"):
                requests = [GenerateParams(PROMPTS[i % len(PROMPTS)], max_tokens, 1.0, 1.0, 1000 * round_ + i, (),
                                           constraint=constraint if kind == "constrained" else None)
                            for i in range(streams)]
                scheduler.steps.clear()
                _run_together(scheduler, requests, compiler if kind == "constrained" else None)
                full = [s for s in scheduler.steps if s.decode_rows == streams and not s.prefill_tokens]
                rate = streams * len(full) / sum(s.seconds for s in full)
                rates[kind].append(rate)
                progress(f"  round {round_ + 1} {kind}: {rate:,.0f} tok/s over {len(full)} full steps")
    finally:
        scheduler.stop()
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    return {"free_tok_s": round(free), "constrained_tok_s": round(constrained),
            "ratio": round(constrained / free, 3), "rounds": rates}


def _run_together(scheduler, requests, compiler) -> None:
    submissions = [scheduler.submit(r, grammar=compiler.row(r.constraint) if compiler else None) for r in requests]
    threads = [threading.Thread(target=lambda s=s: list(s), daemon=True) for s in submissions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)


def mask_time(engine, tokens: int = 2000) -> dict:
    """One row walking a JSON object (random allowed tokens): the mask and the consume, per token."""
    from mpsd.generate_params import Constraint
    from mpsd.worker.agents.matcher import GrammarCompiler

    compiler = GrammarCompiler(engine.grammar_tokenizer(), engine.logits_width)
    schema = json.dumps({"type": "object", "properties": {"items": {"type": "array", "items": typical_tools()[1][
        "function"]["parameters"]}}, "required": ["items"]})
    rng, per_token, left = random.Random(0), [], tokens
    while left:
        row = compiler.row(Constraint("json_schema", schema, "json_schema"))
        while left and not row.stopped:
            started = time.perf_counter()
            allowed = row.allowed()
            choices = allowed.nonzero()[0]
            token = int(choices[rng.randrange(len(choices))])
            row.consume(token)
            per_token.append(time.perf_counter() - started)
            left -= 1
    per_token.sort()
    return {"tokens": tokens, "vocab": engine.logits_width, "mean_us": round(1e6 * statistics.fmean(per_token), 1),
            "p50_us": round(1e6 * per_token[len(per_token) // 2], 1),
            "p99_us": round(1e6 * per_token[int(len(per_token) * 0.99)], 1)}


# -- 3: TTFT through a daemon ---------------------------------------------------------


def compile_ttft(rounds: int, progress: Progress) -> dict:
    from benchmarks.daemon_run import RunningDaemon
    from mpsd.v1 import inference_pb2

    config = '[[models]]\nname = "demo"\nbackend = "torch-lm"\npath = "@demo"\nreplicas = 1\nthreads = 1\n'
    daemon = RunningDaemon(config)
    ttfts: dict[str, list[float]] = {"no tools": [], "same tools (kept compiled)": [], "new tools (compiled)": []}
    try:
        daemon.wait_ready(1)
        for round_ in range(rounds):
            for kind in ttfts:
                tools = None if kind == "no tools" else typical_tools(f"City{round_}" if kind.startswith("new") else "")
                request = inference_pb2.ChatRequest(
                    model="demo", messages=[inference_pb2.ChatMessage(role="user", content="What is the weather?")],
                    max_tokens=1, seed=round_)
                if tools:
                    request.tools_json = json.dumps(tools)
                    request.tool_choice.mode = "required"
                started = time.perf_counter()
                for _ in daemon.inference.Chat(request, timeout=60):
                    break
                ttfts[kind].append(time.perf_counter() - started)
        progress("  TTFT medians: " + ", ".join(f"{k} {1000 * statistics.median(v):.1f} ms" for k, v in ttfts.items()))
    finally:
        daemon.stop()
    medians = {kind: round(1000 * statistics.median(values), 2) for kind, values in ttfts.items()}
    return {"rounds": rounds, "median_ms": medians,
            "compile_added_ms": round(medians["new tools (compiled)"] - medians["same tools (kept compiled)"], 2)}


def run(model: BenchModel, streams: int, max_tokens: int, rounds: int, ttft_rounds: int, progress: Progress) -> dict:
    results: dict = {"model": model.name, "streams": streams, "max_tokens": max_tokens, "engines": {}}
    for name, make in engines(model, streams).items():
        progress(f"{name}: {streams} rows, every row constrained against every row free, {rounds} rounds")
        engine = make()
        results["engines"][name] = {"throughput": throughput(engine, streams, max_tokens, rounds, progress),
                                    "mask": mask_time(engine)}
    progress(f"TTFT of a Chat with three tools, tool_choice required, {ttft_rounds} rounds")
    results["ttft"] = compile_ttft(ttft_rounds, progress)
    return results


def report(results: dict, out: pathlib.Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Constrained decoding ({results['model']} models)", "", f"`{results.get('command', '')}`", "",
             f"Decode throughput, {results['streams']} rows, {results['max_tokens']} tokens each, full-batch steps "
             "(median of rounds):", "",
             "| engine | free tok/s | constrained tok/s | constrained / free | mask+consume per token (mean, p99) |",
             "|---|---:|---:|---:|---:|"]
    for name, figures in results["engines"].items():
        speed, mask = figures["throughput"], figures["mask"]
        lines.append(f"| {name} | {speed['free_tok_s']:,} | {speed['constrained_tok_s']:,} | {speed['ratio']:.2f}x | "
                     f"{mask['mean_us']} µs, {mask['p99_us']} µs (vocab {mask['vocab']}) |")
    ttft = results["ttft"]
    lines += ["", f"TTFT through the daemon (demo model, gRPC Chat, max_tokens 1, median of {ttft['rounds']}):", "",
              "| request | TTFT ms |", "|---|---:|"]
    lines += [f"| {kind} | {ms} |" for kind, ms in ttft["median_ms"].items()]
    lines += ["", f"Compiling the three tools' grammar adds {ttft['compile_added_ms']} ms to TTFT; a schema seen "
                  "before is copied, not compiled."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text
