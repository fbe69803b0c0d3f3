from mpsd.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepRequest(_message.Message):
    __slots__ = ("id", "generate", "chat", "cancel", "taken", "timeout_s", "window", "stream_buffer")
    ID_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STREAM_BUFFER_FIELD_NUMBER: _ClassVar[int]
    id: int
    generate: _inference_pb2.GenerateRequest
    chat: _inference_pb2.ChatRequest
    cancel: bool
    taken: int
    timeout_s: float
    window: int
    stream_buffer: int
    def __init__(self, id: _Optional[int] = ..., generate: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., chat: _Optional[_Union[_inference_pb2.ChatRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., taken: _Optional[int] = ..., timeout_s: _Optional[float] = ..., window: _Optional[int] = ..., stream_buffer: _Optional[int] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("id", "response", "code", "details")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: _inference_pb2.GenerateResponse
    code: int
    details: str
    def __init__(self, id: _Optional[int] = ..., response: _Optional[_Union[_inference_pb2.GenerateResponse, _Mapping]] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class StepEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[StepEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[StepEvent, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("prefix_cache_budget",)
    PREFIX_CACHE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    prefix_cache_budget: int
    def __init__(self, prefix_cache_budget: _Optional[int] = ...) -> None: ...

class PrefixCacheStats(_message.Message):
    __slots__ = ("bytes", "budget_bytes", "configured_bytes", "entries", "hit_tokens", "miss_tokens", "evictions")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MISS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    budget_bytes: int
    configured_bytes: int
    entries: int
    hit_tokens: int
    miss_tokens: int
    evictions: int
    def __init__(self, bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., configured_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., miss_tokens: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "pid", "backend", "device", "context_length", "tokens", "requests", "inflight", "backend_memory", "backend_memory_note", "oom_events", "last_oom", "running_sequences", "kv_bytes", "kv_reserve_bytes", "prefix_cache", "step_messages", "predict_passes", "placed_device", "visible_devices")
    class BackendMemoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MEMORY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MEMORY_NOTE_FIELD_NUMBER: _ClassVar[int]
    OOM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_OOM_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    STEP_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PREDICT_PASSES_FIELD_NUMBER: _ClassVar[int]
    PLACED_DEVICE_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    pid: int
    backend: str
    device: str
    context_length: int
    tokens: int
    requests: int
    inflight: int
    backend_memory: _containers.ScalarMap[str, int]
    backend_memory_note: str
    oom_events: int
    last_oom: str
    running_sequences: int
    kv_bytes: int
    kv_reserve_bytes: int
    prefix_cache: PrefixCacheStats
    step_messages: int
    predict_passes: int
    placed_device: str
    visible_devices: str
    def __init__(self, worker_id: _Optional[str] = ..., pid: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., context_length: _Optional[int] = ..., tokens: _Optional[int] = ..., requests: _Optional[int] = ..., inflight: _Optional[int] = ..., backend_memory: _Optional[_Mapping[str, int]] = ..., backend_memory_note: _Optional[str] = ..., oom_events: _Optional[int] = ..., last_oom: _Optional[str] = ..., running_sequences: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_reserve_bytes: _Optional[int] = ..., prefix_cache: _Optional[_Union[PrefixCacheStats, _Mapping]] = ..., step_messages: _Optional[int] = ..., predict_passes: _Optional[int] = ..., placed_device: _Optional[str] = ..., visible_devices: _Optional[str] = ...) -> None: ...
