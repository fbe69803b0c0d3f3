"""`python -m benchmarks predict`: batched Predict against unbatched, and LitServe's batching, in one run.

Closed-loop clients (1, 8 and 32 at once), each sending one request (one
row of 256 float32) after another; a cell's throughput is the replies that
came back in its window per second, its latency p50/p99 that of each request.
The model is a small MLP (predict_models.py). Every system has one worker (or
inference worker) with the same torch threads, on the CPU:

* mpsd unbatched: torch-module with max_batch_size 1 (today's path, concurrency 1);
* mpsd unbatched with concurrency 32: requests run side by side in the worker's threads, each its own forward
  pass, so what batching adds beyond letting more requests in shows apart;
* mpsd batched: max_batch_size and max_batch_delay, the best of a sweep at the most clients;
* mpsd batched with another max_batch_delay (2 ms, or 0 when the best had one): what the delay trades, at each level;
* LitServe: LitAPI max_batch_size and batch_timeout, the best of a sweep at the most clients.

First each sweep, one setting after another at the most clients; then the five
systems run at once, idle but for the one being measured, and every cell is
measured in `rounds` rounds, the systems in a rotated order each round, so that
a shared machine's drift falls on all of them alike. A cell reports its median
round; ratios are the median of each round's ratio.

Transports differ: mpsd is called by gRPC (tensors as bytes) and LitServe by
HTTP with JSON (its only transport); mpsd's HTTP edge has no Predict route, so
there is no HTTP figure of mpsd's to put beside it. Every system's answer to one
row is checked against the model run in this process before it is measured.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import threading
import time
from typing import Callable

import numpy as np
import psutil

from benchmarks import predict_models
from benchmarks.peer_install import PeerError, ensure_venv
from benchmarks.peers import PEER_SPECS
from benchmarks.predict_models import PredictModel
from benchmarks.predict_report import BATCHED, LITSERVE, UNBATCHED, write
from benchmarks.predict_systems import Call, LitServeSystem, MpsdSystem, mpsd_config
from benchmarks.settings import cores, worker_threads
from benchmarks.timing import percentiles_ms

Progress = Callable[[str], None]
WIDE = "mpsd unbatched, concurrency {most}"
OTHER_DELAY_MS = 2.0  # beside a best batched setting without delay, the same with this one


@dataclasses.dataclass(frozen=True)
class Sizes:
    levels: tuple[int, ...] = (1, 8, 32)
    seconds: float = 6.0                 # measured per cell and round
    warmup_s: float = 1.0                # load before each cell's window opens
    rounds: int = 3
    mpsd_sweep: tuple[tuple[int, float], ...] = ((32, 0.0), (32, 2.0), (32, 5.0), (16, 2.0))  # (size, delay ms)
    litserve_sweep: tuple[tuple[int, float], ...] = ((32, 0.001), (32, 0.005), (16, 0.002), (8, 0.001))  # (size, s)
    peer: bool = True

    @classmethod
    def tiny(cls) -> "Sizes":
        """The test suite's smoke run: every part, almost no time, no LitServe (no venv to build)."""
        return cls(levels=(1, 2), seconds=0.3, warmup_s=0.1, rounds=1, mpsd_sweep=((4, 2.0),), litserve_sweep=(),
                   peer=False)


# -- load --------------------------------------------------------------------------------------------------------


def measure(connect: Callable[[], Call], clients: int, sizes: Sizes,
            processes: Callable[[], dict[str, list]] | None = None) -> dict:
    """`clients` threads, each with its own connection, sending back to back: replies/s and latency; with
    `processes` (role -> psutil processes), the CPU each role and this process (the clients) spent per reply."""
    roles = {**(processes() if processes else {}), "client": [psutil.Process()]}
    cpu_before = _cpu_seconds(roles)
    rows = predict_models.request_rows(64)
    spans: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    failures = [0] * clients
    opens_at = time.perf_counter() + 0.2 + sizes.warmup_s
    closes_at = opens_at + sizes.seconds
    ready = threading.Barrier(clients)

    def client(index: int) -> None:
        call, sent = connect(), index
        ready.wait()
        while (started := time.perf_counter()) < closes_at:
            try:
                call(rows[sent % len(rows)])
            except Exception:  # noqa: BLE001 - a failed request is a figure
                failures[index] += 1
            spans[index].append((started, time.perf_counter()))
            sent += clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(closes_at - time.perf_counter() + 60)
    cpu_after = _cpu_seconds(roles)
    ended = [(s, e) for client_spans in spans for s, e in client_spans if opens_at <= e <= closes_at]
    latencies = [e - s for s, e in ended if s >= opens_at]
    replied = max(1, sum(len(client_spans) for client_spans in spans))  # warm-up included, as the CPU is
    return {"clients": clients, "rps": round(len(ended) / sizes.seconds, 1), "replies": len(ended),
            "failures": sum(failures), "latency_ms": percentiles_ms(latencies),
            "cpu_ms_per_reply": {role: round(1000 * (cpu_after[role] - cpu_before[role]) / replied, 3)
                                 for role in roles}}


