"""Grammar masks computed beside the forward pass: the next token's mask depends only on the tokens taken so far.

The decode thread hands the constrained rows' grammars here before it runs
the model, and collects the masks after, all rows in one array
(matcher.masks). llguidance computes masks in Rust without holding the GIL,
and torch's forward pass releases it in its kernels, so the two overlap; with
no constrained row nothing is started.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from mpsd.worker.agents.matcher import masks


class _Done:
    def result(self) -> None:
        return None


class MaskThread:
    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # made on the first constrained step

    def start(self, rows: list[tuple[int, Any]], width: int) -> "concurrent.futures.Future | _Done":
        """rows: (row of the batch, RowGrammar) for the constrained rows; the result is (those rows, their masks as
        booleans [rows, width]), or None when no row is constrained."""
        if not rows:
            return _Done()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpsd-masks")
        indices, grammars = [row for row, _ in rows], [grammar for _, grammar in rows]
        return self._pool.submit(lambda: (indices, masks(grammars, width)))
