"""`python -m benchmarks http_edge`: mpsd's HTTP edge (its h11 server) against aiohttp.web and uvicorn+starlette.

Three figures for each server, in one run, the servers alternated over rounds (each round in a rotated order):

* RSS of a daemon-like process (peer_servers/http_edge_app.py: grpc.aio server with health, prometheus_client,
  psutil, mpsd.config, then the HTTP library in the same loop), after a warm-up and again after the load;
* SSE tokens/s at 16 concurrent streams, each event an OpenAI completion chunk made on the event loop from an
  asyncio source with no model, so the HTTP layer is what is measured;
* the round trip of a small non-streamed JSON request on one keep-alive connection, p50 and p99, sequential.

Every server runs in the same interpreter and venv (benchmarks/.peers/http-edge, mpsd installed into it), and the
client (http_edge_client.py, raw asyncio sockets) is one process of its own, the same for all. Figures are medians
over the rounds, with ratios against h11; the load of other jobs on the machine during each load is kept beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from benchmarks import interference
from benchmarks.peer_install import PEERS_DIR, PROJECT, PeerError, ensure_venv, last_text_line, venv_python
from benchmarks.servers import ServerProcess
from benchmarks.settings import cores

VENV = "http-edge"
# The daemon's own planes (pinned by constraints.txt) and the HTTP libraries, pinned here.
PACKAGES = ("grpcio", "grpcio-health-checking", "prometheus-client", "protobuf", "psutil", "h11",
            "aiohttp==3.14.5", "uvicorn==0.55.0", "starlette==1.10.0", "httptools==0.9.0")
VERSIONS_OF = ("h11", "aiohttp", "uvicorn", "starlette", "httptools", "grpcio", "prometheus-client", "multidict",
               "yarl", "anyio", "click")
SERVERS = ("h11", "aiohttp", "uvicorn-h11", "uvicorn-httptools")
BASELINE = "h11"
APP = pathlib.Path(__file__).resolve().parent / "peer_servers" / "http_edge_app.py"
CLIENT_TIMEOUT_S = 180
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Sizes:
    rounds: int = 5
    streams: int = 16
    events: int = 2000      # per stream, per pass
    passes: int = 3
    requests: int = 3000    # sequential small requests

    @classmethod
    def tiny(cls) -> Sizes:
        """The smoke test's: every figure, almost no time."""
        return cls(rounds=1, streams=4, events=20, passes=1, requests=20)


