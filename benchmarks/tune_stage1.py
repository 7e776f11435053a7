"""Stage 1 of the Triton sampler with 8 or 4 warps per slice of 4,096 tokens, side by side (GPU).

    python benchmarks/tune_stage1.py [--n 64 256] [--v 151936] [--warps 8 4] [--configs imdb alpaca top-p-0.9]
    python benchmarks/tune_stage1.py --candidates 16 8     # also the filters' candidates per slice

``ivg_kernels._triton.sampling_kernels.STAGE1_WARPS_WIDE`` sets the warps of a stage-1 program over a slice of
4,096 tokens (N >= 8 at V=151936). With 8 each thread holds 16 tokens; with 4, 32, so the slice's reductions cost
each token less (``benchmarks/sass_count.py --warps 8 4``: 82 -> 72 instructions per token without
filters, 127 -> 110 with, on sm_90), but the program needs 128 registers instead of about 60, so fewer programs
share an SM. Only the device can say which is faster: this times the whole sampler (both stages, CUDA-graph medians,
peaked rows as ``bench_sampling.py`` makes them, 3 bf16 inputs) at each setting in one run, the settings taking
turns, and prints each time with its share of the measured copy bandwidth (the bytes stage 1 must read), then each
stage's own time from the profiler (which of the two a filter's extra time is in). ``--candidates`` also varies,
for the filtered configs, the candidates per slice stage 1 keeps (``MAX_CANDIDATES``: at 8 instead of 16, 110
instead of 127 instructions per token with filters, and a few more rows taking the exact fallback). The
tokens are the same at every setting (checked here, and by the interpreter tests: neither setting changes the draw).
Nothing is recorded: the setting that wins becomes the default, and ``bench_sampling.py --record`` then measures it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.bench_sampling import CONFIGS, has_filters, make_rows  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--warps", type=int, nargs="*", default=[8, 4])
    ap.add_argument("--candidates", type=int, nargs="*", default=[16],
                    help="candidates per slice for the filters (sampling_kernels.MAX_CANDIDATES), with each warps "
                         "setting, for the filtered configs")
    ap.add_argument("--configs", nargs="*", default=["imdb", "alpaca", "top-p-0.9"], choices=sorted(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3, help="times each setting is timed, taking turns (median)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_stage1: needs a CUDA device (the interpreter times nothing)", file=sys.stderr)
        return 2
    import ivg_kernels
    from ivg_kernels._triton import sampling_kernels as sk

    dev = torch.device("cuda")
    copy = harness.copy_bandwidth_gbps(dev)
    print(f"# tune_stage1 on {harness.device_name(dev)}, commit {harness.commit()}: peaked rows, V={args.v}, "
          f"3 bf16 inputs; copy {copy:.0f} GB/s; CUDA-graph medians of {args.rounds} rounds")
    print(f"{'config':<11} {'N':>4} {'slice':>6}  (each setting: warps/candidates, CUDA-graph us, share of copy)")
    own, own_c = sk.STAGE1_WARPS_WIDE, sk.MAX_CANDIDATES

    def use(setting):
        sk.STAGE1_WARPS_WIDE, sk.MAX_CANDIDATES = setting

    try:
        for n in args.n:
            rows = make_rows("peaked", n, args.v, dev, torch.Generator(device=dev).manual_seed(n * args.v))
            block = sk.slice_width(sk.pick_block(n, args.v), args.v)
            seed, offset = torch.arange(n, device=dev), torch.zeros(n, dtype=torch.int64, device=dev)
            for name in args.configs:
                cfg = CONFIGS[name]

                def call(rows=rows, seed=seed, offset=offset, cfg=cfg):
                    return ivg_kernels.guided_sample(rows[0], [(rows[1], 1.0), (rows[2], -1.0)], seed=seed,
                                                     offset=offset, backend="triton", **cfg)

                settings = [(w, c) for w in args.warps for c in (args.candidates if has_filters(cfg) else [own_c])]
                times, tokens, stages = {st: [] for st in settings}, {}, {}
                for _ in range(args.rounds):
                    for st in settings:
                        use(st)
                        tokens[st] = call().tokens
                        times[st].append(harness.time_us(call, dev, graph=True))
                for st in settings:  # each stage's own time (profiler), to say which one a filter's cost is in
                    use(st)
                    ks = harness.kernel_us(call)
                    stages[st] = (ks.get("_stage1_kernel", float("nan")), ks.get("_stage2_kernel", float("nan")))
                first = tokens[settings[0]]
                same = all(torch.equal(first, t) for t in tokens.values())
                bytes_read = 3 * n * args.v * 2
                cells = []
                for st in settings:
                    us = statistics.median(times[st])
                    cells.append(f"{st[0]}/{st[1]} {us:.1f} us {100 * bytes_read / (us * 1e-6) / (copy * 1e9):.0f}%")
                print(f"{name:<11} {n:>4} {block:>6}  " + ", ".join(cells) + ("" if same else "  TOKENS DIFFER"),
                      flush=True)
                print(f"{'':<11} {'':>4} {'':>6}  stages 1 / 2 (profiler): "
                      + ", ".join(f"{w}/{c} {a:.1f} / {b:.1f} us" for (w, c), (a, b) in stages.items()), flush=True)
                if not same:
                    return 1
    finally:
        use((own, own_c))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
