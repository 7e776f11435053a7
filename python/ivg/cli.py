"""Command line: ``ivg <command>``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _info(args) -> int:
    import torch

    import ivg_kernels
    from ivg_kernels._backend import resolve_backend, triton_available

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"ivg-kernels {ivg_kernels.__version__}  torch {torch.__version__}  device {dev}")
    print(_versions())
    print(f"triton importable: {triton_available()}")
    print(f"guided_sample backend for {dev} tensors: {resolve_backend('auto', torch.empty(0, device=dev))}")
    from ivg_kernels import build
    from ivg_kernels._autotable import CUDA_WINS

    nvcc = build.nvcc_path()
    print(f"CUDA kernels (csrc/): nvcc {'at ' + nvcc if nvcc else 'not found'}; "
          f"sources {'at ' + str(build.CSRC) if build.CSRC.is_dir() else 'missing'}; "
          f"{_cuda_picks(CUDA_WINS)}; build with: python -m ivg_kernels.build")
    return 0


def _versions() -> str:
    """Python's and the installed releases of Triton and transformers (what a bug report needs beside torch's), and
    whether transformers is recent enough for tensor parallelism."""
    import platform
    from importlib import metadata

    from .models import TENSOR_PARALLEL_TRANSFORMERS, tensor_parallel_supported

    found = {}
    for name in ("triton", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    if found["transformers"] is None:
        tp = "no transformers"
    elif tensor_parallel_supported(found["transformers"]):
        tp = "available"
    else:
        tp = f"needs transformers >= {TENSOR_PARALLEL_TRANSFORMERS}"
    found = {k: v or "not installed" for k, v in found.items()}
    return (f"python {platform.python_version()}  triton {found['triton']}  transformers {found['transformers']}"
            f"  (tensor parallelism: {tp})")


def _cuda_picks(wins: dict) -> str:
    """Where ``backend='auto'`` runs a kernel of ``csrc/``, by the measured table (ivg_kernels._autotable)."""
    ranges = sum(map(len, wins.values()))
    if not ranges:
        return "'auto' picks none of them: the measured table lists no shape where they win; backend='cuda' forces them"
    ops = ", ".join(op for op, r in wins.items() if r)
    return f"'auto' picks them in {ranges} measured shape range{'s' if ranges > 1 else ''} ({ops})"


# benchmarks/bench_*.py: kernels (sampling, kv, host: eager host time), the decoder (decode, loop_host: the host's
# work per step and boundary, speculative), against the published code (published), data parallel (distributed)
BENCHMARKS = ["sampling", "kv", "host", "decode", "loop_host", "speculative", "published", "distributed"]


def _bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"bench_{args.op}.py"
    if not script.exists():
        print(f"ivg bench: {script} not found (benchmarks live in a source checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script)] + args.rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts).expanduser()
        if not path.exists():
            raise ValueError(f"--prompts {path}: no such file")
        try:  # UTF-8 whatever the locale; a byte-order mark (as some editors write) is not part of the first prompt
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]  # (number, text)
        if path.suffix == ".jsonl":
            for n, ln in lines:
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--prompts {path}: line {n} is not JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(row, dict) or "prompt" not in row:
                    raise ValueError(f"--prompts {path}: line {n} has no \"prompt\" field")
                p = row["prompt"]
                if not isinstance(p, str) and not (isinstance(p, list) and p and all(
                        isinstance(t, int) and not isinstance(t, bool) for t in p)):
                    raise ValueError(f"--prompts {path}: line {n}'s \"prompt\" is {p!r}; expected a string or a list "
                                     "of token ids")
                prompts.append(p)
        else:
            prompts += [ln for _, ln in lines]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


_TEMPLATE_ROLES = {"base": "base", "guide": "guide", "rm": "token_rm"}


def _templates(specs) -> dict:
    """``--template ROLE=FORMAT`` (repeatable) -> ``{"base"|"guide"|"token_rm": FORMAT}``."""
    out = {}
    for spec in specs or ():
        role, sep, fmt = spec.partition("=")
        if not sep or role not in _TEMPLATE_ROLES:
            raise ValueError(f"--template {spec!r}: expected ROLE=FORMAT with ROLE one of base, guide, rm "
                             "(for example base=\"Here is a movie review: {prompt}\")")
        if _TEMPLATE_ROLES[role] in out:
            raise ValueError(f"--template {spec!r}: a second template for {role}")
        out[_TEMPLATE_ROLES[role]] = fmt
    from .models import check_templates

    try:
        return check_templates(out)
    except ValueError as e:
        raise ValueError(f"--template: {e}") from None


def _check_model_flags(args) -> None:
    """A model flag that cannot name a model fails here, in one line, before anything loads."""
    from .models import check_model_paths

    flags = [("--base", args.base)] + [("--tuned", x) for x in args.tuned] + [("--ref", x) for x in args.ref]
    flags += [("--token-rm", args.token_rm)] if args.token_rm else []
    check_model_paths([(f"{flag} {value}", value) for flag, value in flags])


def _chunk_len(text: str):
    """``-L``: tokens per chunk, or None (infinity) for ``inf`` or ``0``."""
    if text in ("inf", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"--chunk-len {text!r}: expected an int >= 1, or inf (0 also means inf)")
    return value


# DecodeOptions' names of the options -> the flags that set them (an error names what the user typed)
_OPTION_FLAGS = {"mode": "--mode", "width": "--width", "successors": "--successors", "chunk_len": "--chunk-len",
                 "n": "-N", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                 "seed": "--seed", "max_new_tokens": "--max-new-tokens", "num_return": "--num-return",
                 "speculate": "--speculate", "draft": "--draft"}


def _generate(args) -> int:
    if len(args.tuned) != len(args.ref):
        raise ValueError(f"--tuned/--ref: expected pairs, got {len(args.tuned)} --tuned and {len(args.ref)} --ref")
    _check_model_flags(args)
    from .api import check_device, import_scorer

    check_device(args.device, "--device")
    if args.out == "-":  # the usual name of standard output (it wrote a file called "-")
        args.out = None
    templates = _templates(args.template)
    where = [Path(p).expanduser().resolve() for p in (args.prompts, args.out) if p]
    if len(where) == 2 and where[0] == where[1]:
        raise ValueError(f"--out {args.out}: the --prompts file itself (the results would replace the prompts)")
    prompts = _read_prompts(args)
    chunk = _chunk_len(args.chunk_len)
    options = dict(mode=args.mode, width=args.width, successors=args.successors, chunk_len=chunk, n=args.N,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   seed=args.seed, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop or ()),
                   speculate=args.speculate, draft=args.draft, speculate_adapt=args.speculate_adapt)
    from .options import DecodeOptions

    scorer = args.scorer if args.scorer in ("explicit", "implicit") else None
    if args.scorer and scorer is None:
        try:
            scorer = import_scorer(args.scorer)  # a MODULE:FUNCTION that cannot load fails now, in one line
        except ValueError as e:  # named by the flag, as the user wrote it
            raise ValueError(str(e).replace(f"scorer={args.scorer!r}", f"--scorer {args.scorer}", 1)) from None
    try:  # fail now, naming the flag
        DecodeOptions(**options, num_return=args.num_return, scorer=scorer).resolved(
            have_guides=bool(args.tuned), have_token_rm=args.token_rm is not None or bool(args.scorer))
    except ValueError as e:
        name, sep, rest = str(e).partition("=")
        if sep and name in _OPTION_FLAGS and ":" in rest:
            value = getattr(args, "N" if name == "n" else name, rest.split(":")[0])
            raise ValueError(f"{_OPTION_FLAGS[name]} {value}:{rest.split(':', 1)[1]}") from None
        raise
    if args.ignore_eos:
        options["eos_token_ids"] = ()
    if templates:
        options["templates"] = templates
    if args.chat_template:
        options["chat_template"] = True
    if args.batch_prompts != 64:
        if args.batch_prompts < 1:
            raise ValueError(f"--batch-prompts {args.batch_prompts}: expected an int >= 1")
        options["max_batch_prompts"] = args.batch_prompts
    if args.read_every is not None:
        if args.read_every < 1:
            raise ValueError(f"--read-every {args.read_every}: expected an int >= 1")
        options["read_every"] = args.read_every
    if args.scorer:
        options["scorer"] = args.scorer
    from .distributed import finish, generate_sharded

    try:
        lines, st = generate_sharded(
            prompts, out=args.out, num_return=args.num_return, save_every=args.save_every, overwrite=args.overwrite,
            tensor_parallel=args.tensor_parallel,
            device=args.device, base=args.base, tuned=args.tuned, ref=args.ref, beta=args.beta or (),
            token_rm=args.token_rm, token_rm_weight=args.token_rm_weight, dtype=args.dtype, backend=args.backend,
            decoder=args.decoder, cuda_graphs=False if args.no_cuda_graphs else None,
            step_graphs=False if args.no_step_graphs else None, **options)
    finally:
        finish()
    if lines is None:  # not rank 0
        return 0
    if not args.out:
        print("\n".join(lines))
    # tokens drawn by every candidate this run (a search draws W*K per step), and the best responses' lengths (the
    # lines hold those of a resumed run too)
    held = sum(len(json.loads(line)["tokens"]) for line in lines)
    best = "the best response holds" if len(lines) == 1 else f"the {len(lines)} best responses hold"
    print(f"ivg generate: {st.prompts} prompt{'s' * (st.prompts != 1)} decoded in {st.wall_s:.2f} s, {st.new_tokens} "
          f"tokens drawn by all candidates ({st.tokens_per_s:.1f} tokens/s); {best} {held} tokens"
          + (f"; wrote {len(lines)} lines to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _demo(args) -> int:
    from .api import check_device
    from .demo.run import METHODS, run_demo

    check_device(args.device, "--device")
    methods = args.methods or list(METHODS)
    try:
        report = run_demo(Path(args.out).expanduser() if args.out else None, methods=methods,
                          num_prompts=args.prompts, device=args.device, seed=args.seed, progress=True)
    except ValueError as e:  # named by the flag, as the user wrote it
        raise ValueError(str(e).replace(f"num_prompts={args.prompts}", f"--prompts {args.prompts}", 1)) from None
    print(report.table())
    print(f"\nbuild (or cache) {report.build_s:.1f} s, whole demo {report.wall_s:.1f} s; "
          f"gold reward: VADER compound of prompt + response; win rate and calibrated reward against "
          "8 base samples per prompt" + (f"; wrote {args.out}/outputs.jsonl, table.txt and reward_by_method.png"
                                            if args.out else ""))
    return 0


def _add_generate(sub):
    g = sub.add_parser("generate", help="decode prompts with IVG and its relatives",
                       description="Decode prompts: plain, EFT, token-RM guidance, chunk-level beam search, IVG, "
                                   "best-of-N and worst-of-N. Output: one JSON line per prompt.")
    g.add_argument("--base", required=True, help="base model: local path or hub id")
    g.add_argument("--tuned", action="append", default=[], help="tuned guide (repeatable; pairs with --ref)")
    g.add_argument("--ref", action="append", default=[], help="reference guide (repeatable; pairs with --tuned)")
    g.add_argument("--beta", action="append", type=float, help="beta of each guide pair (repeatable; default 1)")
    g.add_argument("--token-rm", help="token reward model: a directory with score_head.safetensors, or a causal LM")
    g.add_argument("--token-rm-weight", type=float, default=1.0, help="w in z + w*Q for token-RM guidance (default 1)")
    g.add_argument("--mode", default="plain", choices=["plain", "eft", "tokenrm", "cbs", "ivg", "bon", "won"],
                   help="plain: the base alone; eft: base + beta * (tuned - ref) token by token; tokenrm: base + w * Q "
                        "token by token; cbs: chunk-level beam search (-W, -K, -L) ranked by --scorer; ivg: eft inside "
                        "cbs; bon / won: best / worst of -N samples (default: plain)")
    g.add_argument("--scorer", help="what cbs, ivg, bon and won rank by: explicit (the token RM's Q), implicit (the "
                                     "guides' summed log-ratio), or MODULE:FUNCTION taking (prompts, responses) "
                                     "(default: explicit; for cbs, bon and won without a token RM, implicit)")
    g.add_argument("-W", "--width", type=int, default=4,
                   help="beams kept per prompt at each chunk boundary (default 4)")
    g.add_argument("-K", "--successors", type=int, default=4,
                   help="candidates each kept beam extends into per chunk (default 4)")
    g.add_argument("-L", "--chunk-len", default="5",
                   help="tokens per chunk, or inf (0 also means inf: one chunk, the whole response; default 5)")
    g.add_argument("-N", type=int, default=16, help="N of best-of-N / worst-of-N (default 16)")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="divides the combined logits (0: greedy; default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off, the default)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="keep the smallest set of most likely tokens whose probability reaches top_p (1: off, the "
                        "default)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens with probability >= min_p * the largest (0: off, the default)")
    g.add_argument("--seed", type=int, default=0,
                   help="a prompt's output depends only on it, the prompt and the options, up to the model "
                        "forwards' last-place rounding in batches of other sizes (default 0)")
    g.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="speculative decoding: the draft model drafts N tokens per round and every model "
                        "verifies them at once; the output keeps the same distribution (0: off, the default)")
    g.add_argument("--speculate-adapt", action="store_true",
                   help="with --speculate N: the drafts per round adapt between 1 and N to how many were kept "
                        "(the same tokens as a fixed N; only the speed changes)")
    g.add_argument("--draft", choices=["auto", "tune", "ref"], default="auto",
                   help="the draft model with --speculate: the first tuned guide, its reference, or auto (the "
                        "default): the tuned guide with EFT guidance, else the reference")
    g.add_argument("--max-new-tokens", type=int, default=64, help="response length limit in tokens (default 64)")
    g.add_argument("--stop", action="append",
                   help="stop string, taken as written (repeatable; a newline in bash: --stop $'\\n')")
    g.add_argument("--ignore-eos", action="store_true",
                   help="never stop at an end-of-sequence token (responses run to --max-new-tokens or a --stop)")
    g.add_argument("--template", action="append", metavar="ROLE=FORMAT",
                   help="prompt template of one role: base, guide (tuned and ref) or rm, with {prompt}; repeatable, "
                        "e.g. --template base=\"Here is a movie review: {prompt}\" (default: the bare prompt)")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap each (templated) prompt as a user message in each model's own chat template")
    g.add_argument("--batch-prompts", type=int, default=64,
                   help="prompts decoded together by the paged decoder (its KV pools are sized for that many, or "
                        "for fewer, with a warning, where memory cannot hold them; default 64)")
    g.add_argument("--read-every", type=int, default=None, metavar="N",
                   help="the most decode steps between two reads of the drawn tokens by the host when EOS may end "
                        "rows (default 8 on a GPU, 1 on the CPU; results do not depend on it)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a .txt file (one prompt per line) or .jsonl with a \"prompt\" field (text, or a "
                   "list of token ids)")
    g.add_argument("--out", help="write JSON lines here instead of stdout (- for stdout)")
    g.add_argument("--num-return", type=int, default=1, help="beams per prompt in the output, best first (default 1)")
    g.add_argument("--save-every", type=int, default=64,
                   help="prompts per rank between appends to --out (a killed run loses at most this many; default 64)")
    g.add_argument("--tensor-parallel", action="store_true",
                   help="under torchrun: shard the base model over the ranks (transformers' tp_plan='auto') instead of "
                        "the prompts; guides and token RM stay whole on each rank")
    g.add_argument("--overwrite", action="store_true",
                   help="start --out afresh (by default a rerun skips the prompts already in it)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "float64", "bfloat16", "float16"],
                   help="the models' dtype (default: what transformers' from_pretrained gives without one)")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"],
                   help="the kernels: reference is plain torch (the CPU path); auto runs Triton on CUDA and the "
                        "reference elsewhere, unless IVG_BACKEND says otherwise (default auto)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every decode step eagerly (by default CUDA models replay them from CUDA graphs)")
    g.add_argument("--no-step-graphs", action="store_true",
                   help="replay each model's step on its own, the sampler eagerly between them (by default a step "
                        "between host reads, or a speculative round, is one CUDA graph of every model and the sampler)")
    g.add_argument("--decoder", default="paged", choices=["paged", "naive"],
                   help="paged: this library's decoder (the default); naive: the published algorithm, one prompt at "
                        "a time (the test oracle and a baseline)")
    g.set_defaults(fn=_generate)


def _quiet_transformers() -> None:
    """No weight-loading progress bars or advisory warnings from transformers on our console."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    """The ``ivg`` command line: its subcommands and their options."""
    parser = argparse.ArgumentParser(prog="ivg", description="Integrated Value Guidance: fast inference-time alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and the backends that will run").set_defaults(fn=_info)
    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (source checkout)")
    bench.add_argument("op", choices=BENCHMARKS, help="which benchmark: benchmarks/bench_OP.py")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script (try --help)")
    bench.set_defaults(fn=_bench)
    _add_generate(sub)
    demo = sub.add_parser("demo", help="the controlled-sentiment experiment in miniature, offline",
                          description="Build (once, cached) a miniature of the paper's IMDB setting and compare "
                                      "base sampling, best-of-N, EFT, token-RM guidance, CBS and IVG by gold reward.")
    demo.add_argument("--out", help="write outputs.jsonl, table.txt and reward_by_method.png here")
    demo.add_argument("--methods", nargs="*", help="subset of: base bon eft tokenrm cbs-explicit cbs-implicit ivg")
    demo.add_argument("--prompts", type=int, default=64, help="held-out prompts (default 64)")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed of every method's sampling (default 0)")
    demo.set_defaults(fn=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "demo"):
        _quiet_transformers()
    try:
        return args.fn(args)
    except ValueError as e:  # bad input: one clear line, not a traceback
        print(f"ivg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader closed stdout early (``ivg generate ... | head``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise again
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
