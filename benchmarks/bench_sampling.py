"""Benchmark of the fused guided sampler against the torch composition the published code runs.

    python benchmarks/bench_sampling.py            # full grid (GPU)
    python benchmarks/bench_sampling.py --quick    # small grid, fine on a CPU
    python benchmarks/bench_sampling.py --record   # also append to results.csv and render RESULTS.md

Providers:
  torch-composition  log-softmax of each input, weighted sum, HF warpers, softmax, multinomial,
                     plus the per-input log-probs at the token (what the published code does)
  reference          ivg_kernels.reference (plain torch)
  triton             ivg_kernels.guided_sample(backend="triton"), the public API (GPU only)
  triton-op          torch.ops.ivg_kernels.guided_sample, no argument checks (GPU only)
  *-graph            the same call replayed from a CUDA graph: the kernels' own time, without the
                     host's launch gaps (GPU only; speed-up against torch-composition-graph)
  flashinfer         FlashInfer on the base logits alone (one input), if importable:
                     sampling_from_logits without filters, top_k_top_p_sampling_from_logits with
                     top-k/top-p (min-p: min_p_sampling_from_probs on softmax(logits / T))
  empty-op           one eager launch of a trivial torch op (x.add_(1) on one element): the floor
                     an eager call's host cost is compared with (GPU only)

Rows: "flat" inputs are N(0, 1) logits (the nucleus of top-p 0.9 holds most of the vocabulary);
"peaked" ones look like a language model's (N(0, 1) plus a Zipf-like head: a few dozen tokens
hold most of the mass) with the head at random ids; "ranked" ones put that head among the first
4,096 ids, where byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2) number their frequent tokens,
so a model's likely next tokens crowd a few thousand low ids. Bytes counted: the three bf16 input rows [N, V] read once. GB/s is
compared with a measured device copy (read + write). On a GPU each shape also prints the host
overhead of the eager Triton call: its median minus the CUDA-graph median.

On a GPU each shape is first drawn by the Triton sampler and by the reference on the same rows, keys and
settings (``reference_mismatches``): where a row's token differs, the Triton rows of that shape are printed
but not recorded, and the run exits 1 (a kernel changed offline may meet the GPU here before its tests do).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from ivg_kernels._args import prepare_sample_args  # noqa: E402
from ivg_kernels.reference.sampling import _guided_sample_ref  # noqa: E402

CONFIGS = {
    # Published IVG settings: IMDB sentiment (T=0.7, no top-k) and AlpacaEval (T=0.7, top-k 50).
    "imdb": dict(temperature=0.7, top_k=0, top_p=1.0),
    "alpaca": dict(temperature=0.7, top_k=50, top_p=1.0),
    "top-p-0.9": dict(temperature=0.7, top_k=0, top_p=0.9),
    "top-p-0.95": dict(temperature=0.7, top_k=0, top_p=0.95),
    "min-p-0.05": dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05),
}


def make_rows(kind, n, v, device, gen):
    """Three bf16 input rows [N, V]: ``flat`` N(0, 1), or ``peaked`` (a Zipf-like head over random tokens), or
    ``ranked`` (that head among the first ``RANKED_IDS`` ids)."""
    out = []
    for _ in range(3):
        x = torch.randn(n, v, device=device, generator=gen)
        if kind in ("peaked", "ranked"):
            head = torch.randint(0, min(v, RANKED_IDS) if kind == "ranked" else v, (n, 64), device=device,
                                 generator=gen)
            boost = 12.0 - 2.5 * torch.log(torch.arange(1, 65, device=device, dtype=torch.float32))  # 12 .. 1.6
            x.scatter_(1, head, boost.expand(n, 64))
        out.append(x.to(torch.bfloat16))
    return out
RANKED_IDS = 4096  # "ranked" rows: the head's ids (a BPE vocabulary's most frequent tokens)
ROW_KINDS = ["flat", "peaked", "ranked"]
FULL_N = [1, 16, 64, 256]
FULL_V = [32000, 50257, 128256, 151936]


def torch_composition(base, tune, ref, beta, cfg, gen=None):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from transformers.generation.logits_process import MinPLogitsWarper

    lp = [x.float().log_softmax(-1) for x in (base, tune, ref)]
    scores = lp[0] + beta * (lp[1] - lp[2])
    scores = TemperatureLogitsWarper(cfg["temperature"])(None, scores)
    if cfg["top_k"]:
        scores = TopKLogitsWarper(cfg["top_k"])(None, scores)
    if cfg["top_p"] < 1:
        scores = TopPLogitsWarper(cfg["top_p"])(None, scores)
    if cfg.get("min_p", 0) > 0:
        scores = MinPLogitsWarper(cfg["min_p"])(None, scores)
    tok = torch.multinomial(scores.softmax(-1), 1, generator=gen)
    return tok, [x.gather(1, tok) for x in lp]


def providers(device, wanted):
    out = {}
    try:
        import transformers  # noqa: F401

        out["torch-composition"] = "composition"
    except ImportError:
        print("torch-composition: transformers not importable, skipped", file=sys.stderr)
    if device.type == "cuda":
        out["triton"] = "triton"
        out["triton-op"] = "op"
        for name in [k for k in out if k in ("torch-composition", "triton")]:
            out[f"{name}-graph"] = out[name]
        try:
            import flashinfer.sampling  # noqa: F401

            out["flashinfer"] = "flashinfer"
            out["flashinfer-graph"] = "flashinfer"
        except ImportError:
            print("flashinfer: not importable, skipped", file=sys.stderr)
        out["empty-op"] = "empty"
    else:
        out["reference"] = "reference"  # on a GPU only a correctness oracle: not timed there
        print("triton providers: no CUDA device (the interpreter is not a speed measurement), skipped",
              file=sys.stderr)
    return {k: v for k, v in out.items() if not wanted or k in wanted}


def make_fn(kind, base, tune, ref, cfg, device, graph=False):
    n = base.shape[0]
    seed = torch.arange(n, device=device)
    offset = torch.zeros(n, dtype=torch.int64, device=device)
    guides = [(tune, 1.0), (ref, -1.0)]
    if kind == "composition":
        gen = None if graph else torch.Generator(device=device).manual_seed(0)  # graphs take the default one
        return lambda: torch_composition(base, tune, ref, 1.0, cfg, gen)
    if kind == "reference":
        a = prepare_sample_args(base, guides, cfg["temperature"], cfg["top_k"], cfg["top_p"], cfg.get("min_p", 0.0),
                                seed, offset, None)
        return lambda: _guided_sample_ref(a)
    if kind == "triton":
        import ivg_kernels

        return lambda: ivg_kernels.guided_sample(base, guides, seed=seed, offset=offset, backend="triton", **cfg)
    if kind == "op":
        filters = has_filters(cfg)
        args = (base, [tune, ref], [1.0, -1.0], None, None, cfg["temperature"], None, cfg["top_k"], None,
                cfg["top_p"], None, cfg.get("min_p", 0.0), seed, 0, offset, 0, base.shape[1], filters, 0)
        return lambda: torch.ops.ivg_kernels.guided_sample(*args)
    if kind == "flashinfer":
        import flashinfer.sampling as fs

        t = cfg["temperature"]
        if cfg.get("min_p", 0) > 0:
            return lambda: fs.min_p_sampling_from_probs((base.float() / t).softmax(-1), cfg["min_p"])
        if cfg["top_k"] or cfg["top_p"] < 1:
            k = cfg["top_k"] or base.shape[1]
            return lambda: fs.top_k_top_p_sampling_from_logits(base.float() / t, k, cfg["top_p"])
        return lambda: fs.sampling_from_logits(base.float() / t)
    if kind == "empty":
        one = torch.zeros(1, device=device)
        return lambda: one.add_(1)
    raise ValueError(kind)


def has_filters(cfg) -> bool:
    """Whether the warper settings ``cfg`` filter the row (top-k, top-p or min-p): the sampler's filtered path."""
    return bool(cfg["top_k"]) or cfg["top_p"] < 1 or cfg.get("min_p", 0) > 0


