"""mpsctl status rendering from plain status data: what an operator reads, plain and on a terminal."""

from rich.console import Console

from mpsd.cli.status_format import format_status, render_status


def worker(id, state, **extra):
    base = {"id": id, "model": "big", "pid": 0, "state": state, "reason": "", "state_age_s": 0.0, "uptime_s": 0.0,
            "restarts": 0, "inflight": 0, "tokens": 0, "requests": 0, "memory_bytes": 0, "backend_memory": {},
            "backend_memory_note": "", "device": "mps", "last_exit": "", "stderr_tail": [], "oom_events": 0,
            "running_sequences": 0, "kv_bytes": 0}
    return {**base, **extra}


STATUS = {
    "daemon": {"version": "0.1.0", "pid": 42, "uptime_s": 75.0, "listen": "127.0.0.1:7700", "config_path": "mpsd.toml"},
    "memory": {"probe": "macos", "budget_bytes": 256 << 30, "used_bytes": 90 << 30, "available_bytes": 0,
               "headroom_bytes": 8 << 30, "detail": "iogpu.wired_limit_mb", "free_for_workers_bytes": 78 << 30},
    "models": [{"name": "big", "backend": "mlx-lm", "replicas": 2, "ready": 1, "queued": 3, "queue_limit": 64,
                "concurrency": 1, "device": "mps", "context_length": 8192, "footprint_bytes": 80 << 30,
                "footprint_source": "learned", "min_replicas": 0, "max_replicas": 3, "live": 1, "desired": 2,
                "last_change": "big-1 started on demand: 3 queued"}],
    "workers": [
        worker("big-0", "READY", pid=101, uptime_s=3700.0, tokens=12345, memory_bytes=81 << 30, inflight=12,
               running_sequences=12, kv_bytes=3 << 30),
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
