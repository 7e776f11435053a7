"""Building the CUDA kernels of ``csrc/``.

* On first use on a CUDA machine, :func:`load` compiles them with ninja through
  ``torch.utils.cpp_extension.load`` into a cache folder (``$IVG_CUDA_CACHE``, default
  ``~/.cache/ivg_kernels/cuda-<key>``, the key hashing the sources and the torch/CUDA versions).
  ``IVG_CUDA_VERBOSE=1`` prints the compiler's commands.
* ``IVG_BUILD_CUDA=1 pip install -e .`` builds them ahead of time as ``ivg_kernels._C``;
  :func:`load` prefers that module when it imports.
* ``python -m ivg_kernels.build --check`` compiles every ``.cu`` file with ``nvcc`` for sm_80
  and sm_90a, with no GPU and no torch headers (the ``.cu`` files are torch-free).

``import ivg_kernels`` never compiles anything and never needs nvcc.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CHECK_ARCHS = ("sm_80", "sm_90a")


def sources() -> list[Path]:
    """The CUDA (.cu) and host (.cpp) sources of the extension."""
    if not CSRC.is_dir():
        raise FileNotFoundError(
            f"CUDA sources not found at {CSRC}: the CUDA backend needs a source checkout "
            "(pip install -e .) or the ahead-of-time build (IVG_BUILD_CUDA=1)")
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def _cache_dir() -> Path:
    import torch

    h = hashlib.sha256()
    for f in sorted(CSRC.glob("*")):
        if f.suffix in (".cu", ".cpp", ".h", ".cuh"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    h.update(f"{torch.__version__}/{torch.version.cuda}".encode())
    root = Path(os.environ.get("IVG_CUDA_CACHE", Path.home() / ".cache" / "ivg_kernels"))
    return root / f"cuda-{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def load(verbose: bool | None = None):
    """The compiled extension module (``ivg_kernels._C`` if built ahead of time, else a JIT build).

    Raises RuntimeError with the reason when it cannot be had (no CUDA torch, no nvcc, a compile error).
    """
    try:
        from . import _C  # type: ignore[attr-defined]

        return _C
    except ImportError:
        pass
    import torch

    if torch.version.cuda is None:
        raise RuntimeError("the CUDA backend needs a CUDA build of torch; this one is CPU-only")
    if verbose is None:
        verbose = os.environ.get("IVG_CUDA_VERBOSE", "0") == "1"
    from torch.utils.cpp_extension import load as _load

    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not verbose:
        print(f"ivg_kernels: building the CUDA kernels into {build_dir} (first use; about a minute)",
              file=sys.stderr, flush=True)
    try:
        mod = _load(name="ivg_kernels_cuda", sources=[str(s) for s in sources()], build_directory=str(build_dir),
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo", "-std=c++17"], verbose=verbose)
    except Exception as e:  # a compiler error: keep the message, say where the log is
        raise RuntimeError(f"building the CUDA kernels failed ({type(e).__name__}: {e}); "
                           "IVG_CUDA_VERBOSE=1 shows the compiler's output") from e
    if not verbose:
        print(f"ivg_kernels: CUDA kernels ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return mod


def cuda_backend_available() -> bool:
    """True when a CUDA device is present and the extension loads (building it if needed)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        load()
        return True
    except (RuntimeError, FileNotFoundError):
        return False


def nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def check(archs=CHECK_ARCHS, nvcc: str | None = None, quiet: bool = False) -> int:
    """Compile every ``csrc/*.cu`` for ``archs`` (object files thrown away). Returns the number of failures."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    gencode = []
    for arch in archs:
        num = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{num},code={arch}"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(CSRC.glob("*.cu")):
            t0 = time.perf_counter()
            cmd = [nvcc, "-std=c++17", "-O3", "-Xptxas", "-warn-spills", "-Werror", "all-warnings", *gencode,
                   "-c", str(src), "-o", str(Path(tmp) / (src.stem + ".o"))]
            res = subprocess.run(cmd, capture_output=True, text=True)
            ok = res.returncode == 0
            failures += not ok
            if not quiet or not ok:
                print(f"{'ok  ' if ok else 'FAIL'} {src.name} [{', '.join(archs)}] {time.perf_counter() - t0:.1f} s")
            if not ok:
                print(res.stdout + res.stderr)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivg_kernels.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compile every .cu with nvcc (no GPU needed)")
    ap.add_argument("--arch", nargs="*", default=list(CHECK_ARCHS), help="targets for --check (default sm_80 sm_90a)")
    ap.add_argument("--verbose", action="store_true", help="print the compiler's commands when building")
    args = ap.parse_args(argv)
    if args.check:
        try:
            failures = check(args.arch)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("all CUDA sources compile" if not failures else f"{failures} CUDA source(s) failed to compile")
        return 1 if failures else 0
    mod = load(verbose=args.verbose)
    print(f"loaded {mod.__name__} from {getattr(mod, '__file__', '?')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