def _cpu_seconds(roles: dict[str, list]) -> dict[str, float]:
    def spent(process) -> float:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system
    return {role: sum(spent(p) for p in processes) for role, processes in roles.items()}


def check_answer(call: Call, model: PredictModel, system: str) -> None:
    """The system computes what the model computes: one row, against the model run here."""
    import torch

    row = predict_models.request_rows(1, seed=99)[0]
    with torch.inference_mode():
        expected = predict_models.build(model)(torch.from_numpy(row)).numpy()
    got = call(row)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{system}: its answer differs from the model's ({got.shape} vs {expected.shape})")


def forward_ms(model: PredictModel, threads: int, batch_sizes: tuple[int, ...] = (1, 16, 32)) -> dict[str, float]:
    """The model's own forward pass in this process, median of 20 after a warm-up: what batching has to save."""
    import torch

    torch.set_num_threads(threads)
    module = predict_models.build(model).eval()
    figures = {}
    with torch.inference_mode():
        for rows in batch_sizes:
            batch = torch.from_numpy(predict_models.request_rows(rows).reshape(rows, -1))
            for _ in range(5):
                module(batch)
            times = []
            for _ in range(20):
                started = time.perf_counter()
                module(batch)
                times.append(time.perf_counter() - started)
            figures[str(rows)] = round(1000 * statistics.median(times), 3)
    return figures


def _line(name: str, cell: dict) -> str:
    return (f"{name}: {cell['clients']:>2} client(s): {cell['rps']:8.1f} req/s, p50 {cell['latency_ms']['p50']:.2f} "
            f"ms, p99 {cell['latency_ms']['p99']:.2f} ms, {cell['failures']} failed")


def _error(exc: Exception) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# -- one system at a time: the sweeps ----------------------------------------------------------------------------


def run_system(name: str, start: Callable[[], object], model: PredictModel, levels: tuple[int, ...], sizes: Sizes,
               progress: Progress) -> dict:
    """{clients: cell} for one system at its settings, or {"error": why}. Never raises."""
    try:
        system = start()
    except Exception as exc:  # noqa: BLE001 - a system that cannot start is a figure, not a crash of the run
        progress(f"{name}: not run: {exc}")
        return _error(exc)
    try:
        check_answer(system.connect(), model, name)
        cells = {}
        for clients in levels:
            cells[str(clients)] = cell = measure(system.connect, clients, sizes)
            progress(_line(name, cell))
        return cells
    except Exception as exc:  # noqa: BLE001
        progress(f"{name}: failed: {exc}")
        return _error(exc)
    finally:
        system.stop()


def best_of(sweep: dict[str, dict], clients: int) -> str | None:
    rates = {label: cells[str(clients)]["rps"] for label, cells in sweep.items() if str(clients) in cells}
    return max(rates, key=rates.get) if rates else None


# -- every system at once, measured in turn: the table -----------------------------------------------------------


def side_by_side(starts: dict[str, Callable[[], object]], model: PredictModel, sizes: Sizes,
                 progress: Progress) -> dict:
    """{name: {clients: median round's cell, with every round's req/s}} or {name: {"error"}}; never raises."""
    running, results = {}, {}
    try:
        for name, start in starts.items():
            try:
                running[name] = system = start()
                check_answer(system.connect(), model, name)
            except Exception as exc:  # noqa: BLE001
                progress(f"{name}: not run: {exc}")
                results[name] = _error(exc)
        rounds: dict[str, dict[str, list[dict]]] = {name: {} for name in running if name not in results}
        for clients in sizes.levels:
            for round_ in range(sizes.rounds):
                names = list(rounds)
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    cell = measure(running[name].connect, clients, sizes, running[name].processes)
                    rounds[name].setdefault(str(clients), []).append(cell)
                    progress(f"round {round_ + 1}: " + _line(name, cell))
        results.update({name: {level: _median_cell(cells) for level, cells in levels.items()}
                        for name, levels in rounds.items()})
        return results
    finally:
        for system in running.values():
            system.stop()


