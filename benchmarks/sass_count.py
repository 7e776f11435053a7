"""Instructions per token of the sampler's stage 1, from its machine code, without a GPU.

    python benchmarks/sass_count.py                # sm_90 (H100/H200), 3 bf16 inputs, slices of 4096
    python benchmarks/sass_count.py --arch 80 --inputs 1 --block 1024
    python benchmarks/sass_count.py --warps 8 4    # stage 1's warps on slices of 4,096 (tune_stage1.py times them)

Compiles ``_stage1_kernel`` for the chosen architecture through the sampler's own launcher
(``compile_offline.offline_target``: no driver needed, Triton ships ptxas and nvdisasm), so with the
launch options and argument alignment a GPU call gives it, disassembles the cubin and counts SASS instructions. Stage 1 has no loops (every tile operation is
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def count(arch: int, nin: int, block: int, filters: bool, vocab: int, dump: str | None = None,
          warps: int | None = None) -> dict:
    """``warps``: stage 1's warps on slices of 4,096 (``sampling_kernels.STAGE1_WARPS_WIDE``; None: the launcher's)."""
    import torch

    from compile_offline import offline_target, on_cubin, resources
    from ivg_kernels._triton import sampling_kernels as sk
    from ivg_kernels._triton.sampling_kernels import launch_guided_sample

    # The launcher itself, on CPU tensors, with the kernels compiled for ``arch`` and nothing launched: the
    # argument alignment, constexprs and launch options are those a GPU call gets.
    x = [torch.empty(1, vocab, dtype=torch.bfloat16) for _ in range(nin)]
    own = sk.STAGE1_WARPS_WIDE
    sk.STAGE1_WARPS_WIDE = own if warps is None else warps
    try:
        with offline_target(arch) as compiled:
            launch_guided_sample(x[0], x[1:], [1.0] * (nin - 1), None, None, 0.7, None, 50 if filters else 0, None,
                                 0.9 if filters else 1.0, None, 0.0, None, 1, None, 3, vocab, filters, block)
    finally:
        sk.STAGE1_WARPS_WIDE = own
    kernel = next(k for name, k in compiled if name == "_stage1_kernel")
    sass = on_cubin("nvdisasm", kernel, "-c")
    if dump:
        Path(dump).write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    total = sum(ops.values())
    threads = kernel.metadata.num_warps * 32
    block = sk._plan(1, vocab, block, nin, filters)[0]  # the slice the launcher compiled (its own choice), not the one asked for
    return {"arch": arch, "inputs": nin, "block": block, "filters": filters, "vocab": vocab, "instructions": total,
            "warps": kernel.metadata.num_warps,
            "per_token": total / (block // threads), "registers": resources(kernel)["registers"],
            "top": ops.most_common(8)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--inputs", type=int, default=3, help="1 + guides (default 3: base, tuned, reference)")
    ap.add_argument("--block", type=int, default=4096, help="slice width (default 4096, what N >= 8 gets at V=151936)")
    ap.add_argument("--vocab", type=int, default=151936, help="V: a multiple of 16 is specialised, and lets loads "
                    "be vectorised (default 151936)")
    ap.add_argument("--warps", type=int, nargs="*", default=[None],
                    help="stage 1's warps on slices of 4,096 to compare (default: the launcher's, STAGE1_WARPS_WIDE)")
    ap.add_argument("--dump", metavar="DIR", help="also write each kernel's SASS to DIR/stage1_filters-*_warps-*.sass "
                    "(DIR is made if missing)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    for warps in args.warps:
        for filters in (False, True):
            r = count(args.arch, args.inputs, args.block, filters, args.vocab,
                      args.dump and str(Path(args.dump) / f"stage1_filters-{filters}_warps-{warps or 'default'}.sass"),
                      warps)
            print(f"stage 1 sm_{r['arch']} inputs={r['inputs']} V={r['vocab']} block={r['block']} "
                  f"filters={r['filters']} warps={r['warps']}: {r['instructions']} instructions, "
                  f"{r['per_token']:.0f} per token, {r['registers']} registers; "
                  + ", ".join(f"{k} {v}" for k, v in r["top"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
