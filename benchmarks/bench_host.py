"""Host time of eager kernel calls, measured without a GPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_host.py [--record]

An eager call's host work (argument checks, allocations, Triton's argument binding, the launch) is
plain Python and C++ on the CPU, the same with or without a GPU, except the driver's launch call
itself and CUDA allocations. This runs the public functions (their checks, dispatch and launchers) on CPU
tensors with the kernels compiled for sm_90 and a stand-in driver that records each launch instead of making it
(benchmarks/compile_offline.py), and times them per call: through the direct launches the launchers
use (``ivg_kernels/_triton/launch.py``) and through Triton's ``kernel[grid]``, beside an empty torch op
(``torch.empty(1).add_(1)``) on the CPU in the same run. On a GPU add the driver's launch (a few
microseconds per kernel) and CUDA's allocator; ``bench_sampling``/``bench_kv`` measure that there.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchmarks.harness import append_results, commit, now  # noqa: E402


def _per_call_us(fn, launches: list, reps: int = 2000, rounds: int = 5) -> float:
    """Median over rounds of the mean microseconds per call (recorded launches dropped each call)."""
    for _ in range(100):
        fn()
        launches.clear()
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
            launches.clear()
        means.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(means)


@contextlib.contextmanager
def _public_calls_on_cpu():
    """Let the public functions take ``backend="triton"`` with CPU tensors: they accept that only under
    the interpreter, which they read from ``TRITON_INTERPRET`` at call time, while the kernels, decorated
    at import without it, stay compiled ones (bf16 attention then takes its float32-dot variant, as
    interpreted runs do: the same host work)."""
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


def cases():
    """``(benchmark, shape, thunk, kernel modules whose ``direct`` the Triton-path run replaces)``."""
    from ivg_kernels._triton import attention_kernels as ak
    from ivg_kernels._triton import sampling_kernels as sk

    import ivg_kernels

    v = 151936
    for n in (1, 64):
        x = [torch.zeros(n, v, dtype=torch.bfloat16) for _ in range(3)]
        for filters in (False, True):
            def call(x=x, filters=filters):
                return ivg_kernels.guided_sample(x[0], [(x[1], 1.0), (x[2], -1.0)], temperature=0.7,
                                                 top_k=50 if filters else 0, top_p=0.9 if filters else 1.0,
                                                 seed=1, offset=3, backend="triton")
            yield ("guided_sample", f"N={n},V={v},inputs=3,filters={'top_k=50,top_p=0.9' if filters else 'none'}",
                   call, (sk,))
    h, h_kv, d, bs = 32, 8, 128, 16
    kc = torch.zeros(256, bs, h_kv, d, dtype=torch.bfloat16)
    for n in (1, 16):
        q = torch.zeros(n, h, d, dtype=torch.bfloat16)
        table, lens = torch.zeros(n, 64, dtype=torch.int32), torch.full((n,), 1024, dtype=torch.int32)
        yield ("paged_decode_attention", f"N={n},L=1024,heads={h}/{h_kv},D={d},block={bs}",
               lambda q=q, table=table, lens=lens: ivg_kernels.paged_decode_attention(
                   q, kc, kc, table, lens, scale=d ** -0.5, backend="triton"), (ak,))
    q = torch.zeros(16, h, d, dtype=torch.bfloat16)  # one prompt's 16 beams over a shared 2,048-token prefix
    table, lens = torch.zeros(16, 132, dtype=torch.int32), torch.full((16,), 2112, dtype=torch.int32)
    starts, shared = torch.tensor([0, 16], dtype=torch.int32), torch.tensor([2048], dtype=torch.int32)
    yield ("shared_prefix_decode_attention", f"N=16,groups=1,shared=2048,L=2112,heads={h}/{h_kv},D={d},block={bs}",
           lambda: ivg_kernels.shared_prefix_decode_attention(q, kc, kc, table, lens, starts, shared, max_group_rows=16,
                                                              scale=d ** -0.5, backend="triton"), (ak,))
    q = torch.zeros(4 * 64, h, d, dtype=torch.bfloat16)  # an extend: 4 sequences read 64 new tokens each
    table, lens = torch.zeros(4, 64, dtype=torch.int32), torch.full((4,), 1024, dtype=torch.int32)
    cu = torch.arange(0, 4 * 64 + 1, 64, dtype=torch.int32)
    yield ("paged_prefill_attention", f"B=4,new=64,L=1024,heads={h}/{h_kv},D={d},block={bs}",
           lambda: ivg_kernels.paged_prefill_attention(q, kc, kc, table, lens, cu, max_seqlen_q=64, scale=d ** -0.5,
                                                       backend="triton"), (ak,))
    key = torch.zeros(16, h_kv, d, dtype=torch.bfloat16)
    slots = torch.arange(16)
    yield ("write_kv", f"T=16,kv_heads={h_kv},D={d}",
           lambda: ivg_kernels.write_kv(kc, kc, key, key, slots, backend="triton"), (ak,))
    from ivg_kernels._triton import speculative_kernels as spk

    for r in (1, 16):  # a speculative round's draft draw, once per drafted token
        draft, keys = torch.zeros(r, v, dtype=torch.bfloat16), torch.arange(r)
        yield ("draft_sample", f"R={r},V={v},T=0.7",
               lambda draft=draft, keys=keys: ivg_kernels.draft_sample(draft, temperature=0.7, seed=keys, offset=keys,
                                                                        backend="triton"), (spk,))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="append the rows to benchmarks/results.csv")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    import compile_offline as co
    from ivg_kernels._triton import launch

    empty = _per_call_us(lambda: torch.empty(1).add_(1), [])
    import triton

    device = f"cpu host path, launches stubbed, Triton {triton.__version__} ({os.cpu_count()} cores, 1 thread)"
    rows, stamp, rev = [], now(), commit()
    print(f"empty torch op (CPU): {empty:.1f} us per call")
    rows.append(dict(date=stamp, commit=rev, device=device, benchmark="host-eager", provider="empty-torch-op",
                     shape="torch.empty(1).add_(1)", dtype="float32", median_us=f"{empty:.1f}", speedup="1.00"))
    from ivg_kernels import _eager_sample, attention, speculative

    # the functions that remember the calls they have checked (ivg_kernels/_eager.py), and how to turn it off
    remembering = {"guided_sample": _eager_sample.CALLS, "paged_decode_attention": attention.DECODE_CALLS,
                   "shared_prefix_decode_attention": attention.SHARED_CALLS, "write_kv": attention.WRITE_CALLS,
                   "paged_prefill_attention": attention.PREFILL_CALLS,
                   "draft_sample": speculative.DRAFT_CALLS}
    for bench, shape, fn, modules in cases():
        launches = []
        with co.offline_target(90, launches), _public_calls_on_cpu():
            fn()  # compile (or load from Triton's cache)
            direct = _per_call_us(fn, launches)
            measured = [("direct-launch", direct)]
            if bench in remembering:  # the same calls, every one checked and planned (no remembered signature)
                remembering[bench].enabled = False
                try:
                    checked = _per_call_us(fn, launches)
                finally:
                    remembering[bench].enabled = True
                measured.append(("checked-direct-launch", checked))
            for m in modules:
                m.direct = co.via_triton
            try:
                fn()
                triton_path = _per_call_us(fn, launches)
            finally:
                for m in modules:
                    m.direct = launch.direct
            measured.append(("triton-kernel[grid]", triton_path))
        also = f", every call checked {checked:6.1f} us" if bench in remembering else ""
        print(f"{bench:<30} {shape:<60} direct {direct:6.1f} us{also}, kernel[grid] {triton_path:6.1f} us "
              f"({triton_path / direct:.2f}x), {direct / empty:.1f}x an empty torch op")
        for provider, us in measured:
            rows.append(dict(date=stamp, commit=rev, device=device, benchmark=f"host-eager-{bench}", provider=provider,
                             shape=shape, dtype="bfloat16", median_us=f"{us:.1f}", speedup=f"{triton_path / us:.2f}"))
    if args.record:
        append_results(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
