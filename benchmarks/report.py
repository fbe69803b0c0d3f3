"""results.json, a Markdown table and a PNG chart from one run's results."""

from __future__ import annotations

import json
import pathlib


def write(results: dict, out_dir: pathlib.Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    results["chart"] = _chart(results, out_dir / "chart.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    table = markdown(results)
    (out_dir / "results.md").write_text(table + "\n")
    return table


def markdown(r: dict) -> str:
    ttft = r["ttft_ms"]
    s = r["scaling"]
    rows = [
        "| figure | value |", "|---|---|",
        f"| direct (in-process) tokens/s, 1 stream | {r['direct_tps']:.0f} |",
        f"| mpsd 1 worker tokens/s, 1 stream | {r['mpsd_tps']:.0f} ({r['mpsd_vs_direct']:.1%} of direct) |",
        f"| mpsd added latency per token p50 / p99 | {r['per_token_overhead_ms']['p50']:.3f} / "
        f"{r['per_token_overhead_ms']['p99']:.3f} ms |",
        *(f"| TTFT {name} p50 / p99 | {v['p50']:.1f} / {v['p99']:.1f} ms |" for name, v in ttft.items()),
        f"| transport (null-lm) tokens/s, 1 stream / 8 streams | {r['transport_tps']['1']:.0f} / {r['transport_tps']['8']:.0f} |",
        f"| daemon CPU per 1,000 streamed tokens, 1 / 8 streams | {r['transport_cpu_ms_per_1k_tokens']['1']:.1f} / "
        f"{r['transport_cpu_ms_per_1k_tokens']['8']:.1f} ms |",
        *(f"| {n} worker(s): mpsd / threads / ideal tokens/s | {m:.0f} ({m / s['mpsd'][0]:.2f}x) / {t:.0f} "
          f"({t / s['mpsd'][0]:.2f}x) / {i:.0f} |" for n, m, t, i in zip(s["workers"], s["mpsd"], s["threads"], s["ideal"])),
        *(_peer_row(name, peer) for name, peer in r["peers"].items()),
        f"| daemon RSS | {r['daemon_rss_bytes'] / 2**20:.0f} MiB |",
        f"| worker RSS beyond the weights | {r['worker_rss_beyond_weights_bytes'] / 2**20:.0f} MiB |",
        f"| start to READY, 1 worker / restart after kill -9 | {r['start_to_ready_s']:.1f} / {r['restart_s']:.1f} s |",
    ]
    return "\n".join(rows)


def _peer_row(name: str, peer: dict) -> str:
    if "error" in peer:
        return f"| {name} | not run: {peer['error']} |"
    scaling = " / ".join(f"{v:.0f}" for v in peer.get("scaling", []))
    return f"| {name} {peer.get('version', '')}: tokens/s with 1..{len(peer.get('scaling', []))} replicas | {scaling} |"


def _chart(r: dict, path: pathlib.Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install -c constraints.txt -e '.[bench]')"
    s = r["scaling"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, values, style in (("mpsd", s["mpsd"], "o-"), ("threads, one process", s["threads"], "s--"),
                                 ("ideal (N x 1 worker)", s["ideal"], ":")):
        left.plot(s["workers"], values, style, label=label)
    for name, peer in r["peers"].items():
        if "scaling" in peer:
            left.plot(s["workers"][:len(peer["scaling"])], peer["scaling"], "^-", label=name)
    left.set(xlabel="workers (replicas)", ylabel="aggregate tokens/s", title="Throughput vs workers", xticks=s["workers"])
    left.legend()
    names = list(r["ttft_ms"])
    right.bar([n + " p50" for n in names], [r["ttft_ms"][n]["p50"] for n in names])
    right.bar([n + " p99" for n in names], [r["ttft_ms"][n]["p99"] for n in names])
    right.set(ylabel="ms", title="Time to first token")
    right.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path.name)
