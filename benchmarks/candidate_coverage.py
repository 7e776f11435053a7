"""How often the sampler's filtered rows need the exact fallback, predicted on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/candidate_coverage.py [--n 256 1] [--v 151936] [--rows peaked ranked]

Stage 1 of the Triton sampler keeps each slice's top ``MAX_CANDIDATES`` tokens (by a 32-bit key: the
float's order with the low 12 bits replaced by the position in the slice); stage 2 proves a row's kept
set from them when every threshold (top-k, top-p, min-p) lies above the cut, the largest key a token
left out of its slice's candidates can have. A row that fails takes the exact fallback: two more passes
over its inputs inside one program, the cost that decides the filtered paths' speed at N=1.

This replays that test in torch on ``bench_sampling``'s rows (the same generator and seeds) for two ways
of cutting a row into slices of ``BLOCK`` tokens (``pick_block``):

* ``contiguous``: slice s holds tokens ``[s * BLOCK, (s + 1) * BLOCK)`` (the layout before this script);
* ``strided``: slice s holds the 256-token granules ``s, s + S, s + 2S, ...`` (the kernel's layout now),

and prints, per row kind and warper setting, the share of rows each layout proves. It reads no GPU and
launches no kernel: the thresholds are those of ``_stage2_kernel`` computed from the same keys and
integer masses (``ivg_kernels.reference``), so a row it counts as proven is one the kernel proves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_sampling import CONFIGS, ROW_KINDS, make_rows  # noqa: E402
from ivg_kernels._args import prepare_sample_args  # noqa: E402
from ivg_kernels._triton.sampling_kernels import MAX_CANDIDATES, pick_block, slice_width  # noqa: E402
from ivg_kernels.reference.portable import FLT_MIN, mass_int, nucleus_target, plog  # noqa: E402
from ivg_kernels.reference.sampling import GRANULE, _warp, granule_weights  # noqa: E402

INT32_MIN = -(2 ** 31)
LOW = 0xFFF


def float_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 holding the int32 whose signed order is the float order, -0.0 and +0.0 one key (the
    kernel's _float_key)."""
    b = x.float().contiguous().view(torch.int32).long()
    return torch.where(b >= 0, b, (b ^ 0x7FFFFFFF) + 1)


