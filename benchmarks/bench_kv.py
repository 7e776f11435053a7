"""Benchmark of forking and pruning beams on the paged cache against Hugging Face's cache reorder,
and of paged decode attention against SDPA on a contiguous cache (GPU).

    python benchmarks/bench_kv.py --quick     # CPU-friendly sizes
    python benchmarks/bench_kv.py --record    # append to results.csv, render RESULTS.md

Fork/prune, one chunk boundary of chunk-level beam search with W kept beams and K successors:
  hf-reorder     DynamicCache.reorder_cache(beam_idx): index_select of every layer's K and V
                 (what the published code and transformers' beam search do at every chunk)
  paged          free the W*K - W pruned sequences, fork each kept one into K children, append one
                 token to every child (running the copy-on-write copies on the pool)
Reported: median microseconds and bytes of KV copied (in the `gbps` column's place: see `shape`).

Beam-group decode attention (issue 13's shape: W*K=16 beams of one prompt of 2,048 tokens, each with
64 tokens of its own, GQA 32/8, D=128, block 16; float32 on the CPU, bf16 on the GPU):
  per-beam       paged_decode_attention: every beam reads the prompt's KV
  shared-prefix  shared_prefix_decode_attention: the prompt's KV read once for the group
On the GPU both are timed eagerly and as CUDA-graph replays (the kernels' own time). `gbps`: the
bytes per-beam attention must read, over the time (so the two rows compare on one scale). Both are first
compared with the reference on the same inputs: a path further from it than 1e-2 (bf16; 1e-4 float32) is
printed but not recorded, and the run exits 1.

FlashInfer, when importable (carried to the GPU machine as wheels): `flashinfer` beside
`paged-triton` (BatchDecodeWithPagedKVCacheWrapper on the same pages), and `flashinfer-per-beam` /
`flashinfer-cascade` beside the beam-group rows (MultiLevelCascadeAttentionWrapper, two levels: the
shared prompt pages, then each beam's own). Planning is outside the timed call, as in a decoder that
plans once per step for all layers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from ivg_kernels.block_manager import BlockManager  # noqa: E402
from ivg_kernels.kv_pool import KVCache  # noqa: E402


def _dims(device, quick):
    if device.type == "cuda" and not quick:
        return dict(layers=12, kv_heads=12, head_dim=64, dtype=torch.bfloat16)  # gpt2-sized guide
    return dict(layers=2, kv_heads=4, head_dim=64, dtype=torch.float32)


def bench_fork(device, lengths, w, k, block_size, quick):
    dims = _dims(device, quick)
    beams = w * k
    rows = []
    for length in lengths:
        # Hugging Face: a DynamicCache of W*K rows of `length` tokens, reordered to keep W beams K times.
        from transformers import DynamicCache

        dyn = DynamicCache()
        kv = torch.randn(beams, dims["kv_heads"], length, dims["head_dim"], dtype=dims["dtype"], device=device)
        for layer in range(dims["layers"]):
            dyn.update(kv.clone(), kv.clone(), layer)
        beam_idx = torch.arange(w, device=device).repeat_interleave(k) * k  # keep beams 0, K, 2K, ...
        hf_us = harness.time_us(lambda: dyn.reorder_cache(beam_idx), device)
        hf_bytes = 2 * dims["layers"] * kv.numel() * kv.element_size()

        # Paged: the same W*K beams of `length` tokens; each timed call is one chunk boundary and leaves
        # W*K live beams one token longer, so repetitions measure the steady state.
        num_blocks = (beams + beams) * (-(-(length + 1) // block_size) + 1)
        cache = KVCache(dims["layers"], dims["kv_heads"], dims["head_dim"], num_blocks=num_blocks,
                        block_size=block_size, dtype=dims["dtype"], device=device)
        bm = cache.blocks
        (root,) = bm.new_sequences(1)
        cache.append([root], length - 1)
        state = {"live": bm.fork(root, beams)}
        bm.free(root)
        cache.append(state["live"], 1)  # every beam owns its last block, as after a chunk of decoding

        def boundary():
            live = state["live"]
            kept = live[::k][:w]
            bm.free_many([s for s in live if s not in kept])
            kids = [c for group in bm.fork_many(kept, k) for c in group]
            bm.free_many(kept)
            cache.append(kids, 1)
            state["live"] = kids

        copied0 = cache.pool.bytes_copied
        calls = [0]

        def counted():
            boundary()
            calls[0] += 1

        paged_us = harness.time_us(counted, device)
        paged_bytes = (cache.pool.bytes_copied - copied0) / max(calls[0], 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        shape = f"W={w},K={k},len={length},layers={dims['layers']},kv_heads={dims['kv_heads']},block={block_size}"
        for name, us, nbytes in (("hf-reorder", hf_us, hf_bytes), ("paged", paged_us, paged_bytes)):
            rows.append(dict(benchmark="kv-fork-prune", provider=name, shape=f"{shape},bytes_copied={int(nbytes)}",
                             dtype=str(dims["dtype"]).replace("torch.", ""), median_us=f"{us:.1f}",
                             gbps="", speedup=f"{hf_us / us:.2f}"))
        del dyn, kv, cache
    return rows


def _flashinfer():
    try:
        import flashinfer

        return flashinfer
    except Exception as e:  # noqa: BLE001 - any import failure means: not here
        print(f"flashinfer: not importable ({type(e).__name__}), its rows are skipped", file=sys.stderr)
        return None


def _pages(block_table, seq_lens, bs, first=None):
    """FlashInfer's paged layout of rows given as our block tables (int32 [N, W]) and lengths: (indptr,
    indices, last_page_len), from page ``first[r]`` of each row on (all pages by default)."""
    lens = seq_lens.long().cpu()
    table = block_table.cpu()
    nb = (lens + bs - 1) // bs
    start = torch.zeros_like(nb) if first is None else first.long().cpu()
    indices = torch.cat([table[r, int(start[r]):int(nb[r])] for r in range(len(lens))]).int()
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = (nb - start).cumsum(0)
    last = (lens - (nb - 1) * bs).int()
    dev = block_table.device
    return indptr.to(dev), indices.to(dev), last.to(dev)


def _flashinfer_decode(fi, q, kc, vc, bt, sl, scale):
    """A planned BatchDecodeWithPagedKVCacheWrapper over our pages; returns the timed call."""
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    indptr, indices, last = _pages(bt, sl, kc.shape[1])
    w.plan(indptr, indices, last, q.shape[1], kc.shape[2], q.shape[2], kc.shape[1], sm_scale=scale,
           q_data_type=q.dtype, kv_data_type=kc.dtype)
    return lambda: w.run(q, (kc, vc))


def _flashinfer_cascade(fi, q, kc, vc, bt, sl, shared_pages, scale):
    """Two-level MultiLevelCascadeAttentionWrapper: the first ``shared_pages`` pages once for all rows,
    then each row's own pages; returns the timed call."""
    n, bs = q.shape[0], kc.shape[1]
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    w = fi.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
    dev = q.device
    top = (torch.tensor([0, shared_pages], dtype=torch.int32, device=dev), bt[0, :shared_pages].int().contiguous(),
           torch.tensor([bs], dtype=torch.int32, device=dev))
    own = _pages(bt, sl, bs, first=torch.full((n,), shared_pages))
    w.plan([torch.tensor([0, n], dtype=torch.int32, device=dev), torch.arange(n + 1, dtype=torch.int32, device=dev)],
           [top[0], own[0]], [top[1], own[1]], [top[2], own[2]], q.shape[1], kc.shape[2], q.shape[2], bs,
           sm_scale=scale, q_data_type=q.dtype, kv_data_type=kc.dtype)
    return lambda: w.run(q, (kc, vc))


