"""benchmarks/results.png: the newest GPU run of the sampler (achieved GB/s per provider and shape,
CUDA-graph timings) and of the decode modes (tokens/s per decoder).

    python benchmarks/plot_results.py
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader((HERE / "results.csv").open()))
    gpu = [r for r in rows if not r["device"].startswith("cpu")]
    if not gpu:
        print("no GPU rows in results.csv; nothing to plot", file=sys.stderr)
        return 1
    newest = max(r["date"] for r in gpu)
    run = [r for r in gpu if r["date"][:13] == newest[:13]]  # the suite's rows share the hour
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    samp = [r for r in run if r["benchmark"] == "sampling" and r["provider"].endswith("-graph") and r["gbps"]]
    shapes = sorted({r["shape"] for r in samp}, key=lambda s: (s.split(",")[0], int(s.split("V=")[1].split(",")[0]),
                                                                 int(s.split("N=")[1].split(",")[0])))
    provs = sorted({r["provider"] for r in samp})
    width = 0.8 / max(len(provs), 1)
    for i, prov in enumerate(provs):
        vals = {r["shape"]: float(r["gbps"]) for r in samp if r["provider"] == prov}
        axes[0].bar([j + i * width for j in range(len(shapes))], [vals.get(s, 0) for s in shapes], width, label=prov)
    axes[0].set_xticks([j + 0.4 for j in range(len(shapes))])
    axes[0].set_xticklabels([s.replace(",inputs=3", "") for s in shapes], rotation=90, fontsize=6)
    axes[0].set_ylabel("GB/s of input read (CUDA-graph replay)")
    axes[0].set_title("guided sampling")
    axes[0].legend(fontsize=7)
    dec = [r for r in run if r["benchmark"] == "decode"]
    modes = list(dict.fromkeys(r["shape"].split(",")[0] for r in dec))
    dprovs = list(dict.fromkeys(r["provider"] for r in dec))
    width = 0.8 / max(len(dprovs), 1)
    for i, prov in enumerate(dprovs):
        vals = {r["shape"].split(",")[0]: float(r["gbps"].split()[0]) for r in dec if r["provider"] == prov}
        axes[1].bar([j + i * width for j in range(len(modes))], [vals.get(m, 0) for m in modes], width, label=prov)
    axes[1].set_xticks([j + 0.4 for j in range(len(modes))])
    axes[1].set_xticklabels(modes)
    axes[1].set_ylabel("new tokens / s")
    axes[1].set_yscale("log")
    axes[1].set_title("decoding (gpt2-xl base, gpt2 guides)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{run[0]['device']}, {newest}, commit {run[0]['commit']}")
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=110)
    print(f"wrote {HERE / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
