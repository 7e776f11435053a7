"""Where the beam-group (shared-prefix) attention's time goes, kernel by kernel (GPU; the interpreter checks it).

    python benchmarks/diagnose_beam_group.py                          # issue 13's shape; a sweep of the plans
    python benchmarks/diagnose_beam_group.py --splits 0 8 16 --tile-m 64 32

Issue 13's beam-group shape (16 beams of one 2,048-token prompt, 64 tokens each of their own, GQA 32/8, D=128,
bf16, blocks of 16) took 22.6 us on the H200 (2026-12-04, 563f26c) against 52.4 us per beam: 2.32x, where the
issue asks 6x. The bytes the two kernels must move (the prompt's K/V once, each beam's own, the float32 partials
written and read back) take about 4 us at copy bandwidth, so most of the 22.6 us is latency: the prefix kernel
runs (KV heads x query tiles x splits) = 8 x 1 x 8 = 64 programs, under half an H100's 132 SMs, each over 256
keys in 4 tiles one after another, then the suffix kernel's 128 programs wait on the merge and their own tiles.

This times, for the plan the launcher picks and for other plans (``--splits``: splits of the prefix, 0 the
launcher's choice; ``--tile-m``: the prefix kernel's largest query tile, ``attention_kernels._PREFIX_TILE_M``):

* ``graph us``: CUDA-graph replays of the whole call (the kernels and the gap between them), as
  ``bench_kv.py``'s beam-group rows;
* ``prefix us`` and ``suffix us``: each kernel's own time from the profiler (median over the calls), and the
  GB/s of the bytes each must move;
* ``max diff``: against per-beam paged decode attention on the same inputs (every plan computes the same
  attention; in float32 on the CPU the sums' order differs only by rounding).

The per-beam kernels are timed the same way, as the baseline. Nothing is recorded: this tells which plan a
redesign (or a new rule in ``_prefix_splits``) should take. Without CUDA it runs the kernels in the interpreter
on a small shape (``--prompt 64 --own 16 --heads 8 --kv-heads 2 --dim 16 --block 4``), where only
the ``max diff`` column means anything.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before the kernels are decorated (at their modules' import)
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.bench_kv import attention_tolerance, beam_group_case  # noqa: E402

PREFIX, SUFFIX = "_shared_prefix_kernel", "_shared_suffix_kernel"


def prefix_grid(c, beams: int, splits: int) -> tuple:
    """The prefix kernel's grid (groups, KV heads x query tiles, splits) of the shared-prefix launch that the
    arguments ``c`` with ``splits`` get now."""
    from ivg_kernels._triton.attention_kernels import shared_launch

    return shared_launch(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], c["starts"], c["shared"], beams, c["scale"], 0,
                         splits, 0.0, None).grid1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    small = not cuda
    ap.add_argument("--beams", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64 if small else 2048)
    ap.add_argument("--own", type=int, default=16 if small else 64)
    ap.add_argument("--heads", type=int, default=8 if small else 32)
    ap.add_argument("--kv-heads", type=int, default=2 if small else 8)
    ap.add_argument("--dim", type=int, default=16 if small else 128)
    ap.add_argument("--block", type=int, default=4 if small else 16)
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 2, 4, 8, 16, 32] if cuda else [0, 2, 5],
                    help="splits of the prefix to try (0: the launcher's choice)")
    ap.add_argument("--tile-m", type=int, nargs="+", default=[64, 32, 16], choices=[16, 32, 64],
                    help="the prefix kernel's largest query tiles to try")
    args = ap.parse_args(argv)
    from ivg_kernels import paged_decode_attention, shared_prefix_decode_attention
    from ivg_kernels._triton import attention_kernels as ak

    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    c = beam_group_case(dev, args.beams, args.prompt, args.own, args.heads, args.kv_heads, args.dim, args.block)
    elem = c["kc"].element_size()
    kv = lambda tokens: 2 * tokens * args.kv_heads * args.dim * elem  # noqa: E731  K and V bytes of ``tokens``
    partials = args.beams * args.heads * (args.dim + 2) * 4  # float32 bytes of one split's partials, every row
    print(f"# diagnose_beam_group on {harness.device_name(dev)}, torch {torch.__version__}, commit {harness.commit()}:"
          f" {args.beams} beams, prompt {args.prompt}, own {args.own}, H={args.heads}, H_kv={args.kv_heads}, "
          f"D={args.dim}, block {args.block}, {c['kc'].dtype}")
    want = paged_decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], scale=c["scale"], backend="reference")
    per_beam = lambda: paged_decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], scale=c["scale"],  # noqa: E731
                                              backend="triton")
    worst = (per_beam().float() - want.float()).abs().max().item()
    head = f"{'plan':<26} {'programs':>8} {'graph us':>9} {'prefix us':>10} {'GB/s':>7} {'suffix us':>10} {'GB/s':>7} " \
           f"{'max diff':>9}"
    print(head)
    if cuda:
        ks = harness.kernel_us(per_beam)
        print(f"{'per-beam':<26} {'':>8} {harness.time_us(per_beam, dev, graph=True):>9.1f}  kernels: "
              + ", ".join(f"{k} {v:.1f} us" for k, v in ks.items()) + f"  (max diff {worst:.1e})")
    own_tile = ak._PREFIX_TILE_M
    try:
        for tile_m in args.tile_m:
            ak._PREFIX_TILE_M = tile_m
            for splits in args.splits:

                def grouped(splits=splits):
                    return shared_prefix_decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], c["starts"],
                                                          c["shared"], max_group_rows=args.beams, scale=c["scale"],
                                                          num_splits=splits, backend="triton")

                diff = (grouped().float() - want.float()).abs().max().item()
                worst = max(worst, diff)
                grid = prefix_grid(c, args.beams, splits)
                used = grid[2]
                name = f"tile {tile_m}, splits {used}" + (" (auto)" if splits == 0 else "")
                programs = grid[0] * grid[1] * grid[2]
                if cuda:
                    graph = harness.time_us(grouped, dev, graph=True)
                    ks = harness.kernel_us(grouped)
                    pre, suf = ks.get(PREFIX, float("nan")), ks.get(SUFFIX, float("nan"))
                    pre_bytes = kv(args.prompt) + used * partials
                    suf_bytes = kv(args.own) * args.beams + used * partials + args.beams * args.heads * args.dim * elem
                    print(f"{name:<26} {programs:>8} {graph:>9.1f} {pre:>10.1f} {pre_bytes / pre / 1e3:>7.0f} "
                          f"{suf:>10.1f} {suf_bytes / suf / 1e3:>7.0f} {diff:>9.1e}", flush=True)
                else:
                    print(f"{name:<26} {programs:>8} {'':>9} {'':>10} {'':>7} {'':>10} {'':>7} {diff:>9.1e}", flush=True)
    finally:
        ak._PREFIX_TILE_M = own_tile
    tol = attention_tolerance(c["kc"].dtype)
    if worst > tol:
        print(f"error: a plan's output differs from per-beam attention by {worst:.1e} (tolerance {tol:.0e})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