def bench_decode(device, ns, lengths):
    """Paged decode attention against SDPA on a contiguous cache: eager, and the kernels' own time as
    CUDA-graph replays (``paged-triton-graph``)."""
    from ivg_kernels.attention import paged_decode_attention

    h, h_kv, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    rows = []
    for n in ns:
        for length in lengths:
            nb = n * (length // bs + 1)
            kc = torch.randn(nb, bs, h_kv, d, dtype=dtype, device=device)
            vc = torch.randn_like(kc)
            bm = BlockManager(nb, bs)
            bm._free = torch.randperm(nb).tolist()  # scattered pages
            seqs = bm.new_sequences(n)
            bm.append(seqs, length)
            bt = bm.block_table(seqs).to(device)
            sl = bm.seq_lens(seqs).to(device)
            q = torch.randn(n, h, d, dtype=dtype, device=device)
            k_dense = torch.randn(n, h_kv, length, d, dtype=dtype, device=device)
            v_dense = torch.randn_like(k_dense)
            nbytes = 2 * n * length * h_kv * d * 2
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q.unsqueeze(2), k_dense, v_dense, enable_gqa=True)
            paged = lambda: paged_decode_attention(q, kc, vc, bt, sl, scale=d ** -0.5, backend="triton")  # noqa: E731
            base_us = harness.time_us(sdpa, device)
            providers = [("sdpa-contiguous", sdpa), ("paged-triton", paged), ("paged-triton-graph", paged)]
            fi = _flashinfer()
            if fi is not None:
                providers.append(("flashinfer", _flashinfer_decode(fi, q, kc, vc, bt, sl, d ** -0.5)))
            for name, fn in providers:
                us = base_us if name.startswith("sdpa") else harness.time_us(fn, device, graph=name.endswith("-graph"))
                rows.append(dict(benchmark="paged-decode-attention", provider=name,
                                 shape=f"N={n},L={length},H={h},H_kv={h_kv},D={d},block={bs}", dtype="bf16",
                                 median_us=f"{us:.1f}", gbps=f"{nbytes / (us * 1e-6) / 1e9:.1f}",
                                 speedup=f"{base_us / us:.2f}"))
    return rows


