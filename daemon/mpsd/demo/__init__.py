"""mpsd's demo models: built locally on first use, so mpsd can be shown with no network and no weights in the repo.

    models.py       what each demo model is, and the one completeness check (daemon-safe)
    staging.py      build once, under a lock, in a staging dir renamed into place (daemon-safe)
    cli.py          the child-process contract the builders keep with the daemon
    corpus.py       the torch demo's text and tokenizer
    torch_model.py  the torch demo builder: `python -m mpsd.demo.torch_model OUT_DIR`
    mlx_model.py    the MLX demo builder: `python -m mpsd.demo.mlx_model OUT_DIR`
    gguf_model.py   the GGUF demo builder (the torch demo converted): `python -m mpsd.demo.gguf_model OUT_DIR`
    gguf_convert.py llama.cpp's convert_hf_to_gguf.py, run as the builder needs it: `python -m mpsd.demo.gguf_convert`
    chat_template.py  the chat template both demos serve, written into a built model (daemon-safe)

The daemon imports only what this package exports; the builders import torch
or mlx inside their functions and run in a child process (the GGUF builder
imports neither: its converter runs in a child of its own).
"""

from mpsd.demo.models import DEMO_MODELS, GGUF_DEMO, MLX_DEMO, TORCH_DEMO, DemoModel, DemoModelError, resolve_demo_ref

__all__ = ["DEMO_MODELS", "GGUF_DEMO", "MLX_DEMO", "TORCH_DEMO", "DemoModel", "DemoModelError", "resolve_demo_ref"]
