"""Sampling stays defined at the extremes of the temperature a request may carry."""

import pytest
import torch

from mpsd.generate_params import GenerateParams
from mpsd.worker.backends import sampling

LOGITS = torch.tensor([1.5, 7.25, -3.0, 7.0])
TINIEST_FLOAT32 = 1e-45  # a valid GenerateRequest.temperature: it rounds to the smallest float32 subnormal


@pytest.mark.parametrize("top_p", [1.0, 0.5, TINIEST_FLOAT32])
def test_a_tiny_temperature_samples_the_best_token(top_p):
    generator = sampling.make_generator(3, torch.device("cpu"))
    assert {sampling.next_token(LOGITS, TINIEST_FLOAT32, top_p, generator) for _ in range(20)} == {1}


def test_a_huge_temperature_samples_every_token():
    generator = sampling.make_generator(3, torch.device("cpu"))
    assert {sampling.next_token(LOGITS, 3.4e38, 1.0, generator) for _ in range(200)} == {0, 1, 2, 3}


def test_mlx_sampler_with_a_tiny_temperature_picks_the_best_token():
    mx = pytest.importorskip("mlx.core")
    from mpsd.worker.backends.mlx_lm import _make_sampler

    logprobs = mx.array([[-2.0, -0.25, -5.0, -0.5]])
    for top_p in (1.0, 0.5):
        sampler = _make_sampler(mx, GenerateParams("x", 1, TINIEST_FLOAT32, top_p, 7, ()))
        assert {int(sampler(logprobs).item()) for _ in range(20)} == {1}
