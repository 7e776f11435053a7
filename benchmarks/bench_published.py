"""This project's decoder against the published IVG code, on the same models, prompts and settings.

    python benchmarks/bench_published.py --published CHECKOUT --python PUBLISHED_ENV/bin/python [--record]

``CHECKOUT`` is a clone of github.com/chadlzx/ivg (it has no licence: it is never copied here);
``--python`` an interpreter of an environment with what its requirements pin (transformers 4.34.1,
tokenizers 0.14, accelerate 0.23) plus sentence-transformers and scikit-learn (``scorer.py``
imports them). ``benchmarks/published_driver.py`` runs in that environment and calls the published
modules as the published IMDB script does; this project's decoder runs in this environment. Each
side runs in its own process, one after the other, with ``--threads`` threads (1 by default: the
machines here have 2 cores), and neither counts model loading or a warm-up prompt. The two take turns, one
phase at a time (greedy decoding, each mode's warm-up, each timed repeat, the one-prompt-at-a-time runs), so
only one computes at a time and a drift in the machine's speed weighs on both sides alike.

Models: the ``ivg demo`` models (trained on the CPU in 100 to 170 s, cached): base GPT-2 4x128, tuned
and reference guides 2x64, token reward model 2x64 with a vocabulary-sized score head. The published
``GPT2ModelForTokenScore`` has no score-head bias, so both sides get the token RM without it; the
tokenizer is rewritten in the format tokenizers 0.14 reads. Templates: the base sees
``--base-template``, the guides the bare prompt, the token RM the bare prompt (the published defaults).

Setting (the issue's): IVG = EFT token by token (beta 1) inside chunk-level beam search ranked by the
token RM, W=K=4, L=5, temperature 0.7, 32 new tokens, 16 prompts, float32, no EOS, no stop strings.
Reported: seconds per run (median of ``--repeats``), response tokens per second (prompts x new
tokens / s), the ratio, and greedy-EFT token parity (the published
code has no greedy path: one beam, one candidate, temperature 1e-9), with both sides' models in
``--greedy-dtype`` (float32 by default, also when the timed runs are in 16 bits). ``--latency N`` also times this
project one prompt at a time over N prompts (the published code always decodes one prompt at a time).
On the CPU this project computes one row of each set of twins (candidates of a prompt with the same
response so far, ``ivg.twins``; the row's ``twin_rows=`` counts the rows not computed in the last timed
run); ``--no-merge-twins`` computes every row (the same results, more work).
``--published-prompts M`` lets the published side decode only the first M prompts: one prompt at a time,
its tokens/s over M prompts is its rate over all of them, so a GPU lease can time this project's batch of
64 beside the published code's first 8 (each side's tokens/s over its own prompts; the rows say M).

On a GPU (``--device cuda``, bfloat16 by default): ``--models gpt2-xl`` builds random-weight models
of the issue's sizes (base 48x1600, guides and token RM 12x768, vocabulary 50,257) with a synthetic
word-level tokenizer, saved once under ``--work``; ``bash benchmarks/gpu_suite.sh published`` runs it
with the published code's pinned packages carried as wheels (``benchmarks/fetch_published_wheels.sh``).
The published loop asks nvidia-smi for GPU memory every 10th step inside its timing; the driver times
that call (without changing it) and the benchmark also reports the published time less it.
``--models tiny-random`` runs the same path with small models (a check on the CPU).

``--modes`` (default ``ivg``): also ``plain``, ``eft``, ``tokenrm`` (the published ``TokenWiseSamplingMixin``,
``--rm-weight``), ``cbs`` and ``bon``, each run on the published side through its chunk-level beam search
with the mode's shape (``benchmarks/published_driver.py``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "python"))

import torch  # noqa: E402

from benchmarks import harness, random_models  # noqa: E402
from benchmarks.published_driver import PROGRESS, TURN, progress, wait_turn  # noqa: E402 - shared by both sides


def _prepare_models(work: Path, preset: str = "demo", dtype: str = "float32") -> dict:
    """Models for both sides, in this project's and the published formats: the demo's trained ones
    (``demo``) or random weights of a ``random_models.RANDOM_MODELS`` size."""
    if preset == "demo":
        return _demo_models(work)
    return random_models.build(work, preset, dtype)


def _demo_models(work: Path) -> dict:
    """Demo models for both sides: ours (token RM without score-head bias) and the published formats."""
    from safetensors.torch import load_file, save_file

    from ivg.demo.build import build

    demo = build(progress=False)
    ours, theirs = work / "ours", work / "published"
    for d in (ours, theirs):
        d.mkdir(parents=True, exist_ok=True)
    tok_json = json.loads((demo / "base" / "tokenizer.json").read_text())
    tok_json["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tok_json["model"]["merges"]]
    tok_cfg = json.loads((demo / "base" / "tokenizer_config.json").read_text())
    old_cfg = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token") if k in tok_cfg}
    old_cfg.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    paths = {}
    for name in ("base", "tuned", "ref"):
        paths[name] = str(demo / name)
        dst = theirs / name
        dst.mkdir(exist_ok=True)
        for f in ("config.json", "model.safetensors", "generation_config.json"):
            if (demo / name / f).exists() and not (dst / f).exists():
                os.symlink(demo / name / f, dst / f)
        (dst / "tokenizer.json").write_text(json.dumps(tok_json))
        (dst / "tokenizer_config.json").write_text(json.dumps(old_cfg))
    # Token RM: the demo's body and score head, the head's bias dropped on both sides.
    body = load_file(demo / "rm" / "model.safetensors")
    head = load_file(demo / "rm" / "score_head.safetensors")["score_head.weight"]
    rm_ours = ours / "rm"
    rm_ours.mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (rm_ours / f).exists():
            os.symlink(demo / "rm" / f, rm_ours / f)
    save_file({"score_head.weight": head.contiguous()}, rm_ours / "score_head.safetensors")
    random_models.published_rm(body, head, json.loads((demo / "rm" / "config.json").read_text()), theirs / "rm")
    paths["rm"] = str(rm_ours)
    return {"ours": paths, "published": {k: str(theirs / k) for k in ("base", "tuned", "ref", "rm")}}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_ours(cfg_path: str, out_path: str) -> None:
    """This project's side, in its own process: the same prompts and settings, greedy EFT and each mode
    (all prompts together, and with ``latency`` one prompt at a time)."""
    import time

    cfg = json.load(open(cfg_path))
    torch.set_num_threads(cfg["threads"])
    from ivg.api import make_decoder
    from ivg.options import DecodeOptions

    m, device = cfg["models"], cfg.get("device", "cpu")
    templates = {"base": cfg["templates"]["base"].replace("{raw_prompt}", "{prompt}"),
                 "guide": cfg["templates"]["guide"].replace("{raw_prompt}", "{prompt}"), "token_rm": "{prompt}"}

    def decoder(dtype):
        return make_decoder(base=m["base"], tuned=[m["tuned"]], ref=[m["ref"]], beta=[cfg["beta"]], token_rm=m["rm"],
                            token_rm_weight=cfg.get("rm_weight", 1.0), dtype=dtype, device=device,
                            templates=templates, decoder=cfg.get("decoder", "paged"),
                            merge_twins=cfg.get("merge_twins", True))[0]

    dtype, greedy_dtype = cfg.get("dtype", "float32"), cfg.get("greedy_dtype", cfg.get("dtype", "float32"))
    dec = decoder(greedy_dtype)
    common = dict(max_new_tokens=cfg["max_new_tokens"], eos_token_ids=(), seed=cfg["seed"])
    wait_turn(cfg, "greedy")
    greedy = dec.generate(cfg["prompts"][:cfg["greedy_prompts"]],
                          DecodeOptions(mode=cfg.get("greedy_mode", "eft"), temperature=0.0, **common))
    out = {"greedy_tokens": [r.beams[0].tokens for r in greedy], "torch": torch.__version__, "runs": {}}
    progress(f"greedy {len(greedy)} prompts done ({greedy_dtype})")
    if greedy_dtype != dtype:  # the timed runs' models, in their own dtype
        del dec, greedy
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        dec = decoder(dtype)
    for mode in cfg.get("modes", ["ivg"]):
        opts = DecodeOptions(mode=mode, width=cfg["W"], successors=cfg["K"], chunk_len=cfg["L"], n=cfg.get("N", 16),
                             temperature=cfg["temperature"], **common)
        wait_turn(cfg, f"{mode} warm-up")
        # Warm-up, not timed. On a GPU it decodes every prompt once: the timed run's batch sizes and table widths
        # then replay CUDA graphs captured here (a warm-up of two prompts left the batch of 64's buckets to be
        # captured, and kernels compiled, inside the timed run).
        dec.generate(cfg["prompts"] if device.startswith("cuda") else cfg["prompts"][:2], opts)
        times = []
        for i in range(cfg["repeats"]):
            wait_turn(cfg, f"{mode} run {i + 1}")
            _sync(device)
            t0 = time.perf_counter()
            res = dec.generate(cfg["prompts"], opts)
            _sync(device)
            times.append(time.perf_counter() - t0)
            progress(f"{mode}: {len(cfg['prompts'])} prompts in {times[-1]:.2f} s")
        run = dict(tokens=[r.beams[0].tokens for r in res], seconds=times,
                   outside_forwards=getattr(dec.last_stats, "outside_forwards", float("nan")),
                   twin_rows=getattr(dec.last_stats, "twin_rows", 0))
        if cfg.get("latency"):  # one prompt at a time: mean seconds per response
            wait_turn(cfg, f"{mode} one prompt at a time")
            if device.startswith("cuda"):  # the one-prompt batch's graphs, captured before the timing
                dec.generate(cfg["prompts"][:1], opts)
            alone = []
            for p in cfg["prompts"][:cfg["latency"]]:
                _sync(device)
                t0 = time.perf_counter()
                dec.generate([p], opts)
                _sync(device)
                alone.append(time.perf_counter() - t0)
            run["latency_s"] = statistics.fmean(alone)
        out["runs"][mode] = run
    json.dump(out, open(out_path, "w"))


class _Side:
    """One side's process (``python script CFG OUT``), run in lockstep with the other: it loads its models,
    then runs one phase (greedy, a mode's warm-up, one timed repeat, ...) per go it is given."""

    def __init__(self, python: str, script: list, cfg: dict, work: Path, name: str, threads: int):
        self.name, self.out_path = name, work / f"{name}.out.json"
        cfg_path = work / f"{name}.cfg.json"
        cfg_path.write_text(json.dumps(dict(cfg, lockstep=True)))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM="false")
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen([python, *script, str(cfg_path), str(self.out_path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.tail = collections.deque(maxlen=400)

    def advance(self) -> bool:
        """Read its output up to its next turn (True) or its end (False). Progress lines are shown at once,
        the rest kept for an error report."""
        for line in self.proc.stdout:
            if line.startswith(TURN):
                return True
            if line.startswith(PROGRESS):
                print(f"  {self.name}: {line[len(PROGRESS):].rstrip()}", flush=True)
            else:
                self.tail.append(line)
        return False

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        if self.proc.wait() != 0:
            raise SystemExit(f"{self.name} side failed (exit {self.proc.returncode}):\n{''.join(self.tail)[-4000:]}")
        return json.loads(self.out_path.read_text())


def _run_in_turns(sides: list) -> list:
    """Run the sides' phases in turns (one side's phase, then the other's, ...) until both are done; their
    results. Only one side computes at a time, so a drift in the machine's speed (20-40% between runs on the
    2-core CPU) weighs on both instead of on whichever ran during it."""
    try:
        live = [side for side in sides if side.advance()]  # model loading (both at once, not timed)
        while live:
            for side in list(live):
                side.go()
                if not side.advance():
                    live.remove(side)
                    side.result()  # a failure is reported now, not after the other side's phases
        return [side.result() for side in sides]
    finally:
        for side in sides:
            if side.proc.poll() is None:
                side.proc.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--published", help="a checkout of github.com/chadlzx/ivg (holds inference_time_alignment/)")
    ap.add_argument("--python", default=os.environ.get("IVG_PUBLISHED_PYTHON"),
                    help="the published code's interpreter (default $IVG_PUBLISHED_PYTHON); a script that sets "
                         "PYTHONPATH and runs python works too")
    ap.add_argument("--models", default="demo", choices=["demo", *random_models.RANDOM_MODELS],
                    help="the demo's trained models, or random weights of a size (gpt2-xl: the GPU setting)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--published-prompts", type=int, default=None,
                    help="the published side decodes only the first M of the prompts (default all): it decodes one "
                         "prompt at a time, so its tokens/s over M prompts is its rate over all of them, and a GPU "
                         "lease can measure this project on 64 prompts beside the published code on 8")
    ap.add_argument("--greedy-prompts", type=int, default=None, help="prompts of the greedy parity check (default all)")
    ap.add_argument("--greedy-mode", default="eft", choices=["plain", "eft", "tokenrm"],
                    help="the token-wise mode of the greedy parity check")
    ap.add_argument("--greedy-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the dtype both sides load the models in for the greedy parity check (default float32: "
                         "in 16 bits the two sides' different attention kernels round differently and near ties "
                         "flip); the timed runs use --dtype")
    ap.add_argument("--latency", type=int, default=0,
                    help="also time this project one prompt at a time over this many prompts (per-response latency)")
    ap.add_argument("--modes", nargs="*", default=["ivg"], choices=["plain", "eft", "tokenrm", "cbs", "ivg", "bon"],
                    help="modes to time (default ivg; each runs the published chunk search with its shape)")
    ap.add_argument("-N", type=int, default=16, help="N of best-of-N")
    ap.add_argument("--rm-weight", type=float, default=1.0, help="w of token-RM guidance (z + w * Q)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("-W", type=int, default=4)
    ap.add_argument("-K", type=int, default=4)
    ap.add_argument("-L", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--base-template", default=None,
                    help="default 'Here is a movie review: {raw_prompt}' (demo), 'w1 w2 w3 {raw_prompt}' (random)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoder", default="paged", choices=["paged", "naive"], help="this project's decoder")
    ap.add_argument("--no-merge-twins", action="store_true",
                    help="compute every row, twins too (IVGDecoder(merge_twins=False)): the same results, more work")
    ap.add_argument("--work", help="folder for converted models and outputs (default: a temporary one)")
    ap.add_argument("--record", action="store_true", help="append to results.csv and render RESULTS.md")
    ap.add_argument("--ours-run", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ours_run:
        return _run_ours(*args.ours_run)
    if not args.published or not (Path(args.published) / "inference_time_alignment").is_dir():
        ap.error(f"--published={args.published!r}: expected a checkout holding inference_time_alignment/")
    if not args.python or not Path(args.python).exists():
        ap.error(f"--python={args.python!r}: expected the published environment's interpreter")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    from ivg.demo.corpus import held_out_prompts

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ivg-published-"))
    print(f"models ({args.models}, {dtype}) ...", flush=True)
    models = _prepare_models(work, args.models, dtype)
    if args.models == "demo":
        prompts, template = held_out_prompts(args.prompts, 999), "Here is a movie review: {raw_prompt}"
    else:
        prompts, template = random_models.prompts(args.prompts, args.models, 999), "w1 w2 w3 {raw_prompt}"
    pub_n = args.prompts if args.published_prompts is None else args.published_prompts
    if not 1 <= pub_n <= args.prompts:
        ap.error(f"--published-prompts={pub_n}: expected 1 to --prompts ({args.prompts})")
    greedy_n = min(pub_n, args.greedy_prompts or pub_n)
    cfg = dict(prompts=prompts, templates={"base": args.base_template or template, "guide": "{raw_prompt}"},
               beta=args.beta, W=args.W, K=args.K, L=args.L, temperature=args.temperature,
               max_new_tokens=args.max_new_tokens, seed=1, threads=args.threads, repeats=args.repeats, dtype=dtype,
               device=args.device, greedy_prompts=greedy_n, modes=args.modes, N=args.N, rm_weight=args.rm_weight,
               greedy_mode=args.greedy_mode, greedy_dtype=args.greedy_dtype)
    print(f"both sides, taking turns (published: {args.python}) ...", flush=True)
    theirs, ours = _run_in_turns([
        _Side(args.python, [str(HERE / "published_driver.py")], dict(cfg, prompts=prompts[:pub_n],
              published=str(Path(args.published).resolve()), **models["published"]), work, "published", args.threads),
        _Side(sys.executable, [str(Path(__file__).resolve()), "--ours-run"],
              dict(cfg, models=models["ours"], decoder=args.decoder, latency=args.latency,
                   merge_twins=not args.no_merge_twins), work, "ours",
              args.threads)])

    equal = sum(a == b for a, b in zip(ours["greedy_tokens"], theirs["greedy_tokens"]))
    device = harness.device_name(torch.device(args.device), threads=args.threads)  # each side's threads
    print(f"\n{'mode':<6} {'provider':<22} {'s per run (runs)':<28} {'tokens/s':>9} {'vs published':>13}")
    rows = []
    for mode in args.modes:
        rows += _mode_rows(args, mode, theirs["runs"][mode], ours["runs"][mode], pub_n, device, dtype)
    base = f"W={args.W},K={args.K},L={args.L},T={args.temperature},new={args.max_new_tokens},prompts={args.prompts}," \
           f"threads={args.threads},models={args.models}"
    print(f"greedy {args.greedy_mode} ({args.greedy_dtype}): identical tokens on {equal} of {greedy_n} prompts "
          f"(published transformers {theirs['transformers']}, torch {theirs['torch']})")
    rows.append(dict(rows[0], provider=f"greedy-{args.greedy_mode}-parity", dtype=args.greedy_dtype,
                     shape=f"mode={args.greedy_mode},{base},identical={equal}/{greedy_n}",
                     median_us="", speedup=""))
    if args.record:
        harness.append_results(rows)
    # Trained models in float32 must agree token for token; random weights, or 16 bits, may not (near ties).
    return 0 if equal == greedy_n or args.models != "demo" or args.greedy_dtype != "float32" else 1


def _mode_rows(args, mode, theirs, ours, pub_n, device, dtype) -> list:
    """Print and return the rows of one mode: the published code, this project, the published time less
    its GPU-memory logging where that is more than 1%, and one prompt at a time when measured. The
    published side decoded the first ``pub_n`` prompts (one at a time), this project all ``args.prompts``
    together: each side's tokens/s is over its own prompts, and the speed-up is the ratio of the two."""
    t_pub, t_ours = statistics.median(theirs["seconds"]), statistics.median(ours["seconds"])
    shape = (f"mode={mode},W={args.W},K={args.K},L={args.L},N={args.N},T={args.temperature},new={args.max_new_tokens},"
             f"prompts={args.prompts},threads={args.threads},models={args.models}")
    if pub_n != args.prompts:
        shape += f",published_prompts={pub_n}"
    rate = {"published": pub_n * args.max_new_tokens, "ours": args.prompts * args.max_new_tokens}  # tokens per run
    logging_s = statistics.median(theirs.get("logging_seconds") or [0.0])
    ours_name = f"ivg-kernels-{args.decoder}" + ("-every-row" if args.no_merge_twins else "")
    pub_rate = rate["published"] / t_pub
    rows = []
    for name, side, t, runs in (("published", "published", t_pub, theirs["seconds"]),
                                (ours_name, "ours", t_ours, ours["seconds"])):
        tps = rate[side] / t
        print(f"{mode:<6} {name:<22} {t:6.2f} ({', '.join(f'{x:.2f}' for x in runs)}){'':<6} {tps:9.1f} "
              f"{tps / pub_rate:12.2f}x")
        extra = (f",outside_forwards={ours['outside_forwards']:.1%}" if name != "published" and args.device != "cpu"
                 else f",gpu_logging_s={logging_s:.2f}" if name == "published" and logging_s else "")
        if name != "published" and ours.get("twin_rows"):  # rows not computed in the last timed run (ivg.twins)
            extra += f",twin_rows={ours['twin_rows']}"
        rows.append(dict(date=harness.now(), commit=harness.commit(), device=device, benchmark="published-ivg",
                         provider=name, shape=shape + extra, dtype=dtype, median_us=f"{t * 1e6:.0f}", gbps="",
                         speedup=f"{tps / pub_rate:.2f}"))
    if logging_s > 0.01 * t_pub:  # the published loop asks nvidia-smi for GPU memory every 10th step (GPUtil)
        t_clean = t_pub - logging_s
        clean_rate = rate["published"] / t_clean
        ours_rate = rate["ours"] / t_ours
        print(f"{mode:<6} published, less its GPU-memory logging ({logging_s:.2f} s): {t_clean:.2f} s; "
              f"ivg-kernels {ours_rate / clean_rate:.2f}x that")
        rows.append(dict(rows[0], provider="published-less-gpu-logging", median_us=f"{t_clean * 1e6:.0f}",
                         speedup=f"{clean_rate / pub_rate:.2f}"))
        rows.append(dict(rows[1], provider=f"{ours_name}-vs-less-logging", speedup=f"{ours_rate / clean_rate:.2f}"))
    if "latency_s" in ours:  # the published code decodes one prompt at a time anyway
        per_pub = t_pub / pub_n
        print(f"{mode:<6} per response, one prompt at a time: ivg-kernels {ours['latency_s']:.3f} s, published "
              f"{per_pub:.3f} s (its mean over the batch run): {per_pub / ours['latency_s']:.2f}x")
        rows.append(dict(rows[1], provider=f"{ours_name}-one-prompt", shape=shape + f",latency_prompts={args.latency}",
                         median_us=f"{ours['latency_s'] * 1e6:.0f}", speedup=f"{per_pub / ours['latency_s']:.2f}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
