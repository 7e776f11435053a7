"""Speculative IVG against plain decoding: per-response latency of one prompt at a time.

    OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py            # the demo's trained models (CPU)
    python benchmarks/bench_speculative.py --record                     # append to results.csv

Models: the ``ivg demo`` models (base GPT-2 4x128, DPO-tuned and reference guides 2x64, token RM
2x64; built and cached by the first ``ivg demo``). Setting: the demo's (temperature 0.7, W=K=4,
L=5 for ``ivg``, 24 new tokens, EOS as the model emits it), ``--prompts`` prompts decoded one at a
time (the latency regime), each mode with ``speculate`` 0 (plain decoding) and each ``--gammas``
value, drafted by each of ``--drafts`` (default ``auto``: the tuned guide with EFT guidance, else its
reference; ``tune``, ``ref``: always that one). Reported per
mode, gamma and draft: mean seconds per response (``median_us`` column: microseconds), the acceptance
rate (kept drafts / drafted) and the gold reward (VADER, as the demo) mean and standard error, in
``shape`` (on a GPU also ``graphs=R/F``: of the F forwards, R replayed CUDA graphs); ``speedup``: plain
latency / this latency, measured in the same process with the settings interleaved prompt by prompt.

``--models gpt2-xl --device cuda`` (random weights of the issue's GPU sizes, bfloat16, built by
``benchmarks/random_models.py``): the speed-up and acceptance rate of untrained guides (no gold reward);
the demo's trained models on the GPU give the trained acceptance.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from benchmarks import harness, random_models  # noqa: E402


def main(argv=None) -> int:
    from ivg.decoder import IVGDecoder
    from ivg.demo.corpus import GoldReward
    from ivg.demo.run import method_options

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--modes", nargs="*", default=["eft", "ivg"])
    ap.add_argument("--gammas", nargs="*", type=int, default=[2, 3, 4])
    ap.add_argument("--adapt", action="store_true",
                    help="also each gamma as the cap of speculate_adapt (the drafts per round adapting within it)")
    ap.add_argument("--drafts", nargs="*", default=["auto"], choices=["auto", "tune", "ref"],
                    help="draft models to measure (DecodeOptions.draft): auto, the tuned guide, its reference")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="demo", choices=["demo", *random_models.RANDOM_MODELS],
                    help="the demo's trained models, or random weights of a size (gpt2-xl: the GPU setting)")
    ap.add_argument("--dtype", default=None, help="random models: default float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--work", default=None, help="random models: where they are saved (default a temporary folder)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    # random weights: the acceptance rate and speed-up of untrained guides; no gold reward
    models, prompts, dtype = random_models.latency_set(args.models, args.prompts, args.device, args.dtype, args.work)
    gold = GoldReward() if args.models == "demo" else None
    dec = IVGDecoder(models, max_batch_prompts=1)
    dev_name, date, sha = harness.device_name(device), harness.now(), harness.commit()
    print(f"# bench_speculative on {dev_name}, torch {torch.__version__}, commit {sha}", flush=True)
    rows = []
    for mode in args.modes:
        configs = [(0, "auto", False)] + [(g, d, a) for d in args.drafts for g in args.gammas
                                          for a in ((False, True) if args.adapt else (False,))]
        options = []
        for gamma, draft, adapt in configs:
            opts = method_options(mode, 0, args.max_new_tokens)
            options.append(type(opts)(**{**opts.__dict__, "speculate": gamma, "draft": draft,
                                         "speculate_adapt": adapt}))
            dec.generate(prompts[:1], options[-1])  # warm-up, not timed
        # Interleaved: each prompt under every setting in turn, so the machine's drift over the run (5-35% on
        # a shared CPU) weighs on every setting alike instead of on whichever ran during it.
        runs = [dict(times=[], texts=[], drafted=0, accepted=0, replays=0, forwards=0) for _ in configs]
        for p in prompts:
            for opts, run in zip(options, runs):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = dec.generate([p], opts)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                run["times"].append(time.perf_counter() - t0)
                run["texts"].append(res[0].beams[0].text)
                st = dec.last_stats
                for key, value in (("drafted", st.drafted), ("accepted", st.accepted), ("replays", st.graph_replays),
                                   ("forwards", st.forwards)):
                    run[key] += value
        plain_s = statistics.fmean(runs[0]["times"])
        for (gamma, draft, adapt), run in zip(configs, runs):
            mean = statistics.fmean(run["times"])
            rate = run["accepted"] / run["drafted"] if run["drafted"] else float("nan")
            if gold is not None:
                rewards = gold.scorer(prompts, run["texts"])
                se = statistics.stdev(rewards) / len(rewards) ** 0.5
                quality = f"gold={statistics.fmean(rewards):+.3f}+-{se:.3f}"
            else:
                quality = "gold=n/a (random weights)"
            # on a GPU: of the forwards, those replayed from CUDA graphs
            graphs = f",graphs={run['replays']}/{run['forwards']}" if device.type == "cuda" else ""
            by = (f" draft={draft}" if draft != "auto" else "") + (" adapting" if adapt else "")
            print(f"{mode:<4} speculate={gamma}{by}  {mean * 1e3:8.1f} ms/response  {plain_s / mean:5.2f}x  "
                  f"acceptance {rate:.2f}  {quality}{graphs}", flush=True)
            rows.append(dict(date=date, commit=sha, device=dev_name, benchmark="speculative",
                             provider=f"{mode}-speculate-{gamma}" + (f"-draft-{draft}" if draft != "auto" else "")
                             + ("-adapt" if adapt else ""),
                             shape=(f"{args.models} models,prompts={len(prompts)} one at a time,interleaved,"
                                    f"new={args.max_new_tokens},T=0.7,acceptance={rate:.2f},{quality}{graphs}"),
                             dtype=dtype or "float32", median_us=f"{mean * 1e6:.0f}", gbps="",
                             speedup=f"{plain_s / mean:.2f}"))
    if args.record:
        harness.append_results(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
