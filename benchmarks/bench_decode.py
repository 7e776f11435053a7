"""Tokens per second of every decoding mode, the paged decoder against the naive baseline.

    python benchmarks/bench_decode.py                 # CPU: tiny models
    python benchmarks/bench_decode.py --preset gpt2xl # GPU: random-weight gpt2-xl base, gpt2 guides
    python benchmarks/bench_decode.py --record        # append to results.csv, render RESULTS.md
    python benchmarks/bench_decode.py --step-only     # GPU: the decode step, eager against CUDA graphs
    python benchmarks/bench_decode.py --prompt-len 2048 --prompts 1 --modes ivg --skip-naive
                                                      # beam groups with a long shared prompt

Setting: W=K=4, L=5, 64 new tokens (32 on a GPU), 16 prompts (8 on a GPU) of 8 to 40 tokens, EOS ignored
(weights are random, so only the speed means anything). New tokens count every token drawn for every
candidate row; each decoder first decodes one prompt for two tokens, untimed. Providers: naive (the published algorithm), paged (IVGDecoder with cuda_graphs=False:
every step eager), paged-graphs (IVGDecoder's default on a GPU: decode steps replayed from CUDA graphs).

Decode step (GPU): one forward of one new token for each of 16 sequences of 128 cached tokens through
a gpt2-sized guide (12 layers, 768 wide, bf16) on the paged cache, eager and replayed from a CUDA
graph (median of 50 steps, host clock around a synchronised step).

The paged decoders also report the share of the wall time outside the models' forwards (sampling,
bookkeeping, host work; forwards timed by CUDA events on a GPU, ``RunStats.outside_forwards``) and
the host's reads of the device per step (``RunStats.host_reads``; no EOS here, so a search reads at its
chunk boundaries and a token-wise mode once on a GPU; every step on the CPU).

``--prompt-len N``: every prompt has N tokens; the paged decoder also runs with the shared-prefix
attention forced off (``paged-per-beam``) and on (``paged-shared``), eager, beside its default, and on
a GPU from CUDA graphs too (``paged-graphs-per-beam``, ``paged-graphs-shared``: the groups are graph
inputs), the issue's end-to-end comparison.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from benchmarks import harness  # noqa: E402

PRESETS = {
    # name: (base (layers, hidden, heads), guide (layers, hidden, heads), vocab, dtype)
    "cpu-tiny": ((4, 128, 4), (2, 64, 2), 2048, torch.float32),
    "gpt2xl": ((48, 1600, 25), (12, 768, 12), 50257, torch.bfloat16),
}


def _gpt2(layers, hidden, heads, vocab, seed, dtype, device, positions=1024):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=positions)
    with torch.device(device):  # initialise on the device: a 1.5B-parameter CPU init takes a minute
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    return model.to(dtype=dtype).eval()


def build(preset, device, positions=1024):
    from ivg.models import GuidePair, IVGModels, TokenRewardModel

    (bl, bh, bn), (gl, gh, gn), vocab, dtype = PRESETS[preset]
    base = _gpt2(bl, bh, bn, vocab, 0, dtype, device, positions)
    tune = _gpt2(gl, gh, gn, vocab, 1, dtype, device, positions)
    ref = _gpt2(gl, gh, gn, vocab, 2, dtype, device, positions)
    from transformers import GPT2Config

    torch.manual_seed(3)
    with torch.device(device):
        rm = TokenRewardModel.from_body_config(GPT2Config(n_layer=gl, n_embd=gh, n_head=gn, vocab_size=vocab,
                                                          n_positions=positions))
    rm = rm.to(dtype=dtype).eval()
    return IVGModels(base, [GuidePair(tune, ref, 1.0)], rm, 1.0, None)


def bench_step(device, batch=16, context=128, steps=50):
    """Median time of one decode step of a gpt2-sized guide, eager and from a CUDA graph."""
    from ivg.paged_model import PagedModel

    model = _gpt2(12, 768, 12, 50257, 5, torch.bfloat16, device)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (context,), generator=gen).tolist() for _ in range(batch)]
    blocks = batch * (-(-(context + 2 * steps + 8) // 16) + 1)
    times = {}
    for name, graphs in (("eager", False), ("cuda-graph", True)):
        pm = PagedModel(model, num_blocks=blocks, block_size=16, cuda_graphs=graphs)
        seqs = pm.blocks.new_sequences(batch)
        pm(seqs, prompts)
        tok = [[7]] * batch
        for _ in range(3):  # warm-up (and the capture)
            pm(seqs, tok)
        per = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pm(seqs, tok)
            torch.cuda.synchronize()
            per.append(time.perf_counter() - t0)
        per.sort()
        times[name] = per[len(per) // 2] * 1e6
        pm.blocks.free_many(seqs)
        print(f"decode step {name:<10} {times[name]:9.1f} us  (batch {batch}, context {context}, gpt2-sized bf16)",
              flush=True)
    return [dict(benchmark="decode-step", provider=name, shape=f"gpt2-124M,batch={batch},context={context}",
                 dtype="bfloat16", median_us=f"{us:.1f}", gbps="", speedup=f"{times['eager'] / us:.2f}")
            for name, us in times.items()]


def main(argv=None) -> int:
    from ivg.decoder import IVGDecoder
    from ivg.naive import NaiveDecoder
    from ivg.options import DecodeOptions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", nargs="*", default=["plain", "eft", "tokenrm", "cbs", "ivg", "bon"])
    ap.add_argument("--prompts", type=int, default=None, help="default 16 on the CPU, 8 on a GPU")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 on the CPU, 32 on a GPU")
    ap.add_argument("--step-only", action="store_true", help="only the decode-step benchmark (GPU)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=None, help="every prompt this many tokens (default 8 to 40)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("gpt2xl" if gpu else "cpu-tiny")
    args.prompts = args.prompts or (8 if gpu else 16)
    args.max_new_tokens = args.max_new_tokens or (32 if gpu else 64)
    dev_name, date, sha = harness.device_name(device), harness.now(), harness.commit()
    rows = []
    if gpu:
        rows += bench_step(device)
        for r in rows:
            r.update(date=date, commit=sha, device=dev_name)
        if args.record:  # recorded as it goes: a run cut short keeps what it measured
            harness.append_results(rows)
        if args.step_only:
            return 0
        rows = []
    models = build(preset, device, max(1024, (args.prompt_len or 0) + args.max_new_tokens))
    vocab = PRESETS[preset][2]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 41, (args.prompts,), generator=gen)
    if args.prompt_len:
        lengths.fill_(args.prompt_len)
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    print(f"# bench_decode on {dev_name}, preset {preset}, torch {torch.__version__}, commit {sha}", flush=True)
    for mode in args.modes:
        opts = DecodeOptions(mode=mode, width=4, successors=4, chunk_len=5, n=16, max_new_tokens=args.max_new_tokens,
                             temperature=0.7, seed=0, eos_token_ids=())
        result = {}
        decoders = [("paged", IVGDecoder(models, cuda_graphs=False))]
        if args.prompt_len:
            decoders += [("paged-per-beam", IVGDecoder(models, cuda_graphs=False, shared_prefix=False)),
                         ("paged-shared", IVGDecoder(models, cuda_graphs=False, shared_prefix=True))]
        if gpu:
            decoders.append(("paged-graphs", IVGDecoder(models, cuda_graphs=True)))
            if args.prompt_len:  # the decoder's GPU default (graphs) with beam groups off and on
                decoders += [("paged-graphs-per-beam", IVGDecoder(models, cuda_graphs=True, shared_prefix=False)),
                             ("paged-graphs-shared", IVGDecoder(models, cuda_graphs=True, shared_prefix=True))]
        if not args.skip_naive:
            decoders.append(("naive", NaiveDecoder(models, backend="auto")))
        for name, dec in decoders:
            dec.generate(prompts[:1], dataclasses.replace(opts, max_new_tokens=2))  # warm-up, not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dec.generate(prompts, opts)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            st = dec.last_stats
            outside = st.outside_forwards if name != "naive" else float("nan")  # naive: not timed
            reads = st.host_reads / st.steps if name != "naive" and st.steps else float("nan")  # per step
            result[name] = (st.new_tokens / wall, wall, outside, reads)
            print(f"{mode:<8} {name:<6} {result[name][0]:10.1f} tokens/s  {wall:8.2f} s  "
                  f"outside forwards {outside:6.1%}  host reads per step {reads:.2f}", flush=True)
        mode_rows = []
        for name, (tps, wall, outside, reads) in result.items():
            speed = tps / result["naive"][0] if "naive" in result else float("nan")
            mode_rows.append(dict(date=date, commit=sha, device=dev_name, benchmark="decode", provider=name,
                             shape=f"{mode},{preset},W=K=4,L=5,new={args.max_new_tokens},prompts={args.prompts}"
                                   + (f",prompt_len={args.prompt_len}" if args.prompt_len else "")
                                   + (f",outside_forwards={outside:.1%}" if outside == outside else "")
                                   + (f",host_reads_per_step={reads:.2f}" if reads == reads else ""),
                             dtype=str(PRESETS[preset][3]).replace("torch.", ""),
                             median_us=f"{wall * 1e6:.0f}", gbps=f"{tps:.1f} tok/s", speedup=f"{speed:.2f}"))
        rows += mode_rows
        if args.record:
            harness.append_results(mode_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
