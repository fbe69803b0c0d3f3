"""mpsd's demo models: built locally on first use, so mpsd can be shown with no network and no weights in the repo.

    models.py       what each demo model is, and the one completeness check (daemon-safe)
    staging.py      build once, under a lock, in a staging dir renamed into place (daemon-safe)
    cli.py          the child-process contract the builders keep with the daemon
    corpus.py       the torch demo's text and tokenizer
    torch_model.py  the torch demo builder: `python -m mpsd.demo.torch_model OUT_DIR`
    mlx_model.py    the MLX demo builder: `python -m mpsd.demo.mlx_model OUT_DIR`
    chat_template.py  the chat template both demos serve, written into a built model (daemon-safe)

The daemon imports only what this package exports; the builders import torch
or mlx inside their functions and run in a child process.
"""

from mpsd.demo.models import DEMO_MODELS, MLX_DEMO, TORCH_DEMO, DemoModel, DemoModelError

__all__ = ["DEMO_MODELS", "MLX_DEMO", "TORCH_DEMO", "DemoModel", "DemoModelError"]
