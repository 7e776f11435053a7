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
    m = re.search(r"([0-9.]+) s wall", r.stderr)
    if not m:
        raise RuntimeError(f"no wall time in the output:\n{r.stderr[-2000:]}")
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
        same = (root / f"out{args.ranks}_1.jsonl").read_text() == (root / "out1_1.jsonl").read_text()
        print(f"outputs of {args.ranks} ranks and 1 rank identical: {same}")
    base = times[runs[0][0]]
    dev = torch.device(args.device)
    dev_name, date, sha = harness.device_name(dev), harness.now(), harness.commit()
    rows = [dict(date=date, commit=sha, device=dev_name, benchmark="distributed", provider=name,
                 shape=f"ivg,W=K=2,L=4,new={args.max_new_tokens},prompts={args.prompts},best-of-{args.repeats}",
                 dtype="float32",
                 median_us=f"{t * 1e6:.0f}", gbps=f"{args.prompts / t:.2f} prompts/s", speedup=f"{base / t:.2f}")
            for name, t in times.items()]
    if args.record:
        harness.append_results(rows)
    return 0 if same or args.device != "cpu" else 1  # float32 on GPUs: batch-dependent rounding may flip a draw


if __name__ == "__main__":
    raise SystemExit(main())
