"""Constrained decoding with llguidance: a grammar compiled once per text, a token mask per row per step.

llguidance (the engine behind guidance, used by vLLM and SGLang) was chosen
over xgrammar: it installs as one wheel on Linux and macOS with no torch
dependency, compiles a JSON Schema in about a millisecond (no per-schema
precomputation over the vocabulary), computes a mask in tens of microseconds
on the demo's vocabulary (`python -m benchmarks constrained` measures it),
says which JSON Schema feature it does not support, and reads Lark with JSON
Schemas inside it, which is how a tool call's framing and its arguments become
one grammar.

GrammarCompiler belongs to a worker (one tokenizer). It compiles on the thread
that reads the daemon's requests, not the decode thread, so compiling never
delays the batch; a compiled grammar is kept (least recently used out, by its
text) and each request gets a copy of its matcher, which costs microseconds.
RowGrammar is one request's state, used only by the decode thread: the mask
for its next token, then the token it took.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from mpsd.generate_params import Constraint, InvalidRequest
from mpsd.worker.agents.grammar import CannotConstrain, generate_grammar, quoted

COMPILED_KEPT = 64  # grammars kept compiled: a tool set or a schema a client repeats compiles once


class WorkerGrammars:
    """The worker's compiler, made on the first constrained request (llguidance loads only where it is used)."""

    def __init__(self, model: Any, backend_name: str) -> None:
        self._model, self._backend = model, backend_name
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self) -> "GrammarCompiler":
        with self._lock:
            if self._compiler is None:
                tokenizer = getattr(self._model, "grammar_tokenizer", lambda: None)()
                if tokenizer is None:
                    raise CannotConstrain(f"workers of backend {self._backend!r} cannot constrain their output "
                                          "(torch-lm and mlx-lm can)")
                self._compiler = GrammarCompiler(tokenizer, self._model.logits_width)
            return self._compiler

    def row(self, constraint: Constraint) -> "RowGrammar":
        try:
            return self.compiler().row(constraint)
        except CannotConstrain as exc:
            raise CannotConstrain(f"{constraint.field}: {exc}; leave it out") from None

    def special_literal(self, text: str) -> str:
        return self.compiler().special_literal(text)


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        """tokenizer: the model's Hugging Face tokenizer; vocab_size: the model's logits width (may exceed it)."""
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size, len(tokenizer)))
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (not found kept): what the TTFT of a new schema pays for

    def special_literal(self, text: str) -> str:
        """A marker's Lark term: the special token it is, where the vocabulary has it as one, else the text."""
        ids = self._hf.convert_tokens_to_ids([text])
        token_id = ids[0] if ids else None
        special = set(getattr(self._hf, "all_special_ids", ()) or ())
        if isinstance(token_id, int) and token_id != getattr(self._hf, "unk_token_id", None) and token_id in special:
            return f"<[{token_id}]>"
        return quoted(text)

    def row(self, constraint: Constraint) -> "RowGrammar":
        """A fresh matcher for one request; raises InvalidRequest naming the field when the grammar is refused."""
        text = generate_grammar(constraint) if constraint.kind == "json_schema" else constraint.source
        with self._lock:
            template = self._compiled.get(text)
            if template is not None:
                self._compiled.move_to_end(text)
        if template is None:
            template = self._compile(text, constraint.field)
            with self._lock:
                self._compiled[text] = template
                self.compiled += 1
                while len(self._compiled) > COMPILED_KEPT:
                    self._compiled.popitem(last=False)
        return RowGrammar(template.deep_copy(), self._tokenizer.vocab_size, self.vocab_size)

    def _compile(self, text: str, field: str):
        matcher_class = self._llguidance.LLMatcher
        grammar = matcher_class.grammar_from_lark(text)
        problem = matcher_class.validate_grammar(grammar, self._tokenizer)
        if not problem:
            matcher = matcher_class(self._tokenizer, grammar)
            problem = matcher.get_error() if matcher.is_error() else ""
        if problem:
            raise InvalidRequest(f"{field}: {_first_line(problem, field)}")
        return matcher


class RowGrammar:
    """One sequence's place in its grammar; the decode thread's alone once the request is handed in."""

    def __init__(self, matcher, tokenizer_vocab: int, logits_width: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.tokenizer_vocab = tokenizer_vocab
        self._width = logits_width
        self._bitmask = allocate_token_bitmask(1, tokenizer_vocab)
        self.consumed = 0

    @property
    def stopped(self) -> bool:
        """The grammar is complete and nothing may follow: the sequence ends here."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """What was generated so far is a whole sentence of the grammar (it parses)."""
        return self.matcher.is_accepting()

    def bitmask(self):
        """The next token's mask as llguidance packs it: int32 words, bit i of word w allowing token 32 * w + i."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        return self._bitmask[0]

    def allowed(self, width: int | None = None):
        """Which of the model's tokens may come next, as a numpy array of booleans over the logits' width (extra
        columns: never)."""
        import numpy as np

        bits = np.unpackbits(self.bitmask().view(np.uint8), bitorder="little")
        width = width or self._width
        allowed = np.zeros(width, dtype=bool)
        size = min(width, self.tokenizer_vocab)
        allowed[:size] = bits[:size]
        return allowed

    def consume(self, token_id: int) -> None:
        """The token the row took (it was allowed: the mask said so); after the grammar stopped, nothing changes."""
        self.consumed += 1
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)


_executor = None  # llguidance's own thread pool for many rows' masks at once, made on first use


def _llexecutor():
    import llguidance

    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


def consume_all(taken: list[tuple["RowGrammar", int]]) -> None:
    """Each row's grammar takes its row's token, in one call (a grammar already stopped takes nothing)."""
    live = [(grammar, token) for grammar, token in taken if not grammar.matcher.is_stopped()]
    for grammar, _ in taken:
        grammar.consumed += 1
    if live:
        _llexecutor().consume_token_par([(grammar.matcher, token) for grammar, token in live])


def masks(grammars: list["RowGrammar"], width: int):
    """Every row's next-token mask at once, as booleans [rows, width]: one call into llguidance, which spreads the
    rows over its threads without the GIL, and one unpack."""
    import numpy as np

    vocab = grammars[0].tokenizer_vocab
    words = np.full((len(grammars), (vocab + 31) // 32), -1, dtype=np.int32)
    _llexecutor().unsafe_compute_mask_ptr([(g.matcher, row) for row, g in enumerate(grammars)], words.ctypes.data,
                                      words.shape[1] * 4, len(grammars))
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    allowed = np.zeros((len(grammars), width), dtype=bool)
    size = min(width, vocab)
    allowed[:, :size] = bits[:, :size]
    return allowed


def _first_line(problem: str, field: str) -> str:
    """llguidance's message without the position in the Lark text mpsd wrote around the user's schema."""
    lines = [line for line in problem.strip().splitlines() if line.strip()]
    first = lines[0] if lines else problem
    if field == "grammar":
        return "\n".join(lines)
    if first.startswith("at ") and ": " in first:
        first = first.split(": ", 1)[1]
    return "the grammar engine (llguidance) cannot enforce this schema: " + first.removeprefix(
        "failed to compile JSON schema: ")