def _median_cell(cells: list[dict]) -> dict:
    ordered = sorted(cells, key=lambda c: c["rps"])
    return {**ordered[(len(ordered) - 1) // 2], "rps_rounds": [c["rps"] for c in cells]}


def round_ratios(systems: dict, numerator: str, denominator: str, clients: int) -> list[float]:
    top, bottom = systems.get(numerator, {}).get(str(clients)), systems.get(denominator, {}).get(str(clients))
    if not top or not bottom:
        return []
    return [round(a / b, 3) for a, b in zip(top["rps_rounds"], bottom["rps_rounds"]) if b]


# -- the run -----------------------------------------------------------------------------------------------------


def run(model: PredictModel, sizes: Sizes, progress: Progress, out: pathlib.Path, command: str) -> dict:
    started = time.perf_counter()
    threads, most = worker_threads(1, cores()), max(sizes.levels)
    results: dict = {"command": command, "cores": cores(), "threads": threads, "sizes": dataclasses.asdict(sizes),
                     "model": model.description, "sweeps": {}, "settings": {},
                     "forward_ms": forward_ms(model, threads)}
    progress(f"forward pass in this process (ms by rows): {results['forward_ms']}")

    def mpsd(size: int, delay_ms: float, concurrency: int | None = None):
        return lambda: MpsdSystem(mpsd_config(model, size, delay_ms, threads, concurrency))

    results["sweeps"][BATCHED] = sweep = {
        f"max_batch_size {size}, max_batch_delay {delay:g}ms": run_system(
            f"{BATCHED} ({size}, {delay:g}ms)", mpsd(size, delay), model, (most,), sizes, progress)
        for size, delay in sizes.mpsd_sweep}
    starts = {UNBATCHED: mpsd(1, 0.0), WIDE.format(most=most): mpsd(1, 0.0, most)}
    if best := best_of(sweep, most):
        size, delay = sizes.mpsd_sweep[list(sweep).index(best)]
        results["settings"][BATCHED] = best
        starts[BATCHED] = mpsd(size, delay)
        other_delay = OTHER_DELAY_MS if delay == 0 else 0.0  # what max_batch_delay trades, at every level
        starts[f"{BATCHED}, max_batch_delay {other_delay:g}ms"] = mpsd(size, other_delay)
    if sizes.peer and sizes.litserve_sweep:
        results["litserve"] = _litserve_sweep(model, sizes, threads, results, starts, progress)
    progress(f"side by side: {', '.join(starts)}; {sizes.rounds} round(s) of each cell")
    results["systems"] = systems = side_by_side(starts, model, sizes, progress)
    results["ratios"] = {f"{a} / {b}": round_ratios(systems, a, b, most)
                         for a, b in ((BATCHED, UNBATCHED), (BATCHED, LITSERVE), (BATCHED, WIDE.format(most=most)))}
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    write(results, out)
    return results


def _litserve_sweep(model: PredictModel, sizes: Sizes, threads: int, results: dict, starts: dict,
                    progress: Progress) -> dict:
    """LitServe's sweep, and its best setting added to `starts`; {"version"} or {"error"}."""
    peer, most = PEER_SPECS["litserve"], max(sizes.levels)
    try:
        version, _ = ensure_venv(peer.name, peer.packages, peer.dist, progress)
    except PeerError as exc:
        progress(f"LitServe: not run: {exc}")
        return {"error": str(exc)}
    lit = lambda size, timeout: (lambda: LitServeSystem(model, size, timeout, threads))  # noqa: E731
    results["sweeps"][LITSERVE] = sweep = {
        f"max_batch_size {size}, batch_timeout {timeout * 1000:g}ms": run_system(
            f"{LITSERVE} ({size}, {timeout * 1000:g}ms)", lit(size, timeout), model, (most,), sizes, progress)
        for size, timeout in sizes.litserve_sweep}
    if best := best_of(sweep, most):
        results["settings"][LITSERVE] = best
        starts[LITSERVE] = lit(*sizes.litserve_sweep[list(sweep).index(best)])
    return {"version": version}
