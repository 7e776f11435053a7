"""Where one prompt's decoding spends its time: the latency regime, profiled (GPU or CPU).

    python benchmarks/profile_decode.py --models gpt2-xl --device cuda      # random weights, bfloat16
    OMP_NUM_THREADS=1 python benchmarks/profile_decode.py                   # the demo's models, CPU

One prompt at a time, as ``bench_speculative.py`` decodes it (``--mode``, default eft, 24 new tokens): the
time per token over ``--runs`` responses after a warm-up, the decoder's own counters (forwards, CUDA-graph
replays, host reads, time inside the forwards), then ``torch.profiler`` over one more response: the
operations by their own host time and, on a GPU, the kernels by device time, and the device's idle share
(the response's wall time less its kernels' time). On the H200 at 0fb472d plain eft took 12.4 ms per token
with a gpt2-xl-sized base whose weights stream in about 0.7 ms: this says where the rest goes.
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

from benchmarks import random_models  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    from ivg.decoder import IVGDecoder
    from ivg.demo.run import method_options

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo", choices=["demo", *random_models.RANDOM_MODELS])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="random models: default float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--work", default=None, help="random models: where they are saved (default a temporary folder)")
    ap.add_argument("--mode", default="eft")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3, help="timed responses before the profiled one")
    ap.add_argument("--top", type=int, default=20, help="rows of each profile table")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    models, prompts, _ = random_models.latency_set(args.models, args.runs + 2, args.device, args.dtype, args.work)
    dec = IVGDecoder(models, max_batch_prompts=1)
    opts = method_options(args.mode, 0, args.max_new_tokens)
    dec.generate(prompts[:1], opts)  # warm-up: compiles kernels, captures graphs

    # the same decoding with each step one replay per model and an eager sampler call, prompt by prompt in turn
    per_model = IVGDecoder(models, max_batch_prompts=1, step_graphs=False) if dec._steps is not None else None
    if per_model is not None:
        per_model.generate(prompts[:1], opts)
    per_token, stats, per_token_per_model = [], [], []
    for p in prompts[1:args.runs + 1]:
        for d, times in ((dec, per_token), (per_model, per_token_per_model)):
            if d is None:
                continue
            _sync(device)
            t0 = time.perf_counter()
            res = d.generate([p], opts)
            _sync(device)
            times.append((time.perf_counter() - t0) / max(1, len(res[0].beams[0].tokens)))
        stats.append(dec.last_stats)
    st = stats[-1]
    print(f"# profile_decode: {args.models} on {device}, mode {args.mode}, torch {torch.__version__}")
    if per_token_per_model:
        print(f"per token with steps replayed per model (step_graphs=False): "
              f"{1e3 * statistics.fmean(per_token_per_model):.2f} ms")
    print(f"per token: {1e3 * statistics.fmean(per_token):.2f} ms (runs: "
          f"{', '.join(f'{1e3 * t:.2f}' for t in per_token)}); last run: {st.new_tokens} tokens, {st.steps} steps, "
          f"{st.forwards} forwards ({st.graph_replays} from CUDA graphs; {st.step_replays} steps as one graph each), "
          f"{st.host_reads} host reads, "
          f"{100 * (1 - st.outside_forwards):.0f}% of its time inside the forwards")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _sync(device)
        t0 = time.perf_counter()
        dec.generate(prompts[args.runs + 1:args.runs + 2], opts)
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(f"\nprofiled response: {1e3 * wall:.1f} ms of wall time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=args.top))
        busy = sum(e.self_device_time_total for e in events) / 1e6
        print(f"device busy {1e3 * busy:.1f} ms of {1e3 * wall:.1f} ms ({100 * busy / wall:.0f}%; the rest it waits "
              f"for the host)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
