"""Prompts per second of `ivg generate` under torchrun with 1 and 2 ranks (gloo, CPU processes).

    python benchmarks/bench_distributed.py            # 32 prompts, IVG (W=K=2, L=4), 24 new tokens
    python benchmarks/bench_distributed.py --record   # append to results.csv, render RESULTS.md
    python benchmarks/bench_distributed.py --device cuda --ranks 8   # NCCL, one GPU per rank

Models: random gpt2-style models saved to a temporary folder (base 4 layers x 128, guides and token RM
2 x 64, a character vocabulary). Each run's time is the generation's own wall time as `ivg generate`
reports it (model loading and process start excluded), the best of ``--repeats`` runs (shared
machines are noisy). Rows: 1 rank with 1 thread, 1 rank with every thread of the machine, and N ranks
with 1 thread each; speed-up against 1 rank, 1 thread.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from benchmarks import harness  # noqa: E402


def _models(root: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ivg.models import TokenRewardModel
    from tests.decoder_fixtures import VOCAB, char_tokenizer

    tok = char_tokenizer()
    dirs = {}
    for name, (layers, hidden, seed) in dict(base=(4, 128, 1), tuned=(2, 64, 2), ref=(2, 64, 3), rm=(2, 64, 4)).items():
        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=VOCAB, n_positions=256, eos_token_id=1,
                         bos_token_id=1)
        model = TokenRewardModel.from_body_config(cfg) if name == "rm" else AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def _run(dirs, prompts: Path, out: Path, ranks: int, threads: int, new_tokens: int, device: str = "cpu") -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "ivg",
           "generate", "--base", dirs["base"], "--tuned", dirs["tuned"], "--ref", dirs["ref"], "--beta", "1.0",
           "--token-rm", dirs["rm"], "--mode", "ivg", "-W", "2", "-K", "2", "-L", "4", "--max-new-tokens",
           str(new_tokens), "--seed", "0", "--prompts", str(prompts), "--out", str(out), "--overwrite",
           "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return generation_seconds(r.stderr)


VALUES = ("score", "implicit_value", "explicit_value")


def same_outputs(a: str, b: str) -> tuple[bool, float]:
    """Whether two runs' output files hold the same lines but for the values (index, prompt, tokens, text), and the
    largest relative gap between their values. The ranks decode other batches than one process does, and float32
    values take the rounding of the batch they were computed in (the README: batch-invariant tokens, values up to
    the last-place rounding another batch gives), so the files differ in the values' last digits."""
    rows_a, rows_b = [json.loads(x) for x in a.splitlines()], [json.loads(x) for x in b.splitlines()]
    if len(rows_a) != len(rows_b):
        return False, float("nan")
    same, gap = True, 0.0
    for x, y in zip(rows_a, rows_b):
        same &= {k: v for k, v in x.items() if k not in VALUES} == {k: v for k, v in y.items() if k not in VALUES}
        for k in VALUES:
            u, v = x.get(k), y.get(k)
            if (u is None) != (v is None):
                same = False
            elif u is not None:
                gap = max(gap, abs(u - v) / max(1.0, abs(v)))
    return same, gap


def generation_seconds(stderr: str) -> float:
    """The generation's wall time from `ivg generate`'s summary line ("... decoded in 1.23 s, ...")."""
    m = re.search(r"ivg generate: \d+ prompts? decoded in ([0-9.]+) s", stderr)
    if not m:
        raise RuntimeError(f"no wall time in the output:\n{stderr[-2000:]}")
    return float(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    import torch

    cores = os.cpu_count() or 1
    words = "the a movie film was is great bad truly wonderful day and i think so never again end".split()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = _models(root)
        g = torch.Generator().manual_seed(0)
        lines = [" ".join(words[int(j)] for j in torch.randint(0, len(words), (int(n),), generator=g))
                 for n in torch.randint(1, 9, (args.prompts,), generator=g)]
        prompts = root / "prompts.txt"
        prompts.write_text("\n".join(lines) + "\n")
        if args.device == "cpu":
            runs = [("1 rank x 1 thread", 1, 1), (f"1 rank x {cores} threads", 1, cores),
                    (f"{args.ranks} ranks x 1 thread", args.ranks, 1)]
        else:
            runs = [("1 rank (1 GPU)", 1, 1), (f"{args.ranks} ranks ({args.ranks} GPUs)", args.ranks, 1)]
        times = {}
        for name, ranks, threads in runs:
            times[name] = min(_run(dirs, prompts, root / f"out{ranks}_{threads}.jsonl", ranks, threads,
                                   args.max_new_tokens, args.device) for _ in range(args.repeats))
            print(f"{name:<22} {args.prompts / times[name]:8.2f} prompts/s  ({times[name]:.2f} s)", flush=True)
        same, gap = same_outputs((root / f"out{args.ranks}_1.jsonl").read_text(), (root / "out1_1.jsonl").read_text())
        print(f"outputs of {args.ranks} ranks and 1 rank: the same prompts, tokens and texts: {same}; values apart by "
              f"at most {gap:.1e} (relative)")
    base = times[runs[0][0]]
    dev = torch.device(args.device)
    # (each provider names its ranks and threads)
    dev_name, date, sha = harness.device_name(dev, threads=0), harness.now(), harness.commit()
    rows = [dict(date=date, commit=sha, device=dev_name, benchmark="distributed", provider=name,
                 shape=f"ivg,W=K=2,L=4,new={args.max_new_tokens},prompts={args.prompts},best-of-{args.repeats}",
                 dtype="float32",
                 median_us=f"{t * 1e6:.0f}", gbps=f"{args.prompts / t:.2f} prompts/s", speedup=f"{base / t:.2f}")
            for name, t in times.items()]
    if args.record:
        harness.append_results(rows)
    # float32 on GPUs: batch-dependent rounding may flip a draw; on the CPU the tokens agree and the values to float32
    return 0 if (same and gap <= 1e-4) or args.device != "cpu" else 1


if __name__ == "__main__":
    raise SystemExit(main())
