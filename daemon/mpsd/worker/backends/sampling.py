"""Choosing the next token from logits: greedy, temperature, nucleus (top_p).

Kept apart from the model loop so the rules are tested on hand-made logits.
"""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private RNG per request: a seed reproduces a request without touching others."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """logits: 1-D over the vocabulary.

    The largest logit is subtracted before dividing by the temperature, so the
    best token scores 0 whatever the temperature: a tiny one (1e-45 is a valid
    float) then sends the others to -inf, which is greedy. Dividing first
    overflowed every logit to +-inf and softmax gave NaN, which failed the request.
    """
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    logits = logits.float().cpu()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
