"""This project's decoder against the published IVG code, on the same models, prompts and settings.

    python benchmarks/bench_published.py --published CHECKOUT --python PUBLISHED_ENV/bin/python [--record]

``CHECKOUT`` is a clone of github.com/chadlzx/ivg (it has no licence: it is never copied here);
``--python`` an interpreter of an environment with what its requirements pin (transformers 4.34.1,
tokenizers 0.14, accelerate 0.23) plus sentence-transformers and scikit-learn (``scorer.py``
imports them). ``benchmarks/published_driver.py`` runs in that environment and calls the published
modules as the published IMDB script does; this project's decoder runs in this environment. Each
side runs in its own process, one after the other, with ``--threads`` threads (1 by default: the
machines here have 2 cores), and neither counts model loading or a warm-up prompt.

Models: the ``ivg demo`` models (trained on the CPU in about 100 s, cached): base GPT-2 4x128, tuned
and reference guides 2x64, token reward model 2x64 with a vocabulary-sized score head. The published
``GPT2ModelForTokenScore`` has no score-head bias, so both sides get the token RM without it; the
tokenizer is rewritten in the format tokenizers 0.14 reads. Templates: the base sees
``--base-template``, the guides the bare prompt, the token RM the bare prompt (the published defaults).

Setting (the issue's): IVG = EFT token by token (beta 1) inside chunk-level beam search ranked by the
token RM, W=K=4, L=5, temperature 0.7, 32 new tokens, 16 prompts, float32, no EOS, no stop strings.
Reported: seconds per run (median of ``--repeats``), response tokens per second (prompts x new
tokens / s, the same count on both sides), the ratio, and greedy-EFT token parity (the published
code has no greedy path: one beam, one candidate, temperature 1e-9).
"""
from __future__ import annotations

import argparse
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


