"""One left-padded KV cache for every decoding sequence of a Hugging Face model.

Rows of different lengths share one DynamicCache ([batch, heads, time, dim]
per layer) with a [batch, time] attention mask (0 = padding) and each row's
own position. A sequence joins after prefilling alone, by padding whichever
side is shorter on the left and concatenating; it leaves by selecting the
other rows, after which padding no row needs is cut off, so its KV memory is
freed at once. transformers 5.23 has `batch_select_indices` but no concat,
so joining edits the layers' tensors directly.
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad


class KVBatch:
    def __init__(self) -> None:
        self.cache = None                 # DynamicCache of the rows, None when empty
        self.mask: torch.Tensor | None = None  # [rows, time], long
        self.ids: list[int] = []          # sequence id of each row
        self.lengths: list[int] = []      # real tokens in each row's cache: its next position

    def __len__(self) -> int:
        return len(self.ids)

    def join(self, seq_id: int, cache) -> None:
        """Adds a prefilled sequence's own cache (batch of one) as the last row."""
        length = cache.get_seq_length()
        if self.cache is None:
            self.cache, self.mask = cache, torch.ones(1, length, dtype=torch.long)
        else:
            width = max(self.mask.shape[1], length)
            for ours, theirs in zip(self.cache.layers, cache.layers):
                ours.keys = torch.cat([_pad_time(ours.keys, width), _pad_time(theirs.keys, width)])
                ours.values = torch.cat([_pad_time(ours.values, width), _pad_time(theirs.values, width)])
            row = pad(torch.ones(1, length, dtype=torch.long), (width - length, 0))
            self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)), row])
        self.ids.append(seq_id)
        self.lengths.append(length)

    def leave(self, seq_id: int) -> None:
        index = self.ids.index(seq_id)
        keep = [i for i in range(len(self.ids)) if i != index]
        del self.ids[index], self.lengths[index]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep))
        self.mask = self.mask[keep]
        self._trim()

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask and positions for a decode step that adds one token to every row."""
        self.mask = torch.cat([self.mask, torch.ones(len(self.ids), 1, dtype=torch.long)], dim=1)
        positions = torch.tensor(self.lengths)[:, None]
        self.lengths = [length + 1 for length in self.lengths]
        return self.mask, positions

    def checkpoint(self) -> tuple[torch.Tensor, list[int]]:
        return self.mask, list(self.lengths)

    def rollback(self, checkpoint: tuple[torch.Tensor, list[int]]) -> None:
        """Undoes a decode step that failed part-way: layers it reached already hold one more column."""
        self.mask, self.lengths = checkpoint
        width = self.mask.shape[1]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]

    def row_cache(self, seq_id: int):
        """A copy of one row's real columns (its padding cut off) as a cache of its own: what the prefix cache keeps."""
        index, length = self.ids.index(seq_id), self.lengths[self.ids.index(seq_id)]
        return _cache_of([(layer.keys[index:index + 1, :, -length:], layer.values[index:index + 1, :, -length:])
                          for layer in self.cache.layers])

    def nbytes(self) -> int:
        return 0 if self.cache is None else cache_nbytes(self.cache)

    def _trim(self) -> None:
        """Drops leading columns that are padding in every row (left by a longer row that left)."""
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            self.mask = self.mask[:, lead:]


def cache_nbytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def copy_cache(cache, length: int):
    """The first `length` tokens of a one-row cache, copied: the prefix cache's entry stays as it was."""
    return _cache_of([(layer.keys[..., :length, :], layer.values[..., :length, :]) for layer in cache.layers])


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A new DynamicCache holding copies: its update() concatenates onto an empty tensor, which copies."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _pad_time(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    return pad(tensor, (0, 0, missing, 0)) if missing > 0 else tensor
