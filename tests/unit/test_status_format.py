"""mpsctl status rendering from plain status data: what an operator reads, plain and on a terminal."""

from rich.console import Console

from mpsd.cli.status_format import format_status, format_worker, render_status


def worker(id, state, **extra):
    base = {"id": id, "model": "big", "pid": 0, "state": state, "reason": "", "state_age_s": 0.0, "uptime_s": 0.0,
            "restarts": 0, "inflight": 0, "tokens": 0, "requests": 0, "memory_bytes": 0, "backend_memory": {},
            "backend_memory_note": "", "device": "mps", "last_exit": "", "stderr_tail": [], "oom_events": 0,
            "running_sequences": 0, "kv_bytes": 0, "prefix_cache": cache(), "prefix_cache_note": ""}
    return {**base, **extra}


def cache(**figures):
    return {"bytes": 0, "budget_bytes": 0, "configured_bytes": 0, "entries": 0, "hit_tokens": 0, "miss_tokens": 0,
            "evictions": 0, **figures}


STATUS = {
    "daemon": {"version": "0.1.0", "pid": 42, "uptime_s": 75.0, "listen": "127.0.0.1:7700", "config_path": "mpsd.toml"},
    "memory": {"probe": "macos", "budget_bytes": 256 << 30, "used_bytes": 90 << 30, "available_bytes": 0,
               "headroom_bytes": 8 << 30, "detail": "iogpu.wired_limit_mb", "free_for_workers_bytes": 78 << 30},
    "models": [{"name": "big", "backend": "mlx-lm", "replicas": 2, "ready": 1, "queued": 3, "queue_limit": 64,
                "concurrency": 1, "device": "mps", "context_length": 8192, "footprint_bytes": 80 << 30,
                "footprint_source": "learned", "min_replicas": 0, "max_replicas": 3, "live": 1, "desired": 2,
                "last_change": "big-1 started on demand: 3 queued", "shared_bytes": 3460300, "shared_by": 2}],
    "workers": [
        worker("big-0", "READY", pid=101, uptime_s=3700.0, tokens=12345, memory_bytes=81 << 30, inflight=12,
               running_sequences=12, kv_bytes=3 << 30,
               prefix_cache=cache(bytes=12 << 20, budget_bytes=153 << 20, configured_bytes=2 << 30, entries=4,
                                  hit_tokens=300, miss_tokens=100, evictions=1),
               prefix_cache_note="shrunk to 153.0MiB of 2.0GiB to make room for big-1",
               process_memory={"footprint_bytes": 81 << 30, "rss_bytes": 90 << 30, "uss_bytes": 85 << 30,
                               "pss_bytes": 86 << 30, "clean_bytes": 9 << 30, "processes": 3}),
        worker("big-1", "STARTING", pid=102, state_age_s=95.0, reason="admitted; loading the model"),
    ],
}


def test_a_loading_worker_shows_how_long_it_has_been_loading():
    text = format_status(STATUS)
    assert "STARTING 1m35s" in text
    assert "big-1: STARTING: admitted; loading the model (1m35s so far)" in text
    assert "1/2" in text and "3/64" in text and "80.0GiB (learned)" in text and "big-0: READY" not in text
    assert "0/3/1/2" in text and "model big: last change: big-1 started on demand: 3 queued" in text


def test_the_terminal_table_has_the_same_content_with_states_in_colour():
    console = Console(record=True, width=200, force_terminal=True, color_system="standard")
    console.print(render_status(STATUS))
    plain = console.export_text(clear=False)
    assert "STARTING 1m35s" in plain and "big-0" in plain and "12345" in plain and "3.0GiB" in plain
    coloured = console.export_text(styles=True)
    assert "\x1b[1;32mREADY" in coloured and "\x1b[33mSTARTING 1m35s" in coloured


