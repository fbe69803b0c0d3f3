"""An engine model's keys ([[models]] with backend = "engine"), and what a GGUF path with no backend means.

An engine is a server mpsd did not write (llama-server, ds4-server,
mlx_lm.server, llama-cpp-python's server), started by the worker from
`command`, with `{port}`, `{path}`, `{state}` and `{replica}` filled per
replica. These key names are the ones docs/engines.md gives, so configs stay
portable. Whether the command exists is found out when the worker runs it: a
missing one fails that model (FATAL, the command named), not the whole daemon.
"""

from __future__ import annotations

import re
import shutil
import sys
from typing import Any

from mpsd import paths
from mpsd.config.reader import Reader
from mpsd.config.schema import DEFAULT_START_TIMEOUT_S, EngineConfig

ENGINE_KEYS = ("command", "health", "api", "start_timeout")
ENGINE_APIS = ("openai",)
PLACEHOLDERS = ("port", "path", "state", "replica")
PLACEHOLDER = re.compile(r"\{(\w+)\}")  # a name in braces; other braces (a JSON argument) pass as they are
BOOT_ALLOWANCE_S = 30.0  # the worker's own start before it runs the engine: load_timeout covers both
GGUF_SUFFIX = ".gguf"
GGUF_DEMO_REF = paths.GGUF_DEMO_MODEL_REF
LLAMA_SERVER = "llama-server"
LLAMA_SERVER_SLOTS = 4  # llama-server's --parallel: the requests it decodes together, and the worker's concurrency


def is_gguf(backend: str | None, path: str | None) -> bool:
    """A GGUF file with no backend named: llama.cpp serves it."""
    return backend is None and bool(path) and (path == GGUF_DEMO_REF or path.lower().endswith(GGUF_SUFFIX))


def llama_cpp_command(which=shutil.which, python: str = sys.executable) -> tuple[tuple[str, ...], int]:
    """llama-server where it is on PATH, else llama-cpp-python's server (the llama-cpp extra), and its concurrency:
    llama-cpp-python's server runs one request at a time."""
    common = ("--model", "{path}", "--host", "127.0.0.1", "--port", "{port}")
    server = which(LLAMA_SERVER)
    if server:
        return (server, *common, "--parallel", str(LLAMA_SERVER_SLOTS)), LLAMA_SERVER_SLOTS
    # Its default --interrupt_requests True ends a running stream whenever another request (or the prompt count
    # after a stream, worker/engine/prompt_count.py) arrives: such a stream ends with no finish reason.
    return (python, "-m", "llama_cpp.server", *common, "--interrupt_requests", "False"), 1


def read_engine(reader: Reader, table: dict[str, Any], at: str, backend: str, *, gguf: bool,
                has_path: bool) -> EngineConfig | None:
    """The engine keys of one model; None for other backends, which may not have them."""
    if backend != "engine":
        given = [key for key in ENGINE_KEYS if key in table]
        if given:
            raise reader.fail(at + given[0], "applies to backend engine only")
        return None
    concurrency = None
    if "command" in table:
        command = _command(reader, table["command"], at + "command", has_path)
    elif gguf:
        command, concurrency = llama_cpp_command()
    else:
        raise reader.fail(at + "command", "backend engine needs command = [\"server\", \"--port\", \"{port}\", ...]")
    health = reader.string(table, "health", at + "health", "")
    if health and not health.startswith("/"):
        raise reader.fail(at + "health", f"must be an HTTP path starting with '/', like '/health', got {health!r}")
    api = reader.string(table, "api", at + "api", "openai")
    if api not in ENGINE_APIS:
        raise reader.fail(at + "api", f"must be one of {', '.join(ENGINE_APIS)}, got {api!r}")
    start_timeout = reader.duration(table, "start_timeout", at + "start_timeout", DEFAULT_START_TIMEOUT_S)
    if start_timeout <= 0:
        raise reader.fail(at + "start_timeout", f"must be more than 0, got {table['start_timeout']!r}")
    return EngineConfig(command=command, health=health, api=api, start_timeout_s=start_timeout,
                        concurrency=concurrency)


def _command(reader: Reader, value: Any, key: str, has_path: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(part, str) for part in value):
        raise reader.fail(key, f"must be a non-empty array of strings, like [\"llama-server\", \"--port\", \"{{port}}\"],"
                               f" got {value!r}")
    if not value[0].strip():
        raise reader.fail(key + "[0]", "the program must not be empty")
    seen: set[str] = set()
    for index, part in enumerate(value):
        for name in PLACEHOLDER.findall(part):
            if name not in PLACEHOLDERS:
                raise reader.fail(f"{key}[{index}]", f"unknown placeholder {{{name}}} in {part!r} (known: "
                                                     f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
            seen.add(name)
    if "port" not in seen:
        raise reader.fail(key, "must pass {port} to the engine: each replica listens on a port mpsd picks for it")
    if "path" in seen and not has_path:
        raise reader.fail(key, "uses {path} but the model has no path")
    return tuple(value)


def fill_command(command: tuple[str, ...], *, port: int, path: str | None, state: str, replica: int) -> list[str]:
    """The command for one replica: each placeholder replaced, other braces left as they are."""
    values = {"port": str(port), "path": path or "", "state": state, "replica": str(replica)}
    return [PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), part) for part in command]
