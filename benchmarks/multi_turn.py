"""`python -m benchmarks multi_turn`: prefix reuse (the prompt cache) under an agent-shaped multi-turn load.

C conversations at once, each of T turns sent one after another: every turn sends the whole history again
(multi_turn_workload.py: a ~500-token system prompt with tool schemas, then each turn's short message and the
model's own streamed reply), greedy, `max_tokens` tokens per reply, streamed `/v1/completions` with
`stream_options.include_usage`, the same client and text for every system. Per system: TTFT p50/p99 per turn
index, prompt tokens/s and generated tokens/s over the whole run (tokens over its wall time), and the hit rate:
cached_tokens / prompt_tokens of turns >= 2, from `usage.prompt_tokens_details.cached_tokens` (or the server's
own log, or n/a). A "no reuse" load (random prompts of the same lengths, no shared prefix, C streams of T
requests each) measures what the cache costs when it never hits: mpsd with the cache on against off, both
daemons up at once and the rounds alternated, so the machine's drift hits both alike.

Systems: mpsd torch-lm with the cache on (the default budget) and off (`prefix_cache = "0"`); 2 replicas with
`routing = "prefix"` and with `"least-loaded"`; mpsd mlx-lm against mlx_lm.server; llama-cpp-python's server
and vLLM (CPU) as torch-side peers (multi_turn_peers.py). A system that fails is recorded as {"error": ...}.
The client is multi_turn_client.py, the report and targets multi_turn_report.py; results.json and results.md go
to --out (default benchmarks/results/multi-turn).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import secrets
import statistics
import time
from collections.abc import Callable

from benchmarks import multi_turn_peers, multi_turn_report
from benchmarks.daemon_run import RunningDaemon
from benchmarks.models import BenchModel
from benchmarks.multi_turn_client import PromptFor, Reply, drive
from benchmarks.multi_turn_workload import RandomText, render, system_prompt, user_message
from benchmarks.settings import CONCURRENCY, cores, worker_threads
from benchmarks.sweep import lm_config
from benchmarks.timing import percentiles_ms

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sizes:
    conversations: int = 8      # C, at once
    turns: int = 8              # T per conversation; histories reach ~850 tokens at turn 8
    max_tokens: int = 20        # per reply
    no_reuse_rounds: int = 3    # cache on / off, alternated
    concurrency: int = CONCURRENCY
    skip: tuple[str, ...] = ()  # mpsd systems not run
    prefix_cache: str | None = None  # the cache-on systems' prefix_cache; None: mpsd's default

    @classmethod
    def quick(cls) -> Sizes:
        return cls(conversations=4, no_reuse_rounds=1)

    @classmethod
    def tiny(cls) -> Sizes:
        """The smoke test's: the cache on and off and the no-reuse load, almost no time."""
        return cls(conversations=2, turns=3, max_tokens=4, no_reuse_rounds=1,
                   skip=("mpsd-torch-2x-prefix", "mpsd-torch-2x-least-loaded"))


def conversations(nonce: str) -> PromptFor:
    system = system_prompt(nonce)

    def prompt_for(conversation: int, turn: int, earlier: list[Reply]) -> str:
        done = [(user_message(conversation, r.turn), r.text) for r in earlier]
        return render(system, done, user_message(conversation, turn))
    return prompt_for


def count_tokens(run: dict, tokenizer) -> None:
    """Prompt tokens a server did not report, counted with the model's tokenizer; completion tokens it did not
    report, as the text events it streamed."""
    for reply in run["replies"]:
        if reply.prompt_tokens is None:
            reply.prompt_tokens = len(tokenizer.encode(run["prompts"][(reply.conversation, reply.turn)]))
        if reply.completion_tokens is None:
            reply.completion_tokens = reply.events


