#!/usr/bin/env bash
# Prepare, on a machine with network, FlashInfer for the GPU machine (no network, Python 3.12, x86-64,
# CUDA 13 with nvcc), where benchmarks/bench_sampling.py and benchmarks/bench_kv.py run it beside this
# project's kernels:
#
#     bash benchmarks/fetch_flashinfer.sh            # writes .whl/flashinfer/ (about 19 MB)
#
# flashinfer-python 0.7.4 is a 101 MB wheel (716 MB unpacked), over the 64 MiB a device call may carry.
# It compiles its kernels on first use (JIT, with the machine's nvcc), so what the benchmarks need is its
# Python package, its headers and the few CUDA sources of the modules they build: sampling, batch decode,
# batch prefill and the cascade merge, and the paged-KV append. This script keeps every .py file (the
# package imports most of them at import time), the small .json files, data/include, data/cccl,
# data/spdlog, cutlass's headers (the Hopper prefill inside the cascade wrapper) and those sources,
# packs them as flashinfer-0.7.4-trimmed.tar.xz (19 MB with the next), and fetches the one
# dependency the GPU image lacks, apache-tvm-ffi (FlashInfer's binding layer; nvidia-ml-py, einops,
# requests, numpy, click, tabulate and tqdm are in the image). The import of flashinfer.sampling,
# .decode, .prefill, .cascade and .page from the trimmed tree is checked here, with this machine's
# Python; the JIT builds themselves can only be checked on the GPU machine.
#
# Where nvcc is here (CUDA 13, as on the GPU machine), the modules the benchmarks load are built ahead of time
# for sm_90a into the tree (benchmarks/flashinfer_aot.py, about 4 minutes on 2 cores; FLASHINFER_AOT=0 skips it):
# FlashInfer then loads them there instead of compiling them.
#
# `bash benchmarks/gpu_suite.sh flashinfer` unpacks it into a folder of its own there.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${FLASHINFER_VERSION:-0.7.4}"
TVM_FFI="${TVM_FFI_SPEC:-apache-tvm-ffi>=0.1.11,<0.2}"
out=.whl/flashinfer
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
rm -f "$out"/*.whl "$out"/*.tar.xz
python3 -m pip download -q --no-deps -d "$work/wheel" "flashinfer-python==$VERSION"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$out" "$TVM_FFI"
python3 - "$work/wheel"/flashinfer_python-*.whl "$work/tree" <<'EOF'
import re
import sys
import zipfile

wheel, tree = sys.argv[1], sys.argv[2]
# The CUDA sources of the JIT modules the benchmarks build, and every header beside them.
csrc = re.compile(r"flashinfer/data/csrc/(sampling\.cu|renorm\.cu|flashinfer_(sampling|cascade|page)_binding\.cu|batch_decode[^/]*"
                  r"|batch_prefill[^/]*|cascade[^/]*|single_decode[^/]*|single_prefill[^/]*|page[^/]*|[^/]*\.h)$")
keep_data = ("flashinfer/data/include/", "flashinfer/data/cccl/", "flashinfer/data/spdlog/",
             "flashinfer/data/cutlass/include/", "flashinfer/data/cutlass/tools/util/include/")  # fa3 prefill: cutlass


def keep(info) -> bool:
    name = info.filename
    if name.endswith("/") or "__pycache__" in name:
        return False
    if name.startswith("flashinfer/data/"):
        return name.startswith(keep_data) or bool(csrc.match(name)) or name.count("/") == 2
    if name.endswith((".py", ".typed")) or name.startswith("flashinfer_python-"):
        return True
    return name.endswith(".json") and info.file_size < 100_000


with zipfile.ZipFile(wheel) as z:
    members = [i for i in z.infolist() if keep(i)]
    z.extractall(tree, members=members)
    print(f"kept {len(members)} of {len(z.infolist())} files, "
          f"{sum(i.file_size for i in members) / 1e6:.0f} of {sum(i.file_size for i in z.infolist()) / 1e6:.0f} MB")
EOF
# This machine's Python gets the tvm-ffi version the GPU machine gets (its wheel for this Python, fetched aside):
# the ahead-of-time modules are built against its headers.
tvm_version=$(basename "$out"/apache_tvm_ffi-*.whl | cut -d- -f2)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/local" "apache-tvm-ffi==$tvm_version" nvidia-ml-py
python3 -m pip install -q --no-deps --no-compile --target "$work/deps" "$work/local"/*.whl
# The modules the benchmarks load, built ahead of time for sm_90a where nvcc is here (FLASHINFER_AOT=0: none;
# benchmarks/flashinfer_aot.py says which and why); without them FlashInfer compiles them on the GPU machine.
if [ "${FLASHINFER_AOT:-1}" != 0 ] && { command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; }; then
    PYTHONPATH="$work/tree:$work/deps" python3 benchmarks/flashinfer_aot.py "$work/tree" \
        || echo "flashinfer_aot failed: FlashInfer will compile its modules on the GPU machine"
else
    echo "no nvcc here: FlashInfer will compile its modules on the GPU machine (minutes)"
fi
tar -C "$work/tree" -cf - . | xz -9 -T0 > "$out/flashinfer-$VERSION-trimmed.tar.xz"
# The import check, with this machine's Python, and each prebuilt module loaded as FlashInfer loads it (its CUDA
# runtime from CUDA_HOME here; on the GPU machine torch has loaded it).
cuda_lib="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")}/lib64"
LD_LIBRARY_PATH="$cuda_lib:${LD_LIBRARY_PATH:-}" FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONPATH="$work/tree:$work/deps" \
    python3 -c 'import flashinfer.sampling, flashinfer.decode, flashinfer.prefill, flashinfer.cascade, flashinfer.page
import tvm_ffi
from flashinfer.jit import env
aot = sorted(env.FLASHINFER_AOT_DIR.glob("*/*.so"))
for path in aot:
    tvm_ffi.load_module(str(path))
print("import check: ok; prebuilt modules loaded:", len(aot))'
ls -la "$out"
du -sh "$out"
