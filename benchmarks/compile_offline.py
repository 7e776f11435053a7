"""Compile every Triton kernel of the project for a GPU architecture, without a GPU.

    python benchmarks/compile_offline.py            # sm_90 (H100/H200)
    python benchmarks/compile_offline.py --arch 80  # A100

The tests run the kernels under ``TRITON_INTERPRET=1``, which never compiles them; the first GPU run
is then the first time the compiler sees them, and a construct the interpreter accepts but the
compiler rejects costs a lent machine's minutes. This runs the real launchers (sampler, speculative
verification, attention, KV writes) on CPU tensors at the shapes and options the GPU path uses, with
Triton's driver replaced by one that reports the chosen architecture and launches nothing: each
kernel is specialised exactly as on the GPU (argument alignment, divisibility, constexprs) and
compiled to a cubin by Triton's own ptxas. It prints each compiled variant with its registers, spills
and shared memory (from ``cuobjdump -res-usage``), and exits 1 when any launcher fails to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Recorder:
    """Stands for a compiled kernel's launcher: records each launch instead of making it."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        if self.launches is not None:  # compile-only mode drops the launches of kernels already compiled
            self.launches.append((self.name, (gx, gy, gz), args))


class _OfflineDriver:
    """A Triton driver that targets ``arch`` and has no device: enough for the JIT to specialise and
    compile. With ``launches`` (a list), kernels load as stand-ins and each launch is recorded there
    (name, grid, arguments as the launcher receives them); without it, nothing may launch."""

    def __init__(self, arch: int, launches: list | None = None):
        import types

        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.launcher_cls = lambda src, metadata: _Recorder(metadata.name, launches)
        self.utils = types.SimpleNamespace(
            get_device_properties=lambda device: {"max_shared_mem": 232448, "multiprocessor_count": 132},
            load_binary=lambda name, kernel, shared, device: (0, 0, 0, 0, 1024),  # module, function, regs, ...
        )

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def offline_target(arch: int = 90, launches: list | None = None):
    """Within this block every ``kernel[grid](...)`` compiles for ``arch``; yields the list that collects
    ``(kernel name, compiled kernel)`` per compilation or launch. Without ``launches`` nothing launches
    (launches become compile-only warm-ups); with it, launches are recorded there (see _OfflineDriver)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline_target: unset TRITON_INTERPRET (the interpreter never compiles)")
    compiled, touched = [], set()
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        kernel = run(self, *args, grid=grid, warmup=warmup or launches is None, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    active = driver._active
    driver.set_active(_OfflineDriver(arch, launches))
    JITFunction.run = compile_only
    try:
        yield compiled
    finally:
        JITFunction.run = run
        driver._active = active
        for fn in touched:  # their binders and caches hold the offline target: rebuilt on the next real launch
            fn.device_caches.clear()
        for _, kernel in compiled:  # loaded as stand-ins: nothing for the real driver to unload
            if kernel is not None:
                kernel.module = None
        from ivg_kernels._triton import launch

        launch._LAUNCHERS.clear()  # the direct launchers' kernels were compiled for the offline target


class via_triton:
    """Stands for ``launch.direct(fn)`` in a launcher (``module.direct = via_triton``): every launch, keyed or
    not, goes through Triton's own ``fn[grid]`` (to compare the two paths)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn[grid]

    def key(self, key):
        return self.fn


def on_cubin(tool: str, kernel, *args: str) -> str:
    """The output of one of Triton's bundled CUDA tools (``cuobjdump``, ``nvdisasm``) on a compiled kernel's cubin."""
    import triton

    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(binary), *args, str(cubin)], capture_output=True, text=True, check=True).stdout


def resources(kernel) -> dict:
    """Registers, stack bytes (where spilled registers go) and shared memory of a compiled kernel's cubin, and
    whether it was compiled with FMA contraction."""
    usage = on_cubin("cuobjdump", kernel, "-res-usage")

    def field(name):
        m = re.search(rf"{name}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    return {"registers": field("REG"), "stack": field("STACK"), "shared": kernel.metadata.shared,
            "fp_fusion": kernel.metadata.enable_fp_fusion}