def summarize(run: dict, tokenizer) -> dict:
    """The figures of one run."""
    count_tokens(run, tokenizer)
    replies: list[Reply] = run["replies"]
    done = [r for r in replies if not r.error]
    wall = run["wall_s"]
    turns = sorted({r.turn for r in done})
    per_turn = {str(t): {"ttft_ms": percentiles_ms([r.ttft_s for r in done if r.turn == t]),
                         "prompt_tokens": round(statistics.mean(r.prompt_tokens for r in done if r.turn == t)),
                         "hit_rate": hit_rate([r for r in done if r.turn == t])} for t in turns}
    return {
        "requests": len(replies), "failures": len(replies) - len(done),
        "failure_examples": [r.error for r in replies if r.error][:3],
        "wall_s": round(wall, 3),
        "prompt_tps": round(sum(r.prompt_tokens for r in done) / wall, 1),
        "tps": round(sum(r.completion_tokens for r in done) / wall, 1),
        "ttft_ms_turn1": percentiles_ms([r.ttft_s for r in done if r.turn == 1]),
        "ttft_ms_turns_ge2": percentiles_ms([r.ttft_s for r in done if r.turn >= 2]),
        "ttft_ms_turns_ge3": percentiles_ms([r.ttft_s for r in done if r.turn >= 3]),
        "hit_rate_turns_ge2": hit_rate([r for r in done if r.turn >= 2]),
        "prompt_tokens_max": max((r.prompt_tokens for r in done), default=0),
        "completion_tokens": [min((r.completion_tokens for r in done), default=0),
                              max((r.completion_tokens for r in done), default=0)],
        "cached_reported": any(r.cached_tokens is not None for r in done),
        "per_turn": per_turn, "others_cores": run["others_cores"],
    }


def hit_rate(replies: list[Reply]) -> float | None:
    """cached / prompt tokens, None when the server reported no cached tokens."""
    if not replies or all(r.cached_tokens is None for r in replies):
        return None
    prompt = sum(r.prompt_tokens for r in replies)
    return round(sum(r.cached_tokens or 0 for r in replies) / prompt, 4) if prompt else None


def texts(run: dict) -> dict[str, str]:
    return {f"{r.conversation}.{r.turn}": r.text for r in run["replies"]}


# -- mpsd ---------------------------------------------------------------------------------------------------------

MPSD_SYSTEMS = {   # name: (backend, replicas, prefix_cache or None for the default, routing)
    "mpsd-torch": ("torch-lm", 1, None, "prefix"),
    "mpsd-torch-no-cache": ("torch-lm", 1, "0", "prefix"),
    "mpsd-torch-2x-prefix": ("torch-lm", 2, None, "prefix"),
    "mpsd-torch-2x-least-loaded": ("torch-lm", 2, None, "least-loaded"),
    "mpsd-mlx": ("mlx-lm", 1, None, "prefix"),
}


def mpsd_config(name: str, model_dir: str, concurrency: int, prefix_cache: str | None = None) -> str:
    """prefix_cache: for a system whose cache is mpsd's default, that key instead (None: the default)."""
    backend, replicas, cache, routing = MPSD_SYSTEMS[name]
    cache = cache if cache is not None else prefix_cache
    threads = worker_threads(replicas, cores())
    cache_line = f'\nprefix_cache = "{cache}"' if cache is not None else ""
    return lm_config(replicas, threads, model_dir, backend, concurrency, f'routing = "{routing}"{cache_line}')


def start_mpsd(name: str, model_dir: str, sizes: Sizes, progress: Progress) -> RunningDaemon:
    backend, replicas, cache, routing = MPSD_SYSTEMS[name]
    cache = cache if cache is not None else sizes.prefix_cache
    progress(f"{name}: {backend}, {replicas} worker(s) x {worker_threads(replicas, cores())} thread(s), "
             f"prefix_cache {cache or 'default'}, routing {routing}")
    daemon = RunningDaemon(mpsd_config(name, model_dir, sizes.concurrency, sizes.prefix_cache), http=True)
    try:
        daemon.wait_ready(replicas)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def cache_stats(daemon: RunningDaemon) -> list[dict]:
    """Each worker's prefix cache as it reports it: bytes, budget, entries, hit/miss tokens, evictions."""
    return [{"worker": w["id"], **w.get("prefix_cache", {}), **({"note": w["prefix_cache_note"]}
                                                               if w.get("prefix_cache_note") else {})}
            for w in daemon.status()["workers"]]


