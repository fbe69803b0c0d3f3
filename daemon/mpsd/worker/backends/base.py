"""What every backend offers the worker server, independent of framework."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Protocol

from mpsd.generate_params import GenerateParams, InvalidRequest

__all__ = ["BootFailure", "Finished", "GenerateParams", "InvalidRequest", "MemoryReport", "TokenEvent"]


class BootFailure(RuntimeError):
    """The model cannot be loaded: the worker exits with EXIT_BOOT_FAILURE."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token, as a backend yields it.

    `text` is what the token adds to the answer: "" while a character or a
    possible stop sequence is incomplete, then the held-back text at once.
    """

    index: int
    token_id: int
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """Ends a generation, after the last TokenEvent; the server turns it into the stream's final message."""

    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    bytes_by_kind: dict[str, int]
    note: str = ""  # why bytes_by_kind is empty, when it is


class LanguageModel(Protocol):
    device: str
    context_length: int

    def generate(self, params: GenerateParams, keep_going: Callable[[], bool]) -> Iterator[TokenEvent | Finished]:
        """Yields TokenEvents, then one Finished, unless keep_going() turns False."""

    def warm_up(self) -> None: ...

    def memory_report(self) -> MemoryReport: ...


class TensorModel(Protocol):
    device: str

    def predict(self, inputs: dict[str, "object"]) -> dict[str, "object"]: ...

    def warm_up(self) -> None: ...

    def memory_report(self) -> MemoryReport: ...