def attention_tolerance(dtype) -> float:
    """The largest difference from the reference attention a timed path may show: bf16 outputs round at about 4e-3
    of these rows' values, float32 ones only in the sums' order."""
    return 1e-2 if dtype == torch.bfloat16 else 1e-4


def beam_group_case(device, beams=16, prompt=2048, own=64, h=32, h_kv=8, d=128, bs=16):
    """Issue 13's beam-group shape on ``device``: ``beams`` sequences forked from one prompt of ``prompt`` tokens,
    each with ``own`` tokens of its own, on scattered pages (bf16 on the GPU, float32 on the CPU). Returns a dict of
    the attention's arguments: q, kc, vc, bt, sl, starts and shared (the block manager's beam groups), scale."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    nb = -(-prompt // bs) + beams * (-(-own // bs) + 1) + 1
    bm = BlockManager(nb, bs)
    bm._free = torch.randperm(nb).tolist()  # scattered pages
    (root,) = bm.new_sequences(1)
    bm.append([root], prompt)
    rows_ = bm.fork(root, beams)
    bm.free(root)
    bm.append(rows_, own)
    kc = torch.randn(nb, bs, h_kv, d, device=device).to(dtype)
    vc = torch.randn_like(kc)
    starts, shared = bm.shared_prefix_groups(rows_)
    return dict(q=torch.randn(beams, h, d, device=device).to(dtype), kc=kc, vc=vc,
                bt=bm.block_table(rows_).to(device), sl=bm.seq_lens(rows_).to(device),
                starts=torch.tensor(starts, dtype=torch.int32, device=device),
                shared=torch.tensor(shared, dtype=torch.int32, device=device), scale=d ** -0.5)


def bench_beam_group(device, beams=16, prompt=2048, own=64):
    from ivg_kernels import paged_decode_attention, shared_prefix_decode_attention

    h, h_kv, d, bs = 32, 8, 128, 16
    backend = "triton" if device.type == "cuda" else "reference"
    c = beam_group_case(device, beams, prompt, own, h, h_kv, d, bs)
    q, kc, vc, bt, sl, st, sh = (c[k] for k in ("q", "kc", "vc", "bt", "sl", "starts", "shared"))
    dtype = kc.dtype
    per_beam = lambda: paged_decode_attention(q, kc, vc, bt, sl, scale=d ** -0.5, backend=backend)  # noqa: E731
    grouped = lambda: shared_prefix_decode_attention(q, kc, vc, bt, sl, st, sh, max_group_rows=beams,  # noqa: E731
                                                     scale=d ** -0.5, backend=backend)
    # each Triton path against the reference on the same inputs: a path that computes something else is not timed
    want = paged_decode_attention(q, kc, vc, bt, sl, scale=d ** -0.5, backend="reference").float()
    outs = {fn: fn().float() for fn in (per_beam, grouped)}
    errs = {fn: (out - want).abs().max().item() for fn, out in outs.items()}
    tol = attention_tolerance(dtype)
    err = (outs[grouped] - outs[per_beam]).abs().max().item()
    nbytes = 2 * beams * (prompt + own) * h_kv * d * kc.element_size()
    shape = f"beams={beams},prompt={prompt},own={own},H={h},H_kv={h_kv},D={d},block={bs},max_abs_diff={err:.1e}"
    modes = [("eager", False)] + ([("graph", True)] if device.type == "cuda" else [])
    providers = [("per-beam-" + backend, per_beam), ("shared-prefix-" + backend, grouped)]
    fi = _flashinfer() if device.type == "cuda" else None
    if fi is not None:
        providers += [("flashinfer-per-beam", _flashinfer_decode(fi, q, kc, vc, bt, sl, d ** -0.5)),
                      ("flashinfer-cascade", _flashinfer_cascade(fi, q, kc, vc, bt, sl, prompt // bs, d ** -0.5))]
    for name, fn in providers[:2]:
        if errs[fn] > tol:
            print(f"error: {name} differs from the reference by {errs[fn]:.1e} (tolerance {tol:.0e}) at {shape}: "
                  f"its rows are printed, not recorded", file=sys.stderr)
    rows = []
    for mode, graph in modes:
        base = harness.time_us(per_beam, device, graph=graph)
        for name, fn in providers:
            us = base if fn is per_beam else harness.time_us(fn, device, graph=graph)
            rows.append(dict(benchmark="beam-group-attention", provider=f"{name}-{mode}", shape=shape,
                             dtype=str(dtype).replace("torch.", ""), median_us=f"{us:.1f}",
                             gbps=f"{nbytes / (us * 1e-6) / 1e9:.1f}", speedup=f"{base / us:.2f}",
                             _wrong=errs.get(fn, 0.0) > tol))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model dims; lengths 128..2048")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    lengths = [128, 512, 2048] if args.quick else [128, 512, 2048, 8192]
    dev_name, date, sha = harness.device_name(device), harness.now(), harness.commit()
    copy_gbps = harness.copy_bandwidth_gbps(device)
    print(f"# bench_kv on {dev_name}, torch {torch.__version__}, commit {sha}; copy bandwidth {copy_gbps:.1f} GB/s")
    rows = bench_fork(device, lengths, w=4, k=4, block_size=16, quick=args.quick)
    rows += bench_beam_group(device)
    if device.type == "cuda":
        rows += bench_decode(device, [1, 16, 64], [1024, 4096, 16384])
        rows += bench_decode(device, [1, 4], [65536])  # long contexts at one or a few sequences: split-KV
    else:
        print("paged decode attention vs SDPA: GPU only, skipped", file=sys.stderr)
    wrong = [r.pop("_wrong", False) for r in rows]
    for r in rows:
        r.update(date=date, commit=sha, device=dev_name)
    harness.print_table(rows, copy_gbps)
    if args.record:
        harness.append_results([r for r, bad in zip(rows, wrong) if not bad])
    return 1 if any(wrong) else 0


if __name__ == "__main__":
    raise SystemExit(main())
