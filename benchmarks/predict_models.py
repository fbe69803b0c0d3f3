"""The models `python -m benchmarks predict` serves, built the same way by every system, and their requests.

Two small MLPs on 256 float32 inputs, ReLU between layers, 16 outputs:

* mlp-9m (the default): hidden 2048 x 3 layers, 9.0M parameters, 36 MiB. One
  row alone is a matrix-vector product reading every weight for one row (on
  the 2-core machine here, ~1.3 ms); a batch of 32 reads them once for all its
  rows (~0.33 ms a row): the work batching saves.
* mlp-1m: hidden 1024 x 2 layers, 1.3M parameters, 5 MiB; a row alone takes
  ~0.16 ms, less than the serving around it, so batching has little to save.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INPUT_WIDTH = 256
OUTPUT_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class PredictModel:
    name: str
    factory: str      # as a torch-module config names it: 'benchmarks.predict_models:NAME'
    hidden: int
    layers: int       # hidden layers

    @property
    def description(self) -> str:
        params = (INPUT_WIDTH * self.hidden + (self.layers - 1) * self.hidden ** 2 + self.hidden * OUTPUT_WIDTH
                  + self.layers * self.hidden + OUTPUT_WIDTH)
        return (f"{self.name}: MLP {INPUT_WIDTH} -> {' -> '.join([str(self.hidden)] * self.layers)} -> "
                f"{OUTPUT_WIDTH} (ReLU), {params / 1e6:.1f}M float32 parameters, one row per request")


MODELS = {
    "mlp-9m": PredictModel("mlp-9m", "benchmarks.predict_models:mlp_9m", hidden=2048, layers=3),
    "mlp-1m": PredictModel("mlp-1m", "benchmarks.predict_models:mlp_1m", hidden=1024, layers=2),
}


def mlp_9m():
    return _mlp(MODELS["mlp-9m"])


def mlp_1m():
    return _mlp(MODELS["mlp-1m"])


def _mlp(shape: PredictModel):
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Linear(INPUT_WIDTH, shape.hidden), torch.nn.ReLU()]
    for _ in range(shape.layers - 1):
        layers += [torch.nn.Linear(shape.hidden, shape.hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(shape.hidden, OUTPUT_WIDTH))


def build(model: PredictModel):
    """The model as every system's factory makes it, for checking their answers."""
    return _mlp(model)


def request_rows(count: int, seed: int = 0) -> np.ndarray:
    """`count` different single-row inputs, [count, 1, INPUT_WIDTH]: each request sends one row."""
    return np.random.default_rng(seed).standard_normal((count, 1, INPUT_WIDTH)).astype(np.float32)
