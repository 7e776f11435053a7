"""Where an eager call of the sampler or the paged attention ops spends its host time (GPU only).

    python benchmarks/profile_eager.py [--top 25]

For the sampler (3 bf16 inputs, N=1, V=151936, T=0.7) and the paged decode attention (N=1, L=1024, GQA
32/8, D=128, bf16, block 16), each called through the public function, through its launcher (no argument
checks) and, for the attention, as a CUDA-graph replay (both public calls also with their remembered launches'
pointers passed as ints, ``launch.POINTERS_AS_INTS``); then the public shared-prefix decode (16 beams; also by
address), prefill (64 new tokens), KV write and draft draw (16 rows), which remember their eager calls too:
* host microseconds per call: 500 calls back to back, timed on the host before one synchronisation (the
  kernels are far shorter, so the host's time is what is measured);
* whether a call synchronises with the device (``torch.cuda.set_sync_debug_mode("warn")`` over three calls:
  each synchronising operation warns, with where it happened);
* a cProfile of 300 calls of the public function, the ``--top`` functions by own time.

``bench_sampling.py``/``bench_kv.py`` give eager and graph medians; this says what the difference is made of.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def host_us(fn, calls: int = 500) -> float:
    """Host microseconds per call of ``fn``, ``calls`` calls back to back (one synchronisation after)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * host / calls


def syncs(fn) -> list[str]:
    """The synchronising operations of three calls of ``fn``: each warning's first line."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # (the first warning of the mode is a notice that it is a prototype, not a synchronisation)
    return [str(w.message).splitlines()[0][:160] for w in caught if "called a synchronizing" in str(w.message)]


def profile(fn, top: int, calls: int = 300) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def by_address(name, fn):
    """The case ``(name, fn)`` with ``launch.POINTERS_AS_INTS`` set while it is used (the caller uses each case up
    before asking for the next): the remembered launches pass their tensors' addresses, which Triton's launchers
    take without a driver query per tensor."""
    from ivg_kernels._triton import launch

    launch.POINTERS_AS_INTS = True
    try:
        yield name, fn
    finally:
        launch.POINTERS_AS_INTS = False


def cases(device):
    import ivg_kernels
    from ivg_kernels._triton.attention_kernels import launch_paged_decode_attention
    from ivg_kernels._triton.sampling_kernels import launch_guided_sample
    from ivg_kernels.block_manager import BlockManager

    n, v = 1, 151936
    x = [torch.randn(n, v, device=device).to(torch.bfloat16) for _ in range(3)]
    seed, offset = torch.arange(n, device=device), torch.zeros(n, dtype=torch.int64, device=device)
    sample = lambda: ivg_kernels.guided_sample(  # noqa: E731
        x[0], [(x[1], 1.0), (x[2], -1.0)], temperature=0.7, seed=seed, offset=offset, backend="triton")
    yield ("sampler N=1 V=151936 public", sample)
    yield from by_address("sampler N=1 V=151936 public, int ptrs", sample)
    yield ("sampler N=1 V=151936 launcher", lambda: launch_guided_sample(
        x[0], x[1:], [1.0, -1.0], None, None, 0.7, None, 0, None, 1.0, None, 0.0, seed, 0, offset, 0, v, False, 0))
    h, h_kv, d, bs, length = 32, 8, 128, 16, 1024
    nb = length // bs + 1
    kc = torch.randn(nb, bs, h_kv, d, dtype=torch.bfloat16, device=device)
    vc = torch.randn_like(kc)
    bm = BlockManager(nb, bs)
    seqs = bm.new_sequences(1)
    bm.append(seqs, length)
    bt, sl = bm.block_table(seqs).to(device), bm.seq_lens(seqs).to(device)
    q = torch.randn(1, h, d, dtype=torch.bfloat16, device=device)
    decode = lambda: ivg_kernels.paged_decode_attention(q, kc, vc, bt, sl, scale=d ** -0.5, backend="triton")  # noqa: E731
    yield ("decode attention N=1 L=1024 public", decode)
    yield from by_address("decode attention N=1 L=1024 public, int ptrs", decode)
    yield ("decode attention N=1 L=1024 launcher", lambda: launch_paged_decode_attention(
        q, kc, vc, bt, sl, d ** -0.5, 0, 0))
    # the other eager ops that remember their calls: 16 beams over one shared 1,024-token prefix, an extend of 64
    # new tokens (the last 64 of the row), a KV write of 16 tokens, 16 draft draws
    q16, bt16, sl16 = q.expand(16, h, d).contiguous(), bt.expand(16, -1).contiguous(), sl.expand(16).contiguous()
    starts = torch.tensor([0, 16], dtype=torch.int32, device=device)
    shared = torch.tensor([length - length % bs], dtype=torch.int32, device=device)
    grouped = lambda: ivg_kernels.shared_prefix_decode_attention(  # noqa: E731
        q16, kc, vc, bt16, sl16, starts, shared, max_group_rows=16, scale=d ** -0.5, backend="triton")
    yield ("shared-prefix attention 16 beams public", grouped)
    yield from by_address("shared-prefix attention 16 beams, int ptrs", grouped)
    q64, cu = torch.randn(64, h, d, dtype=torch.bfloat16, device=device), torch.tensor([0, 64], dtype=torch.int32,
                                                                                       device=device)
    yield ("prefill attention 64 new public", lambda: ivg_kernels.paged_prefill_attention(
        q64, kc, vc, bt, sl, cu, max_seqlen_q=64, scale=d ** -0.5, backend="triton"))
    key, slots = torch.randn(16, h_kv, d, dtype=torch.bfloat16, device=device), torch.arange(16, device=device)
    yield ("write_kv 16 tokens public", lambda: ivg_kernels.write_kv(kc, vc, key, key, slots, backend="triton"))
    keys = torch.arange(16, device=device)
    yield ("draft draw R=16 V=151936 public", lambda: ivg_kernels.draft_sample(
        x[0].expand(16, v), temperature=0.7, seed=keys, offset=keys, backend="triton"))
    one = torch.zeros(1, device=device)
    yield ("empty op (x.add_(1))", lambda: one.add_(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=25, help="functions listed per profile")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_eager: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"# profile_eager on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = []
    for name, fn in cases(device):
        us = host_us(fn)
        found = syncs(fn)
        rows.append((name, us, len(found)))
        print(f"{name}: {us:.1f} us of host time per call; {len(found)} synchronising operations in 3 calls")
        for line in found[:3]:
            print(f"    sync: {line}")
        if name.endswith("public"):
            print(profile(fn, args.top))
    print(f"{'case':46s} {'host us':>8s}  syncs/3 calls")
    for name, us, n in rows:
        print(f"{name:46s} {us:8.1f}  {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
