"""Command line: ``ivg <command>``."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    import ivg_kernels
    from ivg_kernels._backend import resolve_backend, triton_available

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"ivg-kernels {ivg_kernels.__version__}  torch {torch.__version__}  device {dev}")
    print(f"triton importable: {triton_available()}")
    print(f"guided_sample backend for {dev} tensors: {resolve_backend('auto', torch.empty(0, device=dev))}")
    return 0


def _bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"bench_{args.op}.py"
    if not script.exists():
        print(f"ivg bench: {script} not found (benchmarks live in a source checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script)] + args.rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ivg", description="Integrated Value Guidance: fast inference-time alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and the backends that will run").set_defaults(fn=_info)
    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (source checkout)")
    bench.add_argument("op", choices=["sampling", "kv"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script (try --help)")
    bench.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