def slice_order(v: int, block: int, layout: str) -> torch.Tensor:
    """Token ids [S, block] of each slice, in slice-position order (ids past ``v`` as ``v``: padding)."""
    s = -(-v // block)
    gr = min(GRANULE, block)
    ngb = block // gr
    if layout == "contiguous":
        ids = torch.arange(s * block).view(s, block)
    else:
        granule = torch.arange(s).unsqueeze(1) + s * torch.arange(ngb).unsqueeze(0)  # [S, NGB]
        ids = (granule.unsqueeze(2) * gr + torch.arange(gr)).view(s, block)
    return ids.clamp(max=v)


def proven(x: torch.Tensor, x_max: torch.Tensor, cfg: dict, block: int, layout: str) -> torch.Tensor:
    """bool [N]: rows whose kept set stage 2 proves from the candidates (no fallback)."""
    n, v = x.shape
    ids = slice_order(v, block, layout)  # [S, B]
    s = ids.shape[0]
    key = float_key(x)
    key = torch.cat([key, torch.full((n, 1), INT32_MIN - 1)], dim=1)  # padding sorts below every token
    slot = key[:, ids]  # [N, S, B]
    local = torch.arange(block)
    packed = (slot & ~LOW) | (LOW - local)
    top = packed.topk(MAX_CANDIDATES, dim=2).values  # [N, S, C]
    n_valid = (ids < v).sum(dim=1)  # [S]
    cut = torch.where(n_valid > MAX_CANDIDATES, top[:, :, -1] | LOW, INT32_MIN).amax(dim=1)  # [N]
    at = LOW - (top & LOW)
    ccols = ids.unsqueeze(0).expand(n, s, block).gather(2, at).flatten(1)  # [N, S*C]
    cvalid = ccols < v
    cx = x.gather(1, ccols.clamp(max=v - 1))
    ckey = torch.where(cvalid, float_key(cx), INT32_MIN)

    k, p, mp = cfg["top_k"], cfg["top_p"], cfg.get("min_p", 0.0)
    tau_k = torch.full((n,), INT32_MIN)
    valid_k = torch.ones(n, dtype=torch.bool)
    if 0 < k < v:
        # the k-th largest candidate key; with fewer candidates than k, INT32_MIN (the kernel's bisection finds none)
        if k <= ckey.shape[1]:
            tau_k = ckey.sort(dim=1, descending=True).values[:, k - 1]
        valid_k = tau_k > cut
    mass = torch.where(cvalid & (ckey >= tau_k.unsqueeze(1)), mass_int((cx - x_max.unsqueeze(1)).float()), 0)
    valid_p = torch.ones(n, dtype=torch.bool)
    if p < 1:
        tail_zero = (cut == INT32_MIN) | (float_key_to_float(cut) - x_max < -30.0)
        total_known = valid_k | tail_zero if 0 < k < v else torch.ones(n, dtype=torch.bool)
        total = mass.sum(dim=1) if 0 < k < v else granule_weights(x, x_max)[2].sum(dim=1)
        target = nucleus_target(torch.full((n,), p), total)
        order = ckey.sort(dim=1, descending=True)
        cum = mass.gather(1, order.indices).cumsum(dim=1)
        reach = cum >= target.unsqueeze(1)
        first = reach.to(torch.int8).argmax(dim=1)
        tau_p = torch.where(reach[:, -1], order.values.gather(1, first.unsqueeze(1)).squeeze(1), INT32_MIN)
        valid_p = total_known & (tau_p > cut)
    else:
        tau_p = torch.full((n,), INT32_MIN)
    tau_m = torch.full((n,), INT32_MIN)
    if mp > 0:
        tau_m = float_key(x_max + plog(torch.tensor(max(mp, FLT_MIN))))
    tau = torch.maximum(torch.maximum(tau_k, tau_p), tau_m)
    return (cut == INT32_MIN) | (valid_k & valid_p & (tau > cut))


def float_key_to_float(k: torch.Tensor) -> torch.Tensor:
    b = torch.where(k >= 0, k, (k - 1) ^ 0x7FFFFFFF).to(torch.int32)
    return b.view(torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[256, 1])
    ap.add_argument("--v", type=int, nargs="*", default=[151936])
    ap.add_argument("--rows", nargs="*", default=["peaked", "ranked"], choices=ROW_KINDS)
    ap.add_argument("--configs", nargs="*", default=["alpaca", "min-p-0.05", "top-p-0.9", "top-p-0.95"],
                    choices=list(CONFIGS))
    ap.add_argument("--batches", type=int, default=1, help="batches of rows per shape (seeds n*v + i)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'rows':<7} {'setting':<11} {'N':>4} {'V':>7} {'block':>5}   rows proven by the candidates: "
          f"contiguous slices / strided granules")
    for kind in args.rows:
        for v in args.v:
            for n in args.n:
                block = slice_width(pick_block(n, v), v)
                batches = []
                for i in range(args.batches):
                    gen = torch.Generator().manual_seed(n * v + i)
                    batches.append(make_rows(kind, n, v, torch.device("cpu"), gen))
                for name in args.configs:
                    cfg = CONFIGS[name]
                    got = {"contiguous": 0, "strided": 0}
                    for base, tune, ref in batches:
                        a = prepare_sample_args(base, [(tune, 1.0), (ref, -1.0)], cfg["temperature"], cfg["top_k"],
                                                cfg["top_p"], cfg.get("min_p", 0.0), 0, 0, None)
                        x, x_max = _warp(a)[:2]
                        for layout in got:
                            got[layout] += int(proven(x, x_max, cfg, block, layout).sum())
                    rows = n * len(batches)
                    print(f"{kind:<7} {name:<11} {n:>4} {v:>7} {block:>5}   {got['contiguous']:>4} / {got['strided']:>4}"
                          f" of {rows}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
