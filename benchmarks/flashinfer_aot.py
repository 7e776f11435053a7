"""Build ahead of time, for sm_90a, the FlashInfer modules the benchmarks load on the GPU machine.

    python3 benchmarks/flashinfer_aot.py TREE        # run by benchmarks/fetch_flashinfer.sh

FlashInfer compiles each kernel module on first use (JIT, nvcc). On the GPU machine that took more of a lease than
the measurements themselves, so ``fetch_flashinfer.sh`` builds here, on any machine with nvcc 13 (no GPU needed),
the modules ``bench_sampling.py`` and ``bench_kv.py`` ask for on an H100/H200, and puts each one where FlashInfer
looks first for a prebuilt module: ``TREE/flashinfer/data/aot/<name>/<name>.so``. FlashInfer loads those without
nvcc; one that fails to load is built by its JIT as before (FlashInfer logs a warning), so nothing is lost.

The modules (bfloat16, head dim 128, int32 indices, no positional encoding, window or soft-capping):
``sampling``; the paged decode of ``BatchDecodeWithPagedKVCacheWrapper`` (CUDA cores, its default); the FA2 prefill
of ``BatchPrefillWithPagedKVCacheWrapper``, primary and paged modules, which the two levels of
``MultiLevelCascadeAttentionWrapper`` use (FlashInfer 0.7.4 takes FA2 for queries of at most 64 tokens also where
FA3 exists); and ``cascade``'s state merge. Found by running ``bench_kv``'s wrappers on this CPU with FlashInfer's
device checks answering as an sm_90 device would.

Where this machine lacks them, the build gets cuRAND's headers (the ``nvidia-curand`` wheel, headers only) and a
stand-in ``libcuda.so`` to link against (its soname ``libcuda.so.1``: the driver's library on the GPU machine).
``TREE`` must be importable with FlashInfer's Python dependencies and apache-tvm-ffi of the version the GPU machine
gets (``fetch_flashinfer.sh`` pins one).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ARCH = "9.0a"  # H100 and H200


def _cuda_home() -> Path:
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    if nvcc is None:
        raise SystemExit("flashinfer_aot: nvcc not found (set CUDA_HOME)")
    home = Path(nvcc).resolve().parent.parent
    return home if (home / "include" / "cuda.h").exists() else Path("/usr/local/cuda")


def _prepare_build_env(work: Path) -> dict:
    """The environment variables FlashInfer's JIT reads for this build."""
    cuda = _cuda_home()
    env = {"FLASHINFER_CUDA_ARCH_LIST": ARCH, "CUDA_HOME": str(cuda), "FLASHINFER_WORKSPACE_BASE": str(work / "ws")}
    extra_cuda, extra_ld = [], []
    if not (cuda / "include" / "curand.h").exists():  # sampling.cuh includes it
        inc = work / "include"
        inc.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work / "curand"),
                        "nvidia-curand"], check=True)
        for wheel in (work / "curand").glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if "/include/curand" in name and name.endswith(".h"):
                        (inc / Path(name).name).write_bytes(z.read(name))
        extra_cuda += ["-isystem", str(inc)]
    if not any((cuda / d / "libcuda.so").exists() for d in ("lib64", "lib64/stubs")):
        stubs = work / "stubs"
        stubs.mkdir(parents=True, exist_ok=True)
        (work / "empty.c").write_text("\n")
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(stubs / "libcuda.so"), "-Wl,-soname,libcuda.so.1",
                        str(work / "empty.c")], check=True)
        extra_ld += [f"-L{stubs}"]
    if extra_cuda:
        env["FLASHINFER_EXTRA_CUDAFLAGS"] = " ".join(extra_cuda)
    if extra_ld:
        env["FLASHINFER_EXTRA_LDFLAGS"] = " ".join(extra_ld)
    return env


def _specs():
    """``(what, JitSpec)`` of every module built (FlashInfer imported after the environment is set)."""
    import torch
    from flashinfer.decode import gen_batch_decode_module
    from flashinfer.jit.cascade import gen_cascade_module
    from flashinfer.jit.sampling import gen_sampling_module
    from flashinfer.prefill import _gen_batch_prefill_independent_paged_module, _gen_batch_prefill_primary_module

    bf16, i32 = torch.bfloat16, torch.int32
    prefill = ("fa2", bf16, bf16, bf16, i32, 128, 128, 0, False, False, False)  # (.., posenc, window, cap, f16qk)
    return [("sampling", gen_sampling_module()),
            ("paged decode", gen_batch_decode_module(bf16, bf16, bf16, i32, 128, 128, 0, False, False)),
            ("FA2 prefill", _gen_batch_prefill_primary_module(*prefill)),
            ("FA2 paged prefill", _gen_batch_prefill_independent_paged_module(*prefill)),
            ("cascade merge", gen_cascade_module())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", help="the folder holding the flashinfer package (the trimmed tree)")
    args = ap.parse_args(argv)
    tree = Path(args.tree).resolve()
    work = Path(tempfile.mkdtemp(prefix="flashinfer-aot-"))
    try:
        os.environ.update(_prepare_build_env(work))
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        sys.path.insert(0, str(tree))
        import flashinfer

        if Path(flashinfer.__file__).resolve().parent != tree / "flashinfer":
            raise SystemExit(f"flashinfer_aot: imported {flashinfer.__file__}, not the one in {tree}")
        for what, spec in _specs():
            t0 = time.perf_counter()
            spec.build(verbose=False)
            dest = tree / "flashinfer" / "data" / "aot" / spec.name / f"{spec.name}.so"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(spec.jit_library_path, dest)
            print(f"flashinfer_aot: {what}: {spec.name} ({dest.stat().st_size / 1e6:.1f} MB, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