def cells(text: str, worker_id: str, *headers: str) -> list[str]:
    """The cells of one worker's row under the given headers (the plain table aligns each under its header)."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("WORKER "))
    row = next(line for line in lines if line.startswith(worker_id + " "))
    return [row[header.index(h):].split("  ")[0].strip() for h in headers]


def test_each_worker_shows_its_prefix_cache_held_of_its_budget_its_hit_rate_and_why_it_was_shrunk():
    text = format_status(STATUS)
    assert cells(text, "big-0", "CACHE", "HITS") == ["12.0MiB/153.0MiB", "75%"]
    assert cells(text, "big-1", "CACHE", "HITS") == ["-", "-"], "no cache reported: '-', not 0B/0B or 0%"
    assert "big-0: prefix cache: shrunk to 153.0MiB of 2.0GiB to make room for big-1" in text
    assert not any(line.startswith("big-1: prefix cache") for line in text.splitlines())


def test_a_cache_budget_shrunk_to_nothing_still_shows_and_hits_need_a_prompt_first():
    status = {**STATUS, "workers": [worker("big-0", "READY", pid=101, prefix_cache=cache(configured_bytes=1 << 30)),
                                    worker("big-1", "READY", pid=102)]}
    text = format_status(status)
    assert cells(text, "big-0", "CACHE", "HITS") == ["0B/0B", "-"]
    assert cells(text, "big-1", "CACHE", "HITS") == ["-", "-"]
    half = {**STATUS, "workers": [worker("big-0", "READY", pid=101, prefix_cache=cache(
        configured_bytes=1 << 30, budget_bytes=1 << 30, hit_tokens=1, miss_tokens=7))]}
    assert cells(format_status(half), "big-0", "HITS") == ["13%"], "12.5% rounds up, as the page's Math.round does"


def test_status_from_a_daemon_without_prefix_cache_fields_still_renders():
    old = {key: value for key, value in worker("big-0", "READY", pid=101).items() if not key.startswith("prefix")}
    assert cells(format_status({**STATUS, "workers": [old]}), "big-0", "CACHE", "HITS") == ["-", "-"]
    assert "prefix_cache: off" in format_worker(old)


def test_the_terminal_table_shows_the_cache_and_its_note():
    console = Console(record=True, width=250, force_terminal=True, color_system="standard")
    console.print(render_status(STATUS))
    plain = console.export_text()
    assert "12.0MiB/153.0MiB" in plain and "75%" in plain and "big-0: prefix cache: shrunk" in plain


def test_the_worker_detail_spells_out_its_prefix_cache():
    detail = format_worker(STATUS["workers"][0])
    assert ("prefix_cache: 12.0MiB/153.0MiB held (configured 2.0GiB), 4 entries, hits 75% (300 of 400 prompt "
            "tokens), 1 evictions") in detail
    assert "prefix_cache_note: shrunk to 153.0MiB" in detail and "{" not in detail


def test_a_models_clean_shared_pages_are_noted_once_and_a_worker_detail_spells_out_its_process_tree():
    text = format_status(STATUS)
    assert "model big: clean shared pages 3.3MiB, mapped by 2 workers, counted once" in text
    assert cells(text, "big-0", "MEMORY") == ["81.0GiB"], "the footprint, clean pages left out"
    assert "clean shared" not in format_status({**STATUS, "models": [{**STATUS["models"][0], "shared_bytes": 0}]})
    detail = format_worker(STATUS["workers"][0])
    assert "process_memory: footprint=81.0GiB rss=90.0GiB uss=85.0GiB pss=86.0GiB clean=9.0GiB (3 processes)" in detail
    assert "process_memory: -" in format_worker(STATUS["workers"][1])


def device(name, budget, used, free, workers, **extra):
    return {"device": name, "budget_bytes": budget, "used_bytes": used, "available_bytes": budget - used,
            "headroom_bytes": 0, "free_for_workers_bytes": free, "detail": "", "workers": workers,
            "utilization_percent": None, "temperature_c": None, **extra}


def test_several_devices_get_a_bar_each_with_their_workers_and_gpu_figures():
    gpus = [device("cuda:0", 80 << 30, 40 << 30, 40 << 30, ["big-0"], utilization_percent=87, temperature_c=61),
            device("cuda:1", 80 << 30, 0, 80 << 30, [])]
    status = {**STATUS, "memory": {**STATUS["memory"], "devices": gpus}}
    lines = format_status(status).splitlines()
    assert lines[2] == "  cuda:0 [##########..........] 40.0GiB/80.0GiB used, free for workers 40.0GiB, 87% busy 61°C: big-0"
    assert lines[3] == "  cuda:1 [....................] 0B/80.0GiB used, free for workers 80.0GiB: no workers"
    one = {**STATUS, "memory": {**STATUS["memory"], "devices": gpus[:1]}}
    assert "cuda:0 [" not in format_status(one), "one device: the memory line says it all"
