"""Whether a prompt's result depends on the batch it is decoded in: every prompt together, then each alone.

    OMP_NUM_THREADS=1 python benchmarks/batch_invariance.py                   # the demo's models, float32, CPU
    python benchmarks/batch_invariance.py --dtype bfloat16 --threads 2
    python benchmarks/batch_invariance.py --models gpt2-xl --device cuda --dtype bfloat16 --record

The decoder draws a candidate's token with the candidate's own Philox key from its own row's logits, and the
sampler draws a row's token from that row alone, bit for bit, whatever else its call holds (tested). A prompt's
tokens can then differ between a batch and one prompt at a time only where the model forwards round a row
differently in a batch of another size: a matrix product's library may pick another kernel or split its sums
another way by shape (cuBLAS on a GPU, the BLAS's threads on a CPU), and CUDA graphs pad a step to a bucket of
rows. In 16 bits such a difference moves a logit by a whole last place often enough that a draw near a token's
edge can change, after which the response diverges. This measures it: per mode, the prompts whose best response
differs from the prompt decoded alone, the first position where one does, and, over the prompts with the same
tokens, the largest gap of the best response's score relative to its size. It times nothing. ``--record``
appends one row per mode to ``results.csv`` (the counts in ``shape``); it exits 1 where any prompt differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "python"))

import torch  # noqa: E402

from benchmarks import harness, random_models  # noqa: E402

MODES = ("eft", "ivg", "bon", "plain", "tokenrm", "cbs-explicit")


def compare(together: list, alone: list) -> dict:
    """How results of the same prompts decoded together and one at a time differ: ``differ`` (prompts whose best
    response's tokens differ), ``first`` (the earliest position where one does, None if none), ``score_gap`` (the
    largest ``|a - b| / max(1, |a|)`` of the best response's score where the tokens agree, 0.0 if no scores)."""
    if len(together) != len(alone):
        raise ValueError(f"together and alone: {len(together)} and {len(alone)} results, expected as many")
    differ, first, gap = 0, None, 0.0
    for a, b in zip(together, alone):
        ta, tb = a.beams[0].tokens, b.beams[0].tokens
        if ta != tb:
            differ += 1
            at = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            first = at if first is None else min(first, at)
        elif a.beams[0].score is not None and b.beams[0].score is not None:
            gap = max(gap, abs(a.beams[0].score - b.beams[0].score) / max(1.0, abs(a.beams[0].score)))
    return dict(differ=differ, first=first, score_gap=gap)


def measure(models, prompts: list, modes, max_new_tokens: int, seed: int = 1, speculate: int = 0,
            on_mode=None) -> dict:
    """Mode -> :func:`compare` of ``prompts`` decoded together and each alone (the demo's W=K=4, L=5, T=0.7;
    ``speculate`` drafts per round, 0: none), with ``models`` (an ``IVGModels``), one decoder for every call (its
    pools and graphs are reused)."""
    import dataclasses

    from ivg.decoder import IVGDecoder
    from ivg.demo.run import method_options

    dec = IVGDecoder(models)
    out = {}
    for mode in modes:
        opts = dataclasses.replace(method_options(mode if mode != "plain" else "base", seed, max_new_tokens),
                                   speculate=speculate)
        together = dec.generate(prompts, opts)
        alone = [dec.generate([p], opts)[0] for p in prompts]
        out[mode] = compare(together, alone)
        if on_mode is not None:
            on_mode(mode, out[mode])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo", choices=["demo", *random_models.RANDOM_MODELS],
                    help="the demo's trained models, or random weights of a size (gpt2-xl: the GPU setting)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                    help="default float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["eft", "ivg"], choices=MODES)
    ap.add_argument("--speculate", type=int, default=0, metavar="N",
                    help="speculative decoding with up to N drafts a round (default 0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (CPU)")
    ap.add_argument("--work", help="where random-weight models are built (default a temporary folder)")
    ap.add_argument("--record", action="store_true", help="append one row per mode to benchmarks/results.csv")
    args = ap.parse_args(argv)
    if args.prompts < 2:
        ap.error(f"--prompts={args.prompts}: expected at least 2 (a batch against one prompt at a time)")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens={args.max_new_tokens}: expected at least 1")
    if args.speculate < 0:
        ap.error(f"--speculate={args.speculate}: expected 0 or more")
    if args.threads < 1:
        ap.error(f"--threads={args.threads}: expected at least 1")
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    if args.models != "demo":
        print(f"models ({args.models}, {dtype}) ...", flush=True)
    models, prompts, _ = random_models.latency_set(args.models, args.prompts, args.device, dtype, args.work, seed=999)

    def show(mode, r):
        first = "" if r["first"] is None else f", the first at token {r['first']}"
        print(f"{mode:<6} {r['differ']} of {len(prompts)} prompts differ from the prompt decoded alone{first}; "
              f"score gap on the same tokens {r['score_gap']:.3g}", flush=True)

    print(f"{len(prompts)} prompts together, then each alone ({args.models}, {dtype}, {args.device}, "
          f"{args.threads} thread(s), {args.max_new_tokens} new tokens, W=K=4, L=5, T=0.7, speculate {args.speculate})",
          flush=True)
    results = measure(models, prompts, args.modes, args.max_new_tokens, speculate=args.speculate, on_mode=show)
    if args.record:
        device = harness.device_name(torch.device(args.device), threads=args.threads)
        stamp, rev = harness.now(), harness.commit()
        harness.append_results([dict(
            date=stamp, commit=rev, device=device, benchmark="batch-invariance", provider=mode, dtype=dtype,
            shape=(f"prompts={len(prompts)},new={args.max_new_tokens},W=4,K=4,L=5,T=0.7,models={args.models},"
                   f"speculate={args.speculate},differ={r['differ']}/{len(prompts)},first={r['first']},"
                   f"score_gap={r['score_gap']:.3g}"),
            median_us="", speedup="") for mode, r in results.items()])
    return 1 if any(r["differ"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