def _sampler_cases():
    """The sampler's launcher at the shapes the GPU benchmark and decoder use: 1 and 3 bf16 inputs, slices
    of 4096 (N >= 8 at V=151936) and 1024 (N=1), filters off and on, scalar and per-row parameters."""
    import torch

    from ivg_kernels._triton.sampling_kernels import launch_guided_sample

    v = 151936
    for nin, n, filters, per_row in ((3, 256, False, False), (3, 1, False, False), (3, 256, True, False),
                                     (3, 1, True, True), (1, 64, True, False), (2, 4, False, True)):
        inputs = [torch.empty(n, v, dtype=torch.bfloat16) for _ in range(nin)]
        rows = (lambda dt: torch.zeros(n, dtype=dt)) if per_row else (lambda dt: None)
        weights = torch.ones(n, nin - 1) if per_row and nin > 1 else None
        yield (f"guided_sample inputs={nin} N={n} filters={filters} per_row={per_row}",
               lambda: launch_guided_sample(inputs[0], inputs[1:], [] if weights is not None else [1.0] * (nin - 1),
                                            weights, rows(torch.float32), 0.7, rows(torch.int64), 50 if filters else 0,
                                            rows(torch.float32), 0.9 if filters else 1.0, rows(torch.float32), 0.0,
                                            rows(torch.int64), 1, rows(torch.int64), 3, v, filters, 0))


def _speculative_cases():
    import torch

    from ivg_kernels._triton.speculative_kernels import launch_draft_sample, launch_speculative_verify

    r, s, v = 4, 5, 151936
    for temperature in (0.7, 0.0):
        yield (f"draft_sample R={r} T={temperature}", lambda t=temperature: launch_draft_sample(
            torch.empty(r, v, dtype=torch.bfloat16), t, torch.zeros(r, dtype=torch.int64),
            torch.zeros(r, dtype=torch.int64), v))
        x = [torch.empty(r, s, v, dtype=torch.bfloat16) for _ in range(3)]
        yield (f"speculative_verify R={r} gamma={s - 1} T={temperature}",
               lambda x=x, t=temperature: launch_speculative_verify(
                   x[0], x[1:], [1.0, -1.0], torch.empty(r, s, v, dtype=torch.bfloat16),
                   torch.zeros(r, s - 1, dtype=torch.int64), torch.full((r,), s - 1, dtype=torch.int32), t,
                   torch.zeros(r, dtype=torch.int64), torch.zeros(r, dtype=torch.int64), v))


