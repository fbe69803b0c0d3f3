from mpsd.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerLogsRequest(_message.Message):
    __slots__ = ("worker_id", "lines", "follow")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lines: int
    follow: bool
    def __init__(self, worker_id: _Optional[str] = ..., lines: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("text", "pid")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    text: str
    pid: int
    def __init__(self, text: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("model", "replicas", "min_replicas", "max_replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: int
    min_replicas: int
    max_replicas: int
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ...) -> None: ...

class WorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlResponse(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DaemonStatus(_message.Message):
    __slots__ = ("version", "pid", "uptime_s", "listen", "state_dir", "config_path")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    STATE_DIR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    uptime_s: float
    listen: str
    state_dir: str
    config_path: str
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_s: _Optional[float] = ..., listen: _Optional[str] = ..., state_dir: _Optional[str] = ..., config_path: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "backend", "replicas", "ready", "queued", "queue_limit", "concurrency", "device", "context_length", "footprint_bytes", "footprint_source", "min_replicas", "max_replicas", "live", "desired", "last_change", "priority", "shared_bytes", "shared_by")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    replicas: int
    ready: int
    queued: int
    queue_limit: int
    concurrency: int
    device: str
    context_length: int
    footprint_bytes: int
    footprint_source: str
    min_replicas: int
    max_replicas: int
    live: int
    desired: int
    last_change: str
    priority: int
    shared_bytes: int
    shared_by: int
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., replicas: _Optional[int] = ..., ready: _Optional[int] = ..., queued: _Optional[int] = ..., queue_limit: _Optional[int] = ..., concurrency: _Optional[int] = ..., device: _Optional[str] = ..., context_length: _Optional[int] = ..., footprint_bytes: _Optional[int] = ..., footprint_source: _Optional[str] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., live: _Optional[int] = ..., desired: _Optional[int] = ..., last_change: _Optional[str] = ..., priority: _Optional[int] = ..., shared_bytes: _Optional[int] = ..., shared_by: _Optional[int] = ...) -> None: ...

class MemoryStatus(_message.Message):
    __slots__ = ("probe", "budget_bytes", "used_bytes", "available_bytes", "headroom_bytes", "detail", "free_for_workers_bytes", "devices")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FREE_FOR_WORKERS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    probe: str
    budget_bytes: int
    used_bytes: int
    available_bytes: int
    headroom_bytes: int
    detail: str
    free_for_workers_bytes: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceMemory]
    def __init__(self, probe: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., headroom_bytes: _Optional[int] = ..., detail: _Optional[str] = ..., free_for_workers_bytes: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceMemory, _Mapping]]] = ...) -> None: ...

class DeviceMemory(_message.Message):
    __slots__ = ("device", "budget_bytes", "used_bytes", "available_bytes", "headroom_bytes", "free_for_workers_bytes", "detail", "workers", "utilization_percent", "temperature_c")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_FOR_WORKERS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    device: str
    budget_bytes: int
    used_bytes: int
    available_bytes: int
    headroom_bytes: int
    free_for_workers_bytes: int
    detail: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    utilization_percent: int
    temperature_c: int
    def __init__(self, device: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., headroom_bytes: _Optional[int] = ..., free_for_workers_bytes: _Optional[int] = ..., detail: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ..., utilization_percent: _Optional[int] = ..., temperature_c: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("id", "model", "pid", "state", "reason", "state_age_s", "uptime_s", "restarts", "inflight", "tokens", "requests", "memory_bytes", "backend_memory", "backend_memory_note", "device", "last_exit", "stderr_tail", "oom_events", "running_sequences", "kv_bytes", "prefix_cache", "prefix_cache_note", "process_memory", "step_messages", "placed_device", "visible_devices", "predict_passes")
    class BackendMemoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MEMORY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MEMORY_NOTE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    OOM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_NOTE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_MEMORY_FIELD_NUMBER: _ClassVar[int]
    STEP_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PLACED_DEVICE_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    PREDICT_PASSES_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    pid: int
    state: str
    reason: str
    state_age_s: float
    uptime_s: float
    restarts: int
    inflight: int
    tokens: int
    requests: int
    memory_bytes: int
    backend_memory: _containers.ScalarMap[str, int]
    backend_memory_note: str
    device: str
    last_exit: str
    stderr_tail: _containers.RepeatedScalarFieldContainer[str]
    oom_events: int
    running_sequences: int
    kv_bytes: int
    prefix_cache: _worker_pb2.PrefixCacheStats
    prefix_cache_note: str
    process_memory: ProcessMemory
    step_messages: int
    placed_device: str
    visible_devices: str
    predict_passes: int
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., state_age_s: _Optional[float] = ..., uptime_s: _Optional[float] = ..., restarts: _Optional[int] = ..., inflight: _Optional[int] = ..., tokens: _Optional[int] = ..., requests: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., backend_memory: _Optional[_Mapping[str, int]] = ..., backend_memory_note: _Optional[str] = ..., device: _Optional[str] = ..., last_exit: _Optional[str] = ..., stderr_tail: _Optional[_Iterable[str]] = ..., oom_events: _Optional[int] = ..., running_sequences: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., prefix_cache: _Optional[_Union[_worker_pb2.PrefixCacheStats, _Mapping]] = ..., prefix_cache_note: _Optional[str] = ..., process_memory: _Optional[_Union[ProcessMemory, _Mapping]] = ..., step_messages: _Optional[int] = ..., placed_device: _Optional[str] = ..., visible_devices: _Optional[str] = ..., predict_passes: _Optional[int] = ...) -> None: ...

class ProcessMemory(_message.Message):
    __slots__ = ("footprint_bytes", "rss_bytes", "uss_bytes", "pss_bytes", "clean_bytes", "processes")
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    USS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLEAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    footprint_bytes: int
    rss_bytes: int
    uss_bytes: int
    pss_bytes: int
    clean_bytes: int
    processes: int
    def __init__(self, footprint_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., uss_bytes: _Optional[int] = ..., pss_bytes: _Optional[int] = ..., clean_bytes: _Optional[int] = ..., processes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("daemon", "models", "memory", "workers")
    DAEMON_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    daemon: DaemonStatus
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    memory: MemoryStatus
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, daemon: _Optional[_Union[DaemonStatus, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., memory: _Optional[_Union[MemoryStatus, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...
