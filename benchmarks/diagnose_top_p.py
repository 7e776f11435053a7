"""Where the Triton sampler's top-p time goes at large N (GPU; the interpreter runs it too, slowly).

    python benchmarks/diagnose_top_p.py [--n 256] [--v 151936] [--rows peaked] [--top-p 0.9] [--pool-max 262144 4194304]

On the H200 (2026-12-04, 563f26c) top-p 0.9 at N=256, V=151936 took 3,346 us in a graph against 138 us without a
filter and 247 us with top-k 50, while at N=1 it took 32.7 us. ``candidate_coverage.py`` predicts that only 4 to
8 of the 256 peaked rows need the exact fallback, but in most of them the candidates hold under 90% of the mass
(a wide nucleus), so their range was the whole row below the cut (about 151,500 tokens): the first filled most of
the pool (262,144 entries then) and the others took a dozen full-row passes in one program each. Since then the
range starts at a bound from the row's total mass (``_nucleus_floor``: about 50,000 tokens on these rows) and
the pool holds 2**20 entries. This splits the batch to say which rows cost the time:

* ``all``: the whole batch; ``proven``: only the rows the candidates prove (no fallback); ``fallback``: only the
  rows that fall back; ``one fallback row``: the first of those alone;
* each with the fallback pool's size ``POOL_MAX`` as given (``--pool-max``; the sampler's own first), and the
  pool entries the call took (read from the workspace after an eager call): a count over the size means the
  later rows took the full-row passes instead of the pool.

Times are CUDA-graph medians (``harness.time_us(graph=True)``); nothing is recorded. Without CUDA it runs the
kernels in the interpreter (``TRITON_INTERPRET=1``; minutes for a few rows: ``--n 4 --v 4096``).
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
from benchmarks.bench_sampling import CONFIGS, ROW_KINDS, make_rows  # noqa: E402
from benchmarks.candidate_coverage import proven  # noqa: E402


def pool_entries_taken(run, n: int, v: int, block: int, inputs: int):
    """``(run(), the entries the fallback pool took)`` for ``run`` making one filtered call of the Triton sampler
    with ``n`` rows of ``v`` tokens, ``inputs`` inputs and slices of ``block``: the stages' one scratch allocation
    is caught as it is made, and the pool's count read from it afterwards (the launcher returns no workspace)."""
    from ivg_kernels._triton import sampling_kernels as sk

    seen, empty = [], torch.empty

    def spy(*a, **k):
        x = empty(*a, **k)
        if k.get("dtype") is torch.uint8:
            seen.append(x)
        return x

    sk.torch.empty = spy
    try:
        out = run()
    finally:
        sk.torch.empty = empty
    at = sk._plan(n, v, block, inputs, True)[6][-1]  # the pool's byte offset: its int64 count first
    return out, int(seen[0][at:at + 8].view(torch.int64).item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--rows", default="peaked", choices=ROW_KINDS)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--pool-max", type=int, nargs="*", default=[], help="fallback pool sizes to try besides the "
                    "sampler's own (entries; 8 bytes each)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    from ivg_kernels._args import prepare_sample_args
    from ivg_kernels._triton import sampling_kernels as sk
    from ivg_kernels.reference.sampling import _warp

    dev = torch.device("cuda" if cuda else "cpu")
    cfg = dict(CONFIGS["top-p-0.9"], top_p=args.top_p)
    rows = make_rows(args.rows, args.n, args.v, dev, torch.Generator(device=dev).manual_seed(args.n * args.v))
    block = sk.slice_width(sk.pick_block(args.n, args.v), args.v)
    a = prepare_sample_args(rows[0].cpu(), [(rows[1].cpu(), 1.0), (rows[2].cpu(), -1.0)], cfg["temperature"],
                            cfg["top_k"], cfg["top_p"], 0.0, 0, 0, None)
    x, x_max = _warp(a)[:2]
    ok = proven(x, x_max, cfg, block, "strided")
    fb = (~ok).nonzero().flatten().tolist()
    print(f"# diagnose_top_p on {harness.device_name(dev)}, commit {harness.commit()}: {args.rows} rows, N={args.n}, "
          f"V={args.v}, top-p {args.top_p}, T={cfg['temperature']}, slices of {block}; rows that fall back "
          f"(candidate_coverage): {len(fb)} {fb[:16]}")
    subsets = {"all": list(range(args.n)), "proven": [i for i in range(args.n) if ok[i]], "fallback": fb,
               "one fallback row": fb[:1]}
    own = sk.POOL_MAX
    print(f"{'rows':<18} {'N':>4} {'pool max':>9} {'pool taken':>11} {'graph us':>9}")
    try:
        for pool_max in [own, *args.pool_max]:
            sk.POOL_MAX = pool_max
            for name, idx in subsets.items():
                if not idx:
                    print(f"{name:<18} {0:>4}  (none)")
                    continue
                sel = torch.tensor(idx, device=dev)
                sub = [r.index_select(0, sel).contiguous() for r in rows]
                m = len(idx)
                seed, off = torch.arange(m, device=dev), torch.zeros(m, dtype=torch.int64, device=dev)

                def call(sub=sub, seed=seed, off=off):
                    return sk.launch_guided_sample(sub[0], sub[1:], [1.0, -1.0], None, None, cfg["temperature"], None,
                                                   0, None, cfg["top_p"], None, 0.0, seed, 0, off, 0, args.v, True,
                                                   block)

                taken = pool_entries_taken(call, m, args.v, block, 3)[1]
                size = sk.pool_entries(m, args.v, True)
                us = harness.time_us(call, dev, graph=True) if cuda else float("nan")
                print(f"{name:<18} {m:>4} {size:>9} {taken:>11} {us:>9.1f}", flush=True)
    finally:
        sk.POOL_MAX = own
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