def _prepare_models(work: Path) -> dict:
    """Demo models for both sides: ours (token RM without score-head bias) and the published formats."""
    import torch
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
    rm_theirs = theirs / "rm"
    rm_theirs.mkdir(exist_ok=True)
    cfg = json.loads((demo / "rm" / "config.json").read_text())
    cfg["architectures"] = ["GPT2ModelForTokenScore"]
    (rm_theirs / "config.json").write_text(json.dumps(cfg))
    state = {(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in body.items()}
    state["score_head.weight"] = head
    torch.save(state, rm_theirs / "pytorch_model.bin")
    paths["rm"] = str(rm_ours)
    return {"ours": paths, "published": {k: str(theirs / k) for k in ("base", "tuned", "ref", "rm")}}


def _run_ours(cfg_path: str, out_path: str) -> None:
    """This project's side, in its own process: the same prompts and settings, greedy EFT and IVG."""
    import time

    import torch

    cfg = json.load(open(cfg_path))
    torch.set_num_threads(cfg["threads"])
    from ivg.api import make_decoder
    from ivg.options import DecodeOptions

    m = cfg["models"]
    templates = {"base": cfg["templates"]["base"].replace("{raw_prompt}", "{prompt}"),
                 "guide": cfg["templates"]["guide"].replace("{raw_prompt}", "{prompt}"), "token_rm": "{prompt}"}
    dec, _ = make_decoder(base=m["base"], tuned=[m["tuned"]], ref=[m["ref"]], beta=[cfg["beta"]], token_rm=m["rm"],
                          dtype=cfg.get("dtype", "float32"), templates=templates, decoder=cfg.get("decoder", "paged"))
    common = dict(max_new_tokens=cfg["max_new_tokens"], eos_token_ids=(), seed=cfg["seed"])
    greedy = dec.generate(cfg["prompts"], DecodeOptions(mode="eft", temperature=0.0, **common))
    ivg = DecodeOptions(mode="ivg", width=cfg["W"], successors=cfg["K"], chunk_len=cfg["L"],
                        temperature=cfg["temperature"], **common)
    dec.generate(cfg["prompts"][:1], ivg)  # warm-up, not timed
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        res = dec.generate(cfg["prompts"], ivg)
        times.append(time.perf_counter() - t0)
    json.dump({"greedy_tokens": [r.beams[0].tokens for r in greedy], "ivg_tokens": [r.beams[0].tokens for r in res],
               "seconds": times, "torch": torch.__version__}, open(out_path, "w"))


def _side(python: str, script: list, cfg: dict, work: Path, name: str, threads: int) -> dict:
    cfg_path, out_path = work / f"{name}.cfg.json", work / f"{name}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([python, *script, str(cfg_path), str(out_path)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} side failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--published", help="a checkout of github.com/chadlzx/ivg (holds inference_time_alignment/)")
    ap.add_argument("--python", default=os.environ.get("IVG_PUBLISHED_PYTHON"),
                    help="the published code's interpreter (default $IVG_PUBLISHED_PYTHON)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("-W", type=int, default=4)
    ap.add_argument("-K", type=int, default=4)
    ap.add_argument("-L", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--base-template", default="Here is a movie review: {raw_prompt}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoder", default="paged", choices=["paged", "naive"], help="this project's decoder")
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

    from benchmarks import harness
    from ivg.demo.corpus import make_prompts

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ivg-published-"))
    models = _prepare_models(work)
    prompts = make_prompts(args.prompts, 999)
    cfg = dict(prompts=prompts, templates={"base": args.base_template, "guide": "{raw_prompt}"}, beta=args.beta,
               W=args.W, K=args.K, L=args.L, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
               seed=1, threads=args.threads, repeats=args.repeats, dtype="float32", greedy=True)
    print(f"published side ({args.python}) ...", flush=True)
    theirs = _side(args.python, [str(HERE / "published_driver.py")], dict(cfg, published=str(Path(args.published)
                   .resolve()), **models["published"]), work, "published", args.threads)
    print("this project's side ...", flush=True)
    ours = _side(sys.executable, [str(Path(__file__).resolve()), "--ours-run"],
                 dict(cfg, models=models["ours"], decoder=args.decoder), work, "ours", args.threads)

    equal = sum(a == b for a, b in zip(ours["greedy_tokens"], theirs["greedy_tokens"]))
    tokens = args.prompts * args.max_new_tokens
    t_pub, t_ours = statistics.median(theirs["seconds"]), statistics.median(ours["seconds"])
    shape = (f"mode=ivg,W={args.W},K={args.K},L={args.L},T={args.temperature},new={args.max_new_tokens},"
             f"prompts={args.prompts},threads={args.threads},models=demo")
    print(f"\n{'provider':<22} {'s per run (runs)':<28} {'tokens/s':>9} {'vs published':>13}")
    rows = []
    for name, t, runs in (("published", t_pub, theirs["seconds"]), (f"ivg-kernels-{args.decoder}", t_ours,
                                                                      ours["seconds"])):
        print(f"{name:<22} {t:6.2f} ({', '.join(f'{x:.2f}' for x in runs)}){'':<6} {tokens / t:9.1f} {t_pub / t:12.2f}x")
        rows.append(dict(date=harness.now(), commit=harness.commit(), device=harness.device_name(_cpu()),
                         benchmark="published-ivg", provider=name, shape=shape, dtype="float32",
                         median_us=f"{t * 1e6:.0f}", gbps="", speedup=f"{t_pub / t:.2f}"))
    print(f"greedy EFT: identical tokens on {equal} of {args.prompts} prompts "
          f"(published transformers {theirs['transformers']}, torch {theirs['torch']})")
    rows.append(dict(rows[0], provider="greedy-eft-parity", shape=shape + f",identical={equal}/{args.prompts}",
                     median_us="", speedup=""))
    if args.record:
        harness.append_results(rows)
    return 0 if equal == args.prompts else 1


def _cpu():
    import torch

    return torch.device("cpu")


if __name__ == "__main__":
    sys.exit(main())
