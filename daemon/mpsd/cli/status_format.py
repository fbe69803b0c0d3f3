"""Status as plain data (for --json) and as a table (for people). Formatting only."""

from __future__ import annotations

import math
from typing import Any

from mpsd.units import format_bytes, format_duration

STATE_STYLES = {
    "READY": "bold green", "STARTING": "yellow", "PENDING": "yellow", "BACKOFF": "yellow", "DRAINING": "cyan",
    "STOPPED": "dim", "REFUSED": "magenta", "OOM": "bold red", "FATAL": "bold red",
}
NOTEWORTHY_STATES = ("PENDING", "STARTING", "REFUSED", "OOM", "FATAL", "BACKOFF", "DRAINING")
MODEL_HEADERS = ["MODEL", "BACKEND", "DEVICE", "READY", "MIN/MAX/LIVE/DESIRED", "QUEUED", "CONTEXT", "FOOTPRINT"]
WORKER_HEADERS = ["WORKER", "PID", "STATE", "UPTIME", "RESTARTS", "INFLIGHT", "BATCH", "KV", "CACHE", "HITS", "TOKENS",
                  "MEMORY", "BACKEND MEMORY", "LAST EXIT"]


def format_status(status: dict[str, Any]) -> str:
    """Plain text: for pipes, logs and tests."""
    lines = _heading(status) + [""]
    lines += _table(MODEL_HEADERS, _model_rows(status))
    lines.append("")
    lines += _table(WORKER_HEADERS, [_worker_row(w) for w in status["workers"]])
    lines += _notes(status)
    return "\n".join(lines)