def reference_mismatches(base, tune, ref, cfg, device) -> int:
    """Rows whose token or ``ok`` flag from the Triton sampler differs from the reference's, on the benchmark's own
    inputs, keys and settings. The reference is the specification (the same token for the same key on every
    backend), and a kernel that draws other tokens is not one to time: its rows are not recorded (a first GPU run
    of a kernel changed offline measures it before, or without, its GPU tests)."""
    got = make_fn("triton", base, tune, ref, cfg, device)()
    want = make_fn("reference", base, tune, ref, cfg, device)()
    return int(((got.tokens != want.tokens) | (got.ok != want.ok)).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N in {1, 16}, V in {32000, 50257}, imdb only")
    ap.add_argument("--n", type=int, nargs="*", help="batch sizes (default: full grid)")
    ap.add_argument("--v", type=int, nargs="*", help="vocabulary sizes (default: full grid)")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), help="warper settings")
    ap.add_argument("--rows", nargs="*", choices=ROW_KINDS, help="input rows (default: flat; with filters, "
                    "all three)")
    ap.add_argument("--providers", nargs="*", help="subset of providers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/results.csv, render RESULTS.md")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    ns = args.n or ([1, 16] if args.quick else FULL_N)
    vs = args.v or ([32000, 50257] if args.quick else FULL_V)
    cfgs = args.configs or (["imdb"] if args.quick else list(CONFIGS))
    provs = providers(device, args.providers)
    copy_gbps = harness.copy_bandwidth_gbps(device)
    dev_name, date, sha = harness.device_name(device), harness.now(), harness.commit()
    print(f"# bench_sampling on {dev_name}, torch {torch.__version__}, commit {sha}; "
          f"measured copy bandwidth {copy_gbps:.1f} GB/s", flush=True)

    rows, differ = [], []
    for cfg_name in cfgs:
        cfg = CONFIGS[cfg_name]
        filtered = has_filters(cfg)
        kinds = args.rows or (ROW_KINDS if filtered else ["flat"])
        if not filtered and len(kinds) > 1:  # without filters where the head lies changes no work: ranked = peaked
            kinds = [r for r in kinds if r != "ranked"]
        for rows_kind, v, n in ((r, v, n) for r in kinds for v in vs for n in ns):
            gen = torch.Generator(device=device).manual_seed(n * v)
            base, tune, ref = make_rows(rows_kind, n, v, device, gen)
            nbytes = 3 * n * v * base.element_size()
            shape = f"{cfg_name},{rows_kind},N={n},V={v},inputs=3"
            base_us, group = {}, []
            wrong = 0
            if device.type == "cuda" and any(k in ("triton", "op") for k in provs.values()):
                wrong = reference_mismatches(base, tune, ref, cfg, device)
                if wrong:
                    differ.append(shape)
                    print(f"{shape}: the Triton sampler's tokens differ from the reference's in {wrong} of {n} rows: "
                          f"its rows are printed, not recorded", file=sys.stderr)
            for name, kind in provs.items():
                graph = name.endswith("-graph")
                try:
                    us = harness.time_us(make_fn(kind, base, tune, ref, cfg, device, graph), device, graph=graph)
                except Exception as e:  # a provider that cannot run a shape is reported, not fatal
                    print(f"{name} {shape}: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                if kind == "composition":
                    base_us[graph] = us
                read = {"flashinfer": n * v * base.element_size(), "empty": 0}.get(kind, nbytes)
                group.append(dict(date=date, commit=sha, device=dev_name, benchmark="sampling", provider=name,
                                  shape=shape, dtype="bf16", median_us=f"{us:.1f}",
                                  gbps=f"{read / (us * 1e-6) / 1e9:.1f}", _us=us, _graph=graph))
            times = {r["provider"]: r["_us"] for r in group}
            for r in group:
                ref_us = base_us.get(r.pop("_graph"))
                r["speedup"] = f"{ref_us / r.pop('_us'):.2f}" if ref_us else ""
            harness.print_table(group, copy_gbps)
            if "triton" in times and "triton-graph" in times:
                host = times["triton"] - times["triton-graph"]
                empty = times.get("empty-op")
                print(f"host overhead of the eager triton call: {host:.1f} us"
                      + (f" = {host / empty:.1f}x an empty op's eager launch ({empty:.1f} us)" if empty else ""))
                group.append(dict(group[0], provider="triton-host-overhead", median_us=f"{host:.1f}", gbps="",
                                  speedup=f"{empty / host:.2f}" if empty and host > 0 else ""))
            rows += [r for r in group if not (wrong and r["provider"].startswith("triton"))]
    if args.record:
        copy_row = dict(date=date, commit=sha, device=dev_name, benchmark="sampling", provider="device-copy",
                        shape="copy", dtype="u8", median_us="", gbps=f"{copy_gbps:.1f}", speedup="")
        harness.append_results([copy_row] + rows)
    if differ:
        print(f"error: the Triton sampler drew other tokens than the reference at {len(differ)} shapes: "
              + "; ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
