"""chart.png: the concurrency sweep (throughput, TTFT, inter-token latency) and the MLX comparison."""

from __future__ import annotations

import pathlib

STYLES = {"mpsd": "o-", "direct": "k:", "ray-serve": "^--", "litserve": "s--"}


def draw(r: dict, path: pathlib.Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install -c constraints.txt -e '.[bench]')"
    sweep = r["sweep"]
    figure, axes = plt.subplots(1, 4 if "mlx" in r else 3, figsize=(20 if "mlx" in r else 15, 4.5))
    panels = (("tps", None, "aggregate tokens/s"), ("ttft_ms", "p99", "TTFT p99 (ms)"),
              ("itl_ms", "p99", "inter-token p99 (ms)"))
    for axis, (key, quantile, label) in zip(axes, panels):
        for name, by_workers in sweep["systems"].items():
            for workers, cells in by_workers.items():
                values = [c[key] if quantile is None else c[key][quantile] for c in cells]
                axis.plot([c["streams"] for c in cells], values, STYLES.get(name, "x-"),
                          label=f"{name}, {workers} worker(s)" if name != "direct" else "direct (in-process)",
                          alpha=1.0 if workers == "2" or name == "direct" else 0.55)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sweep["levels"], [str(n) for n in sweep["levels"]])
        if key != "tps":
            axis.set_yscale("log")
        axis.set(xlabel="concurrent streams", ylabel=label, title=label)
    axes[0].legend(fontsize=7)
    if "mlx" in r:
        _mlx_panel(axes[3], r["mlx"])
    figure.suptitle(f"model: {r['model']['name']}, {sweep['tokens_per_stream']} tokens per stream, "
                    f"{r['machine']['cores']} CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return str(path.name)


def _mlx_panel(axis, mlx: dict) -> None:
    systems = {f"mpsd mlx-lm, {w} worker(s)": cells for w, cells in mlx["mpsd-mlx"].items()}
    if "rows" in mlx["mlx_lm.server"]:
        systems["mlx_lm.server"] = mlx["mlx_lm.server"]["rows"]["1"]
    levels = mlx["levels"]
    width = 0.8 / max(1, len(systems))
    for index, (name, cells) in enumerate(systems.items()):
        axis.bar([i + index * width for i in range(len(levels))], [c["tps"] for c in cells], width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))], [f"{n} streams" for n in levels])
    axis.set(ylabel="aggregate tokens/s", title="MLX: mpsd mlx-lm vs mlx_lm.server")
    axis.legend(fontsize=7)
