"""benchmarks/results.png: the newest GPU run of the sampler (achieved GB/s per provider and shape,
CUDA-graph timings) and the newest GPU run of the decode modes (tokens/s per decoder), each titled with its run.

    python benchmarks/plot_results.py
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def newest_run(gpu: list, benchmark: str) -> tuple[list, str]:
    """The rows of ``benchmark`` from its newest run among the GPU rows ``gpu`` (a suite's rows share the hour), and
    a label of that run: device, date, commit."""
    mine = [r for r in gpu if r["benchmark"] == benchmark]
    if not mine:
        return [], "no rows"
    newest = max(r["date"] for r in mine)
    run = [r for r in mine if r["date"][:13] == newest[:13]]
    last = next(r for r in mine if r["date"] == newest)
    return run, f"{last['device']}, {newest[:10]}, {last['commit']}"


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # (--help; no options)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader((HERE / "results.csv").open()))
    gpu = [r for r in rows if not r["device"].startswith("cpu")]
    if not gpu:
        print("no GPU rows in results.csv; nothing to plot", file=sys.stderr)
        return 1
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    samp_run, samp_label = newest_run(gpu, "sampling")
    samp = [r for r in samp_run if r["provider"].endswith("-graph") and r["gbps"]]
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
    axes[0].set_title(f"guided sampling ({samp_label})", fontsize=9)
    if provs:
        axes[0].legend(fontsize=7)
    dec, dec_label = newest_run(gpu, "decode")
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
    models = sorted({r["shape"].split(",")[1] for r in dec if "," in r["shape"]})
    axes[1].set_title(f"decoding, models {'/'.join(models) or '?'} ({dec_label})", fontsize=9)
    if dprovs:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=110)
    print(f"wrote {HERE / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
