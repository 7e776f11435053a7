"""Instructions per token of the sampler's stage 1, from its machine code, without a GPU.

    python benchmarks/sass_count.py                # sm_90 (H100/H200), 3 bf16 inputs, slices of 4096
    python benchmarks/sass_count.py --arch 80 --inputs 1 --block 1024

Compiles ``_stage1_kernel`` with Triton for the chosen architecture (no driver needed: Triton ships
ptxas and nvdisasm), with the launch options and argument alignment the launcher gives it on a GPU,
disassembles the cubin and counts SASS instructions. Stage 1 has no loops (every tile operation is
unrolled), so the static count is the path each thread runs, apart from the slow paths of ``div_rn``
(taken only for denormal or huge quotients); divided by the tokens each thread holds it gives the
instructions issued per token. The kernel streams ``2 * inputs`` bytes per token (bf16): on an H100
(about 33 T thread-instructions/s, 3.0 TB/s copy) it is memory-bound below about 60-80 instructions
per token, on an H200 (4.3 TB/s) below about 45-60. This is a proxy for the GPU time the benchmark
measures, not a replacement for it.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _signature(fn, nin: int, v_div16: bool):
    """Types and 16-byte divisibility of every argument, as the JIT's specialisation gives them on a GPU
    (an integer argument that is a multiple of 16, such as V = 151936, is specialised as such)."""
    sig, attrs, div16 = {}, {}, [["tt.divisibility", 16]]
    for idx, name in enumerate(fn.arg_names):
        if name in ("inputs", "strides"):
            sig[name] = tuple(["*bf16" if name == "inputs" else "i32"] * nin)
            attrs.update({(idx, j): div16 for j in range(nin)})
        elif name == "w_vals":
            sig[name] = tuple(["fp32"] * 6)
        elif name == "t_val":
            sig[name] = "fp32"
        elif name in ("V", "S", "NG", "w_stride"):
            sig[name] = "i32"
            if name == "V" and v_div16:
                attrs[(idx,)] = div16
        elif name.isupper():
            sig[name] = "constexpr"
        elif name.startswith("off_"):  # byte offsets in the scratch allocation: multiples of 16
            sig[name] = "i32"
            attrs[(idx,)] = div16
        else:  # pointers
            sig[name] = {"ws": "*u8"}.get(name, "*fp32")
            attrs[(idx,)] = div16
    return sig, attrs


def count(arch: int, nin: int, block: int, filters: bool, vocab: int, dump: str | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ivg_kernels._triton import sampling_kernels as sk

    fn = sk._stage1_kernel
    sig, attrs = _signature(fn, nin, vocab % 16 == 0)
    const = {"NIN": nin, "W_TENSOR": False, "T_TENSOR": False, "FILTER": filters,
             "C": min(sk.MAX_CANDIDATES, block), "BLOCK": block, "GR": min(getattr(sk, "GRANULE", 256), block)}
    warps = 8 if block >= 4096 else 4  # as the launcher
    kernel = triton.compile(ASTSource(fn, sig, {k: v for k, v in const.items() if k in fn.arg_names}, attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "enable_fp_fusion": False})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(nvdisasm.parent / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    if dump:
        Path(dump).write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    total = sum(ops.values())
    return {"arch": arch, "inputs": nin, "block": block, "filters": filters, "vocab": vocab, "instructions": total,
            "per_token": total / (block // (warps * 32)), "registers": int(regs.group(1)) if regs else "?", "top": ops.most_common(8)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--inputs", type=int, default=3, help="1 + guides (default 3: base, tuned, reference)")
    ap.add_argument("--block", type=int, default=4096, help="slice width (default 4096, what N >= 8 gets at V=151936)")
    ap.add_argument("--vocab", type=int, default=151936, help="V: a multiple of 16 is specialised, and lets loads "
                    "be vectorised (default 151936)")
    ap.add_argument("--dump", metavar="DIR", help="also write each kernel's SASS to DIR/stage1_filters-*.sass")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    for filters in (False, True):
        r = count(args.arch, args.inputs, args.block, filters, args.vocab,
                  args.dump and str(Path(args.dump) / f"stage1_filters-{filters}.sass"))
        print(f"stage 1 sm_{r['arch']} inputs={r['inputs']} V={r['vocab']} block={r['block']} filters={r['filters']}: "
              f"{r['instructions']} instructions, {r['per_token']:.0f} per token, {r['registers']} registers; "
              + ", ".join(f"{k} {v}" for k, v in r["top"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