def cache_during(before: list[dict], after: list[dict]) -> list[dict]:
    """The caches after the run, with the hit and miss tokens and evictions of the run alone (run_*): which
    worker served how much of it."""
    earlier = {w["worker"]: w for w in before}
    return [{**w, **{f"run_{k}": int(w.get(k, 0)) - int(earlier.get(w["worker"], {}).get(k, 0))
                     for k in ("hit_tokens", "miss_tokens", "evictions")}} for w in after]


def warm(port: int, sizes: Sizes, random_text: RandomText, longest: int) -> None:
    """Every batch shape and prompt length once, from prompts nothing later shares."""
    lengths = [max(8, longest * (i + 1) // sizes.conversations) for i in range(sizes.conversations)]
    drive(port, sizes.conversations, 1, 2, lambda c, t, _: random_text.prompt(lengths[c]))


# -- the run ------------------------------------------------------------------------------------------------------


def run(sizes: Sizes, model: BenchModel, progress: Progress, out: pathlib.Path, peers: tuple[str, ...],
        command: str = "") -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model.torch_dir)
    random_text = RandomText(tokenizer, seed=0)
    context = multi_turn_peers.context_length(model.torch_dir)
    results: dict = {"command": command, "sizes": dataclasses.asdict(sizes),
                     "machine": {"cores": cores(), "python": platform.python_version(), "platform": platform.platform()},
                     "model": {"name": model.name, "torch_dir": model.torch_dir, "mlx_dir": model.mlx_dir},
                     "systems": {}, "no_reuse": {}}
    systems = results["systems"]
    longest = context - sizes.max_tokens - 1
    nonce = secrets.token_hex(3)  # one per run, the same for every system: their prompts and greedy replies compare

    def measured(name: str, port: int, extra: dict | None = None, after=None) -> dict:
        """The multi-turn run on one system, its figures under systems[name]; after(run) fills in what the
        server reported elsewhere (its log)."""
        one = drive(port, sizes.conversations, sizes.turns, sizes.max_tokens, conversations(nonce))
        count_tokens(one, tokenizer)
        if after is not None:
            after(one)
        figures = {**summarize(one, tokenizer), **(extra or {}), "nonce": nonce, "replies": texts(one)}
        systems[name] = figures
        progress(f"{name}: " + multi_turn_report.line(figures))
        return one

    def measured_mpsd(name: str, daemon: RunningDaemon) -> dict:
        warm(daemon.http_port, sizes, random_text, longest)
        before = cache_stats(daemon)
        one = measured(name, daemon.http_port)
        systems[name]["cache"] = cache_during(before, cache_stats(daemon))
        return one

    def guarded(names: tuple[str, ...], body: Callable[[], None]) -> str:
        """body() run; what it raised recorded as the error of every system it had not measured yet."""
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - a system's failure is a figure, not the end of the run
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            for name in names:
                if name not in systems:
                    systems[name] = {"error": error}
                    progress(f"{name}: not measured: {error}")
            return error
        return ""

    def torch_on_off() -> None:
        on = start_mpsd("mpsd-torch", model.torch_dir, sizes, progress)
        try:
            off = start_mpsd("mpsd-torch-no-cache", model.torch_dir, sizes, progress)
            try:
                for name, daemon in (("mpsd-torch", on), ("mpsd-torch-no-cache", off)):
                    one = measured_mpsd(name, daemon)
                lengths = {(r.conversation, r.turn): r.prompt_tokens for r in one["replies"] if not r.error}
                results["no_reuse"] = no_reuse(sizes, {"on": on, "off": off}, lengths, random_text, tokenizer,
                                               progress)
            finally:
                off.stop()
        finally:
            on.stop()

    def mpsd_one(name: str, model_dir: str) -> Callable[[], None]:
        def body() -> None:
            daemon = start_mpsd(name, model_dir, sizes, progress)
            try:
                measured_mpsd(name, daemon)
            finally:
                daemon.stop()
        return body

    error = guarded(("mpsd-torch", "mpsd-torch-no-cache"), torch_on_off)
    if not results["no_reuse"]:
        results["no_reuse"] = {"error": error or "not run"}
    for name in ("mpsd-torch-2x-prefix", "mpsd-torch-2x-least-loaded"):
        if name in sizes.skip:
            systems[name] = {"error": "skipped (--skip or --tiny)"}
        else:
            guarded((name,), mpsd_one(name, model.torch_dir))
    mlx_context = multi_turn_peers.context_length(model.mlx_dir) if model.mlx_dir else 0
    mlx_problem = ("mlx-lm is not installed" if not model.mlx_dir else
                   f"the MLX model's context ({mlx_context} tokens) is shorter than the torch model's ({context}), "
                   f"which this workload's histories approach" if mlx_context < context else "")
    if mlx_problem:
        systems["mpsd-mlx"] = {"error": f"skipped: {mlx_problem}"}
    elif "mpsd-mlx" in sizes.skip:
        systems["mpsd-mlx"] = {"error": "skipped (--skip)"}
    else:
        guarded(("mpsd-mlx",), mpsd_one("mpsd-mlx", model.mlx_dir))
    for name in multi_turn_peers.PEERS:
        if name not in peers:
            systems[name] = {"error": "skipped (not in --peers)"}
        elif name == multi_turn_peers.MLX_SERVER and mlx_problem:
            systems[name] = {"error": f"skipped: {mlx_problem}"}
        else:
            def peer_body(name=name) -> None:
                with multi_turn_peers.start(name, model, sizes.conversations, sizes.concurrency, progress) as peer:
                    warm(peer.port, sizes, random_text, longest)
                    peer.mark()
                    measured(name, peer.port, peer.info, after=peer.fill_cached)
            guarded((name,), peer_body)
    equal_replies(systems)
    results["targets"] = multi_turn_report.targets(results)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(multi_turn_report.markdown(results))
    return results


def no_reuse(sizes: Sizes, daemons: dict[str, RunningDaemon], lengths: dict[tuple[int, int], int],
             random_text: RandomText, tokenizer, progress: Progress) -> dict:
    """Random prompts of the multi-turn run's lengths on the cache-on and cache-off daemons, rounds alternated:
    tok/s lost = 1 - median(on) / median(off)."""
    rounds: dict[str, list[dict]] = {"on": [], "off": []}
    for index in range(sizes.no_reuse_rounds):
        # one set of prompts a round, the same for both (the same work: greedy, the same replies), new each round
        prompts = {k: random_text.prompt(n) for k, n in lengths.items()}
        fallback = random_text.prompt(int(statistics.median(lengths.values())))
        for key in (("on", "off") if index % 2 == 0 else ("off", "on")):
            one = drive(daemons[key].http_port, sizes.conversations, sizes.turns, sizes.max_tokens,
                        lambda c, t, _, prompts=prompts, fallback=fallback: prompts.get((c, t), fallback))
            figures = summarize(one, tokenizer)
            rounds[key].append({k: figures[k] for k in ("tps", "prompt_tps", "wall_s", "requests", "failures",
                                                         "failure_examples", "hit_rate_turns_ge2",
                                                         "ttft_ms_turns_ge2", "others_cores")})
            progress(f"no reuse, cache {key}, round {index + 1}: {figures['tps']:.0f} tok/s, "
                     f"prompt {figures['prompt_tps']:.0f} tok/s, {figures['failures']} failed")
    on, off = (statistics.median(r["tps"] for r in rounds[k]) for k in ("on", "off"))
    return {"rounds": rounds, "tps_on": on, "tps_off": off,
            "loss": round(1 - on / off, 4) if off else None}


def equal_replies(systems: dict) -> None:
    """How many replies of each torch system are the same text as the cache-off run's (greedy: they should be)."""
    reference = systems.get("mpsd-torch-no-cache", {}).get("replies")
    if not reference:
        return
    for name, figures in systems.items():
        if name.startswith("mpsd-torch") and "replies" in figures:
            same = sum(figures["replies"].get(key) == text for key, text in reference.items())
            figures["replies_same_as_no_cache"] = f"{same}/{len(reference)}"
