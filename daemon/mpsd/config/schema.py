"""The daemon's configuration as typed objects: what each section holds and its defaults.

Parsing and validating TOML into these lives beside it (parse.py for the file
and its [daemon] and [memory] tables, models.py for [[models]], reader.py for
the typed getters whose errors name the file and the key).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from mpsd.backends import BACKENDS

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
DEVICE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,62}$")  # a device as a memory probe names it
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

EMBEDDED_SOURCE = "<embedded default>"  # Config.source when no file was given
EMBEDDED_DEFAULT = """
# The embedded default: the demo model, built locally on first use, two workers.
[daemon]
listen = "127.0.0.1:7700"

[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = 2
"""


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the file."""


@dataclasses.dataclass(frozen=True)
class PublicAccess:
    """What the public port requires of callers: TLS (cert and key) and a bearer token, each optional on loopback."""

    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    token_file: pathlib.Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """Every limit of the HTTP edge, whichever address a connection came in on: what one client may hold.

    Each timeout is a deadline of its own, so bytes dribbled in one at a time
    (slowloris) never restart it; past max_connections a connection is
    answered 503 at once rather than queued behind the others.
    """

    idle_timeout_s: float = 30.0      # waiting for the first byte of a request, new connection or keep-alive
    head_timeout_s: float = 10.0      # from that first byte to the end of the request line and headers
    body_timeout_s: float = 60.0      # from the end of the head to the end of the body
    send_timeout_s: float = 30.0      # one write the client does not read: its connection is cut, no one else's
    max_connections: int = 1024
    max_body_bytes: int = 8 << 20     # fits the longest prompt mpsd takes (a million characters) as JSON, escapes and all
    max_head_bytes: int = 64 << 10    # not a key: a head past it is an attack or a bug, never a client's need


@dataclasses.dataclass(frozen=True)
class RoutingThresholds:
    """When prefix-aware routing follows the prefix and when it balances load; defaults are SGLang's router's.

    A request goes to the worker whose cached prefix covers more than
    cache_threshold of its prompt, unless the pool is imbalanced: the busiest
    worker has more than balance_abs_threshold requests in flight beyond the
    least busy and more than balance_rel_threshold times as many.
    """

    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    listen: str = "127.0.0.1:7700"
    http_listen: str = "127.0.0.1:7702"  # the HTTP edge: /v1 (OpenAI), /metrics, the status page; "" serves none
    metrics_listen: str = ""             # the same edge on one more address (old scrape configs); "" serves none
    http_limits: HttpLimits = HttpLimits()
    routing: RoutingThresholds = RoutingThresholds()
    access: PublicAccess = PublicAccess()
    state_dir: pathlib.Path | None = None
    drain_grace_s: float = 30.0
    stop_timeout_s: float = 10.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 5.0
    log_format: str = "text"
    restart_delay_s: float = 0.5
    restart_max_delay_s: float = 30.0
    restart_reset_after_s: float = 30.0
    fatal_failures: int = 5
    fatal_window_s: float = 120.0
    log_file: pathlib.Path | None = None
    log_max_bytes: int = 10 << 20
    log_backups: int = 5
    stream_buffer: int = 4096  # tokens one client stream may fall behind its worker before it alone is cut


@dataclasses.dataclass(frozen=True)
class DeviceMemoryConfig:
    """[memory.devices."cuda:1"]: one device's own budget and headroom, where devices differ."""

    device: str
    budget_bytes: int | None = None
    headroom_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    probe: str = "auto"
    budget_bytes: int | None = None  # every device's, unless its own [memory.devices] entry says otherwise
    headroom_bytes: int = 0          # kept free on every device, likewise
    min_residency_s: float = 30.0  # a worker READY for less is never evicted: the anti-thrash rule
    devices: tuple[DeviceMemoryConfig, ...] = ()

    def budget_for(self, device: str) -> int | None:
        own = self._own(device)
        return own.budget_bytes if own is not None and own.budget_bytes is not None else self.budget_bytes

    def headroom_for(self, device: str) -> int:
        own = self._own(device)
        return own.headroom_bytes if own is not None and own.headroom_bytes is not None else self.headroom_bytes

    def _own(self, device: str) -> DeviceMemoryConfig | None:
        return next((d for d in self.devices if d.device == device), None)


DEFAULT_START_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """backend = "engine": the server the worker starts and how it knows it is up (config/engines.py)."""

    command: tuple[str, ...]
    health: str = ""        # "" : /health, falling back to /v1/models
    api: str = "openai"
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    concurrency: int | None = None  # the default this command implies (llama-server's slots), if any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    path: str | None = None
    factory: str | None = None
    replicas: int = 1
    device: str = "auto"
    devices: tuple[str, ...] = ()  # device "cuda"/"auto": the GPUs placement may choose among; (): any
    concurrency: int = 1  # parsed configs take the backend's default (backends.py)
    max_batch_size: int = 1             # torch-module: Predicts stacked into one forward pass; 1: no batching
    max_batch_delay_s: float = 0.0      # how long the oldest of them waits for more (config: max_batch_delay)
    threads: int = 0
    footprint_bytes: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    queue_limit: int = 64
    load_timeout_s: float = 300.0
    memory_limit_bytes: int | None = None   # mlx-lm: mx.set_memory_limit
    wired_limit_bytes: int | None = None    # mlx-lm: mx.set_wired_limit
    cache_limit_bytes: int | None = None    # mlx-lm: mx.set_cache_limit
    # Demand (supervisor/memory/demand.py). With only `replicas` given, min = max = replicas: a static fleet, as before.
    min_replicas: int = 1
    max_replicas: int = 1
    keep_alive_s: float | None = 300.0  # idle time before a worker above min_replicas stops; None: never
    priority: int = 0                   # higher is evicted last
    scale_up_queue: int = 1             # queued requests per live worker that start one more
    # Prefix cache (worker/prefix_store.py): a size, or a fraction of the worker's measured footprint; both None: off.
    prefix_cache_bytes: int | None = None
    prefix_cache_fraction: float | None = None
    routing: str = "prefix"             # "prefix": to the worker holding the prompt's prefix; "least-loaded"
    engine: EngineConfig | None = None  # backend "engine" only: the external server its workers run

    @property
    def generates(self) -> bool:
        return BACKENDS[self.backend].generates


@dataclasses.dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    memory: MemoryConfig
    models: tuple[ModelConfig, ...]
    source: str  # file path, or EMBEDDED_SOURCE

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

