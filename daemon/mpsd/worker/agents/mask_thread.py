"""Grammar masks computed beside the forward pass: the next token's mask depends only on the tokens taken so far.

The decode thread hands the constrained rows' grammars here before it runs
the model, and collects the masks after. llguidance computes a mask in Rust
without holding the GIL, and torch's forward pass releases it in its kernels,
so the two overlap; with no constrained row nothing is started.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np


class _Done:
    def result(self) -> dict:
        return {}


class MaskThread:
    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # made on the first constrained step

    def start(self, grammars: dict[int, Any]) -> "concurrent.futures.Future[dict[int, np.ndarray]] | _Done":
        """grammars: sequence id -> RowGrammar; the result maps each id to its mask of allowed tokens."""
        if not grammars:
            return _Done()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpsd-masks")
        return self._pool.submit(lambda: {seq_id: grammar.allowed() for seq_id, grammar in grammars.items()})