def _attention_cases():
    """Decode (one split and several), prefill, shared-prefix decode and KV writes: GQA 32/8, D=128, block 16;
    and each attention kernel with soft-capping, sinks (float32 and the cache's dtype) and a window."""
    import torch

    from ivg_kernels._triton import attention_kernels as ak

    h, h_kv, d, bs, blocks = 32, 8, 128, 16, 512
    for dtype in (torch.bfloat16, torch.float32):
        kc = torch.empty(blocks, bs, h_kv, d, dtype=dtype)
        vc = torch.empty_like(kc)

        def table(n, width):
            return torch.zeros(n, width, dtype=torch.int32)

        name = str(dtype).split(".")[1]
        yield (f"write_kv {name}", lambda kc=kc, vc=vc: ak.launch_write_kv(
            kc, vc, torch.empty(8, h_kv, d, dtype=kc.dtype), torch.empty(8, h_kv, d, dtype=kc.dtype),
            torch.zeros(8, dtype=torch.int64)))
        for n, width, splits in ((16, 64, 1), (1, 64, 0), (1, 1024, 0)):  # the last: tiles of 64 keys (16-bit)
            yield (f"paged_decode_attention {name} N={n} L={width * bs} splits={splits or 'auto'}",
                   lambda kc=kc, vc=vc, n=n, width=width, splits=splits: ak.launch_paged_decode_attention(
                       torch.empty(n, h, d, dtype=kc.dtype), kc, vc, table(n, width), torch.ones(n, dtype=torch.int32),
                       d ** -0.5, 0, splits))
        yield (f"paged_prefill_attention {name}", lambda kc=kc, vc=vc: ak.launch_paged_prefill_attention(
            torch.empty(64, h, d, dtype=kc.dtype), kc, vc, table(2, 8), torch.full((2,), 64, dtype=torch.int32),
            torch.tensor([0, 32, 64], dtype=torch.int32), 32, d ** -0.5, 0))
        yield (f"shared_prefix_decode_attention {name}", lambda kc=kc, vc=vc: ak.launch_shared_prefix_decode_attention(
            torch.empty(16, h, d, dtype=kc.dtype), kc, vc, table(16, 136), torch.full((16,), 2112, dtype=torch.int32),
            torch.tensor([0, 16], dtype=torch.int32), torch.tensor([2048], dtype=torch.int32), 16, d ** -0.5, 0, 0))
        # Gemma 2's logit soft-capping and gpt-oss's sinks (the SOFTCAP/SINKS variants), with a sliding window
        for cap, sinks in ((30.0, None), (0.0, torch.zeros(h, dtype=torch.float32)), (50.0, torch.zeros(h))):
            what = f"{name} softcap={cap:g} sinks={'yes' if sinks is not None else 'no'} window=512"
            yield (f"paged_decode_attention {what} N=1 L=16384", lambda kc=kc, vc=vc, cap=cap, sinks=sinks:
                   ak.launch_paged_decode_attention(torch.empty(1, h, d, dtype=kc.dtype), kc, vc, table(1, 1024),
                                                    torch.ones(1, dtype=torch.int32), d ** -0.5, 512, 0, cap, sinks))
            yield (f"paged_prefill_attention {what}", lambda kc=kc, vc=vc, cap=cap, sinks=sinks:
                   ak.launch_paged_prefill_attention(
                       torch.empty(64, h, d, dtype=kc.dtype), kc, vc, table(2, 8), torch.full((2,), 64, dtype=torch.int32),
                       torch.tensor([0, 32, 64], dtype=torch.int32), 32, d ** -0.5, 512, cap, sinks))
            yield (f"shared_prefix_decode_attention {what}", lambda kc=kc, vc=vc, cap=cap, sinks=sinks:
                   ak.launch_shared_prefix_decode_attention(
                       torch.empty(16, h, d, dtype=kc.dtype), kc, vc, table(16, 136),
                       torch.full((16,), 2112, dtype=torch.int32), torch.tensor([0, 16], dtype=torch.int32),
                       torch.tensor([2048], dtype=torch.int32), 16, d ** -0.5, 512, 0, cap, sinks))


def cases():
    """``(description, thunk)`` for every launcher configuration checked."""
    yield from _sampler_cases()
    yield from _speculative_cases()
    yield from _attention_cases()


def check(arch: int = 90, only: str | None = None, verbose: bool = True) -> list:
    """Compile every case for ``arch``; returns ``[(description, error or None, [(kernel, resources)])]``."""
    results = []
    for desc, thunk in cases():
        if only and only not in desc:
            continue
        t0 = time.perf_counter()
        with offline_target(arch) as compiled:
            try:
                thunk()
                error = None
            except Exception as e:  # noqa: BLE001 - reported per case
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        kernels = [(name, resources(k)) for name, k in compiled if k is not None and error is None]
        results.append((desc, error, kernels))
        if verbose:
            status = "FAILED " + error if error else "ok"
            print(f"{desc}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
            for name, r in kernels:
                print(f"    {name}: {r['registers']} registers, {r['stack']} B stack (spills), {r['shared']} B shared")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--only", help="only the cases whose description contains this text")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    results = check(args.arch, args.only)
    failed = [d for d, e, _ in results if e]
    print(f"sm_{args.arch}: {len(results) - len(failed)} of {len(results)} launcher configurations compiled"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
