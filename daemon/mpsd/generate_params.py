"""The meaning of a GenerateRequest: defaults and limits, shared by daemon and worker.

The daemon checks requests before they take a worker slot; the worker reads
the same values, so the two can never disagree on a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import NamedTuple

DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
MAX_STOP_SEQUENCES = 16
MAX_PROMPT_CHARS = 1_000_000


class InvalidRequest(ValueError):
    """A sentence naming the field, sent to the client as INVALID_ARGUMENT."""


class Constraint(NamedTuple):
    """A grammar every sampled token must keep the output inside (worker/agents/grammar.py compiles it)."""

    kind: str    # "json_schema" (JSON text) or "lark" (llguidance's Lark syntax)
    source: str
    field: str   # the request field it came from, named in errors


@dataclasses.dataclass(frozen=True)
class GenerateParams:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    prompt_field: str = "prompt"  # the request field the prompt came from, named in errors ("messages" for Chat)
    constraint: Constraint | None = None  # None: free sampling


def parse_generate_request(request) -> GenerateParams:
    """request: an mpsd.v1.GenerateRequest. Raises InvalidRequest."""
    if not request.prompt.strip():
        raise InvalidRequest("prompt: must not be empty")
    check_prompt_length(request.prompt, "prompt")
    return dataclasses.replace(sampling_params(request, request.prompt), constraint=_generate_constraint(request))


def _generate_constraint(request) -> Constraint | None:
    if request.json_schema and request.grammar:
        raise InvalidRequest("grammar: give json_schema or grammar, not both")
    if request.json_schema:
        return Constraint("json_schema", parse_json_schema(request.json_schema, "json_schema"), "json_schema")
    if request.grammar:
        if not request.grammar.strip():
            raise InvalidRequest("grammar: must not be blank")
        return Constraint("lark", request.grammar, "grammar")
    return None


def parse_json_schema(text: str, field: str) -> str:
    """The schema's text once it is known to be a JSON object (or true); what it may hold is the grammar engine's
    to judge, in the worker."""
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(schema, dict) and schema is not True:
        raise InvalidRequest(f"{field}: a JSON Schema must be a JSON object")
    return text


def check_prompt_length(text: str, field: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"{field}: {len(text)} characters is over the limit of {MAX_PROMPT_CHARS}")


def sampling_params(request, prompt: str) -> GenerateParams:
    """The fields Generate and Chat share (same names and numbers in both messages), checked; raises InvalidRequest."""
    max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens: must be at least 1, got {max_tokens}")
    temperature = request.temperature if request.HasField("temperature") else DEFAULT_TEMPERATURE
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"temperature: must be 0 (greedy) or more, got {temperature:g}")
    top_p = request.top_p if request.HasField("top_p") else DEFAULT_TOP_P
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p: must be in (0, 1], got {top_p:g}")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(request.stop)}")
    if any(not s for s in request.stop):
        raise InvalidRequest("stop: stop sequences must not be empty strings")
    return GenerateParams(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )


def check_against_model(params: GenerateParams, context_length: int) -> None:
    """The model-specific limit the daemon can check once a worker told it the context length."""
    if context_length and params.max_tokens > context_length:
        raise InvalidRequest(f"max_tokens: {params.max_tokens} is above the model's limit of {context_length}")