def run(sizes: Sizes, progress: Callable[[str], None], out: pathlib.Path, servers: tuple[str, ...] = SERVERS,
        command: str = "") -> dict:
    """Measures every server, writes results.json under out, returns the results."""
    started = time.perf_counter()
    python, versions, install = _interpreter(servers, progress)
    cells: dict[str, list[dict]] = {name: [] for name in servers}
    errors: dict[str, str] = dict(install.get("errors", {}))
    for round_index in range(sizes.rounds):
        order = [name for name in servers[round_index % len(servers):] + servers[:round_index % len(servers)]
                 if name not in errors]
        for name in order:
            try:
                cell = _measure_one(name, python, sizes)
            except PeerError as exc:
                errors[name] = str(exc)
                progress(f"{name}: not measured: {exc}")
                continue
            cells[name].append(cell)
            progress(f"round {round_index + 1}/{sizes.rounds} {name}: {_cell_line(cell)}")
    results = {
        "servers": {name: _summary(cells[name]) | {"cells": cells[name]} for name in servers if cells[name]},
        "errors": errors,
        "versions": versions,
        "sizes": dataclasses.asdict(sizes),
        "install_s": install.get("install_s", 0.0),
        "machine": {"cores": cores(), "python": platform.python_version(), "platform": platform.platform()},
        "elapsed_s": round(time.perf_counter() - started, 1),
        "command": command,
    }
    results["ratios_vs_h11"] = _ratios(results["servers"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _interpreter(servers: tuple[str, ...], progress) -> tuple[str, dict, dict]:
    """The python every server runs in: the http-edge venv's, or, for h11 alone (the smoke test), this one."""
    if servers == (BASELINE,):
        return sys.executable, _versions(sys.executable), {}
    try:
        _, install_s = ensure_venv(VENV, PACKAGES, "aiohttp", progress, base=())
    except PeerError as exc:
        progress(f"{VENV}: install failed ({exc}); measuring h11 alone, in this interpreter")
        errors = {name: f"not installed: {exc}" for name in servers if name != BASELINE}
        return sys.executable, _versions(sys.executable), {"errors": errors}
    python = str(venv_python(VENV))
    return python, _versions(python), {"install_s": round(install_s, 1)}


def _versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            f"names = {list(VERSIONS_OF)!r}\n"
            "found = {}\n"
            "for n in names:\n"
            "    try: found[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "found['python'] = sys.version.split()[0]\n"
            "print(json.dumps(found))")
    result = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _measure_one(name: str, python: str, sizes: Sizes) -> dict:
    log_path = PEERS_DIR / VENV / f"server-{name}.log"
    server = ServerProcess(f"http-edge {name}", [python, str(APP), "--server", name], log_path,
                           env={"PYTHONPATH": str(PROJECT / "daemon")}, ready_line=b"EDGE-READY")
    try:
        ready = _ready_figures(log_path)
        pid = server.process.pid
        _client(server.port, pid, "warmup", sizes)
        rss_warm = psutil.Process(pid).memory_info().rss
        before = interference.snapshot()
        load = _client(server.port, pid, "load", sizes)
        others = interference.others_cores(before, interference.snapshot())
        rss_after = psutil.Process(pid).memory_info().rss
    finally:
        server.stop()
    return {"rss_before_http_bytes": ready["rss_before_http_bytes"], "rss_serving_bytes": ready["rss_serving_bytes"],
            "rss_warm_bytes": rss_warm, "rss_after_load_bytes": rss_after, "sse": load["sse"],
            "latency_ms": load["latency"], "others_cores": others}


def _ready_figures(log_path: pathlib.Path) -> dict:
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("EDGE-READY "):
            return json.loads(line.removeprefix("EDGE-READY "))
    raise PeerError(f"no EDGE-READY line in {log_path}")


def _client(port: int, server_pid: int, phase: str, sizes: Sizes) -> dict:
    command = [sys.executable, "-m", "benchmarks.http_edge_client", "--port", str(port), "--server-pid",
               str(server_pid), "--phase", phase, "--streams", str(sizes.streams), "--events", str(sizes.events),
               "--passes", str(sizes.passes), "--requests", str(sizes.requests)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        result = subprocess.run(command, check=False, cwd=str(PROJECT), capture_output=True, text=True,
                                timeout=CLIENT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PeerError(f"the client's {phase} took over {CLIENT_TIMEOUT_S}s") from None
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1]) if lines else {"error": last_text_line(result.stderr) or "no output"}
    if result.returncode != 0 or "error" in figures:
        raise PeerError(f"client {phase}: {figures.get('error') or last_text_line(result.stderr)}")
    return figures


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _summary(cells: list[dict]) -> dict:
    """Medians over the rounds."""
    if not cells:
        return {}
    def mib(key: str) -> float:
        return _median([c[key] / MIB for c in cells])

    return {"rss_before_http_mib": mib("rss_before_http_bytes"), "rss_serving_mib": mib("rss_serving_bytes"),
            "rss_warm_mib": mib("rss_warm_bytes"), "rss_after_load_mib": mib("rss_after_load_bytes"),
            "http_rss_mib": _median([(c["rss_after_load_bytes"] - c["rss_before_http_bytes"]) / MIB for c in cells]),
            "sse_tps": _median([c["sse"]["tps"] for c in cells]),
            "sse_tps_rounds": [c["sse"]["tps"] for c in cells],
            "sse_server_cpu_ms_per_1k_tokens": _median_or_none([c["sse"]["server_cpu_ms_per_1k_tokens"] for c in cells]),
            "p50_ms": _median([c["latency_ms"]["p50"] for c in cells]),
            "p99_ms": _median([c["latency_ms"]["p99"] for c in cells]),
            "server_cpu_ms_per_request": _median_or_none([c["latency_ms"]["server_cpu_ms_per_request"] for c in cells]),
            "others_cores": [c["others_cores"] for c in cells], "rounds": len(cells)}


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return _median(known) if known else None


def _ratios(servers: dict) -> dict:
    base = servers.get(BASELINE)
    if not base:
        return {}
    keys = ("rss_warm_mib", "rss_after_load_mib", "sse_tps", "p50_ms", "p99_ms")
    return {name: {key: round(figures[key] / base[key], 3) for key in keys if base[key]}
            for name, figures in servers.items()}


def _cell_line(cell: dict) -> str:
    return (f"RSS {cell['rss_warm_bytes'] / MIB:.1f} / {cell['rss_after_load_bytes'] / MIB:.1f} MiB, "
            f"SSE {cell['sse']['tps']:,.0f} tok/s, p50/p99 {cell['latency_ms']['p50']:.3f}/"
            f"{cell['latency_ms']['p99']:.3f} ms, others {cell['others_cores']} cores")


def table(results: dict) -> str:
    """The markdown table docs/performance.md shows."""
    versions = results["versions"]
    labels = {"h11": f"mpsd HttpServer (h11 {versions.get('h11', '?')})",
              "aiohttp": f"aiohttp.web {versions.get('aiohttp', '?')}",
              "uvicorn-h11": f"uvicorn {versions.get('uvicorn', '?')} (h11) + starlette {versions.get('starlette', '?')}",
              "uvicorn-httptools": f"uvicorn {versions.get('uvicorn', '?')} (httptools {versions.get('httptools', '?')})"
                                   f" + starlette {versions.get('starlette', '?')}"}
    ratios, streams = results["ratios_vs_h11"], results["sizes"]["streams"]
    header = (f"| server | RSS after warm-up / after load, MiB | HTTP library's share, MiB | SSE tok/s, {streams} "
              "streams | server CPU ms per 1k SSE tokens | small JSON p50 / p99, ms | server CPU ms per request |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for name, s in results["servers"].items():
        r = ratios.get(name, {})
        rows.append(f"| {labels.get(name, name)} | {s['rss_warm_mib']:.1f} / {s['rss_after_load_mib']:.1f} "
                    f"({r.get('rss_after_load_mib', 0):.2f}x) | {s['http_rss_mib']:+.1f} | {s['sse_tps']:,.0f} "
                    f"({r.get('sse_tps', 0):.2f}x) | {s['sse_server_cpu_ms_per_1k_tokens']} | {s['p50_ms']:.3f} / "
                    f"{s['p99_ms']:.3f} ({r.get('p50_ms', 0):.2f}x / {r.get('p99_ms', 0):.2f}x) | "
                    f"{s['server_cpu_ms_per_request']} |")
    for name, why in results["errors"].items():
        rows.append(f"| {labels.get(name, name)} | not measured: {why} | | | | | |")
    return "\n".join(rows)