def render_status(status: dict[str, Any]):
    """The same content for a terminal: rich tables, each state in its colour."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    models = Table(*MODEL_HEADERS, box=None, header_style="bold", pad_edge=False)
    for row in _model_rows(status):
        models.add_row(*row)
    workers = Table(*WORKER_HEADERS, box=None, header_style="bold", pad_edge=False)
    for worker in status["workers"]:
        row = _worker_row(worker)
        row[2] = Text(row[2], style=STATE_STYLES.get(worker["state"], ""))
        workers.add_row(*row)
    notes = [Text(line, style=STATE_STYLES.get(line.split(": ")[1], "")) for line in _notes(status)]
    return Group(*(Text(line) for line in _heading(status)), Text(""), models, Text(""), workers, *notes)


def _heading(status: dict[str, Any]) -> list[str]:
    daemon = status["daemon"]
    return [
        f"mpsd {daemon['version']}  pid {daemon['pid']}  up {format_duration(daemon['uptime_s'])}  "
        f"public {daemon['listen']}  config {daemon['config_path']}",
        _memory_line(status["memory"]),
        *_device_lines(status["memory"]),
    ]


def _model_rows(status: dict[str, Any]) -> list[list[str]]:
    return [[m["name"], m["backend"], m["device"], f"{m['ready']}/{m['desired']}",
             f"{m['min_replicas']}/{m['max_replicas']}/{m['live']}/{m['desired']}", f"{m['queued']}/{m['queue_limit']}",
             str(m["context_length"] or "-"), f"{format_bytes(m['footprint_bytes'])} ({m['footprint_source']})"]
            for m in status["models"]]


def _notes(status: dict[str, Any]) -> list[str]:
    """The last start or stop demand made per model, and the clean pages its workers share, counted once; why each
    worker that is not simply serving is where it is; a loading worker shows how long it has loaded; why a prefix
    cache holds less than configured."""
    lines = [f"model {m['name']}: last change: {m['last_change']}" for m in status["models"] if m.get("last_change")]
    lines += [f"model {m['name']}: {_shared_pages(m)}" for m in status["models"] if m.get("shared_bytes")]
    for worker in status["workers"]:
        if worker["state"] in NOTEWORTHY_STATES:
            elapsed = f" ({format_duration(worker['state_age_s'])} so far)" if worker["state"] == "STARTING" else ""
            lines.append(f"{worker['id']}: {worker['state']}: {worker['reason']}{elapsed}")
        if worker.get("prefix_cache_note"):
            lines.append(f"{worker['id']}: prefix cache: {worker['prefix_cache_note']}")
    return lines


def _shared_pages(model: dict[str, Any]) -> str:
    workers = model.get("shared_by", 0)
    return (f"clean shared pages {format_bytes(model['shared_bytes'])}, mapped by {workers} "
            f"worker{'' if workers == 1 else 's'}, counted once")


def format_worker(worker: dict[str, Any]) -> str:
    lines = [f"{key}: {value}" for key, value in worker.items()
             if key not in ("backend_memory", "stderr_tail", "prefix_cache", "process_memory")]
    lines.append("process_memory: " + _process_memory(worker))
    lines.append("backend_memory: " + _backend_memory(worker))
    lines.append("prefix_cache: " + _prefix_cache_detail(worker))
    lines.append(f"stderr (last {len(worker['stderr_tail'])} lines):")
    lines += [f"  | {line}" for line in worker["stderr_tail"]]
    return "\n".join(lines)


def _memory_line(memory: dict[str, Any]) -> str:
    if not memory["budget_bytes"]:
        return f"memory ({memory['probe']})"
    detail = f"  [{memory['detail']}]" if memory["detail"] else ""
    return (f"memory ({memory['probe']}): budget {format_bytes(memory['budget_bytes'])}, used "
            f"{format_bytes(memory['used_bytes'])}, headroom {format_bytes(memory['headroom_bytes'])}, "
            f"free for workers {format_bytes(memory['free_for_workers_bytes'])}{detail}")


BAR_CELLS = 20


def _device_lines(memory: dict[str, Any]) -> list[str]:
    """With several devices, one line each: a bar of used against budget, its room and the workers on it."""
    devices = memory.get("devices") or []
    if len(devices) < 2:
        return []
    width = max(len(d["device"]) for d in devices)
    return [f"  {d['device'].ljust(width)} {_bar(d['used_bytes'], d['budget_bytes'])} "
            f"{format_bytes(d['used_bytes'])}/{format_bytes(d['budget_bytes'])} used, free for workers "
            f"{format_bytes(d['free_for_workers_bytes'])}{_gpu_figures(d)}: {', '.join(d['workers']) or 'no workers'}"
            for d in devices]


def _bar(used: int, budget: int) -> str:
    filled = min(BAR_CELLS, round(BAR_CELLS * used / budget)) if budget else 0
    return "[" + "#" * filled + "." * (BAR_CELLS - filled) + "]"


def _gpu_figures(device: dict[str, Any]) -> str:
    figures = [f"{device['utilization_percent']}% busy" if device.get("utilization_percent") is not None else "",
               f"{device['temperature_c']}°C" if device.get("temperature_c") is not None else ""]
    shown = " ".join(f for f in figures if f)
    return f", {shown}" if shown else ""


def _worker_row(worker: dict[str, Any]) -> list[str]:
    state = worker["state"]
    if state == "STARTING":
        state = f"STARTING {format_duration(worker['state_age_s'])}"
    return [
        worker["id"], str(worker["pid"] or "-"), state,
        format_duration(worker["uptime_s"]) if worker["pid"] else "-",
        str(worker["restarts"]), str(worker["inflight"]), str(worker["running_sequences"]),
        format_bytes(worker["kv_bytes"]) if worker["kv_bytes"] else "-", _prefix_cache(worker),
        _hit_rate(worker.get("prefix_cache") or {}), str(worker["tokens"]),
        format_bytes(worker["memory_bytes"]) if worker["memory_bytes"] else "-",
        _backend_memory(worker), worker["last_exit"] or "-",
    ]


def _prefix_cache(worker: dict[str, Any]) -> str:
    """What the prefix cache holds of its budget now, "-" where the model keeps none (or it is configured off)."""
    cache = worker.get("prefix_cache") or {}
    if not cache.get("configured_bytes") and not cache.get("budget_bytes"):
        return "-"
    return f"{format_bytes(cache['bytes'])}/{format_bytes(cache['budget_bytes'])}"


def _hit_rate(cache: dict[str, Any]) -> str:
    """Prompt tokens the cache served of all it saw, "-" before any; halves round up, as on the status page."""
    seen = cache.get("hit_tokens", 0) + cache.get("miss_tokens", 0)
    return f"{math.floor(100 * cache['hit_tokens'] / seen + 0.5)}%" if seen else "-"


def _prefix_cache_detail(worker: dict[str, Any]) -> str:
    cache = worker.get("prefix_cache") or {}
    if _prefix_cache(worker) == "-":
        return "off"
    return (f"{_prefix_cache(worker)} held (configured {format_bytes(cache['configured_bytes'])}), "
            f"{cache['entries']} entries, hits {_hit_rate(cache)} ({cache['hit_tokens']} of "
            f"{cache['hit_tokens'] + cache['miss_tokens']} prompt tokens), {cache['evictions']} evictions")


def _process_memory(worker: dict[str, Any]) -> str:
    """Its process tree in full: the footprint (MEMORY), then what RSS, USS and PSS count, and its clean pages."""
    memory = worker.get("process_memory") or {}
    if not memory.get("processes"):
        return "-"
    kinds = " ".join(f"{kind}={format_bytes(memory[f'{kind}_bytes'])}" for kind in ("footprint", "rss", "uss", "pss"))
    count = memory["processes"]
    return f"{kinds} clean={format_bytes(memory['clean_bytes'])} ({count} process{'' if count == 1 else 'es'})"


def _backend_memory(worker: dict[str, Any]) -> str:
    if worker["backend_memory"]:
        return " ".join(f"{k}={format_bytes(v)}" for k, v in sorted(worker["backend_memory"].items()))
    return f"({worker['device'] or '?'}: none reported)"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
