"""The daemon's approximate picture of what each worker holds in its prefix cache, over text.

Workers cache token ids; the daemon never tokenizes, so it keeps the texts it
sent each worker (prompts, then prompts with their answers) cut into blocks of
BLOCK_CHARS characters. Each block is known by a chained hash, hash(previous
block's hash, block), so one hash stands for the whole prefix up to its block's
end, and a worker "holds" a prefix of a text as far as its hashes are in that
worker's set. Only whole blocks count: a match is a multiple of BLOCK_CHARS.

Each worker's set is an LRU bounded by MAX_CHARS_PER_WORKER characters
(MAX_BLOCKS_PER_WORKER blocks). An insert touches a text's blocks from the
last to the first, so a prefix block is always more recent than every block
that extends it: eviction takes the tips of the oldest texts first, and what
is left of any text is always a prefix of it (match relies on that). A worker
that leaves READY is forgotten. The picture is approximate (the worker evicts
by its own byte budget, hashes may collide): being wrong costs a cache miss,
never a wrong answer.

Pure: no I/O, no clock, no asyncio.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

BLOCK_CHARS = 16  # about 4 tokens of English text: what one hash stands for (a match is whole blocks)
# Characters remembered per worker (~250k tokens): more than a worker's prefix cache holds at the default budget
# for models this runs, so the picture errs towards "still cached" (a miss) rather than forgetting what is there.
MAX_CHARS_PER_WORKER = 1 << 20
MAX_BLOCKS_PER_WORKER = MAX_CHARS_PER_WORKER // BLOCK_CHARS


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[int]:
    """The chained hash of each whole block of `text`: entry k stands for text[:(k + 1) * block_chars]."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start:start + block_chars]))
        hashes.append(previous)
    return hashes


class PrefixTree:
    """Per worker, the block hashes of the texts it was sent, most recently used last."""

    def __init__(self, block_chars: int = BLOCK_CHARS, max_blocks_per_worker: int = MAX_BLOCKS_PER_WORKER) -> None:
        if block_chars < 1 or max_blocks_per_worker < 1:
            raise ValueError("block_chars and max_blocks_per_worker must be at least 1")
        self.block_chars = block_chars
        self.max_blocks = max_blocks_per_worker
        self._workers: dict[str, collections.OrderedDict[int, None]] = {}

    def hashes(self, text: str) -> list[int]:
        return block_hashes(text, self.block_chars)

    def insert(self, worker_id: str, text: str) -> None:
        """The worker now holds `text` (and so each of its prefixes)."""
        self.insert_hashes(worker_id, self.hashes(text))

    def insert_hashes(self, worker_id: str, hashes: Sequence[int]) -> None:
        blocks = self._workers.get(worker_id)
        if blocks is None:
            blocks = self._workers[worker_id] = collections.OrderedDict()
        for block in reversed(hashes):  # the first block ends up most recent: prefixes outlive their extensions
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """Characters of the text (whose block hashes these are) that each worker holding any of it holds."""
        found = {}
        for worker_id, blocks in self._workers.items():
            if hashes and hashes[0] in blocks:
                found[worker_id] = self._held(blocks, hashes) * self.block_chars
        return found

    def match(self, text: str) -> tuple[str | None, int]:
        """The worker holding the longest prefix of `text` and its length in characters; (None, 0) if none."""
        found = self.matches(self.hashes(text))
        best = max(found, key=found.__getitem__, default=None)
        return best, found.get(best, 0) if best else 0

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def cached_chars(self, worker_id: str) -> int:
        """How much text the picture says the worker holds (distinct blocks × block size)."""
        return len(self._workers.get(worker_id, ())) * self.block_chars

    @staticmethod
    def _held(blocks: collections.OrderedDict[int, None], hashes: Sequence[int]) -> int:
        """How many leading hashes are in `blocks`: a binary search, since what a worker holds is prefix-closed."""
        low, high = 1, len(hashes)  # hashes[0] is held
        while low < high:
            middle = (low + high + 1) // 2
            if hashes[middle - 1] in blocks:
                low = middle
            else:
                high = middle - 1
        return low
