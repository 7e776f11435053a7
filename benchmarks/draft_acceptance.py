"""Which small model should draft for speculative IVG: per-token acceptance of candidate drafts.

    OMP_NUM_THREADS=1 python benchmarks/draft_acceptance.py            # the demo's trained models
    python benchmarks/draft_acceptance.py --record                     # append to results.csv

Speculative decoding keeps a draft token with probability ``min(1, p/q)``, so a draft distribution
``q`` is accepted, per token, with probability ``sum_v min(p(v), q(v)) = 1 - TV(p, q)`` (the rate every
draw of ``ivg_kernels.speculative_verify`` realises on average). This measures it along the responses
that plain decoding draws (``--modes``, the demo's settings and seed, one response per prompt), for
``p`` the sampler's warped guided distribution and these ``q``, each warped at the same temperature and
filters unless named:

* ``tune``: the tuned guide alone (what ``--speculate`` drafts with);
* ``tune x0.8``, ``tune x1.2``: the tuned guide at 0.8 and 1.2 times the temperature;
* ``tune+beta(tune-ref)``, ``tune+beta/2(tune-ref)``: the tuned guide with the guide pair's log-ratio,
  as EFT adds it to the base (a draft step would then run the reference guide too);
* ``ref``: the reference guide alone.

Reported per mode and candidate, in ``shape``: the mean acceptance over every position and the tokens a
round of N drafts then yields if positions were independent, ``(1 - a^(N+1)) / (1 - a)`` for N = 3 and 4.
(The decoder's ``acceptance`` in ``bench_speculative.py`` is kept drafts over drafted ones: lower, since
drafts after a rejection are never tested.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from benchmarks import harness  # noqa: E402


def candidates(z: dict, beta: float, temperature: float) -> dict:
    """Name -> (logits, guide pairs, temperature) of each draft distribution, from logits ``z`` by the
    decoder's model names (``tune0``, ``ref0``)."""
    t, r = z["tune0"], z["ref0"]
    return {
        "tune": (t, [], temperature),
        "tune x0.8": (t, [], 0.8 * temperature),
        "tune x1.2": (t, [], 1.2 * temperature),
        "tune+beta(tune-ref)": (t, [(t, beta), (r, -beta)], temperature),
        "tune+beta/2(tune-ref)": (t, [(t, beta / 2), (r, -beta / 2)], temperature),
        "ref": (r, [], temperature),
    }


@torch.no_grad()
def acceptance(models, prompts, results, opts) -> dict:
    """Candidate name -> acceptance ``1 - TV(p, q)`` at every position of every prompt's best response."""
    from ivg_kernels._args import prepare_sample_args
    from ivg.search import sampler_guides
    from ivg_kernels.reference.sampling import warped_probs

    g = models.guides[0]
    w_rm = models.token_rm_weight if "tokenrm" in opts.tokenwise else 0.0
    out: dict = {}
    for prompt, res in zip(prompts, results):
        tokens = res.beams[0].tokens
        z = {}
        for name, model, role in models.roles():
            if name not in ("base", "tune0", "ref0", "rm") or (name == "rm" and not w_rm):
                continue
            ids = models.prompt_ids(prompt, role, name)
            seq = torch.tensor([ids + tokens])
            # the logits each response token was drawn from
            z[name] = model(seq).logits[0, len(ids) - 1: -1].float()
        vocab = min(x.shape[-1] for x in z.values())
        # the sampler's inputs as the decoder passes them (ivg.decode_loop.DecodeLoop.sample)
        guides = sampler_guides(z, [(0, g.beta)] if opts.uses_guides else [], "eft" in opts.tokenwise, w_rm)
        filters = (opts.top_k, opts.top_p, opts.min_p)
        p = warped_probs(prepare_sample_args(z["base"], guides, opts.temperature, *filters, 0, 0, vocab))
        for name, (logits, pairs, temp) in candidates(z, g.beta, opts.temperature).items():
            q = warped_probs(prepare_sample_args(logits, pairs, temp, *filters, 0, 0, vocab))
            out.setdefault(name, []).append(torch.minimum(p, q).sum(dim=-1))
    return {name: torch.cat(a) for name, a in out.items()}


def main(argv=None) -> int:
    from ivg.decoder import IVGDecoder
    from ivg.demo.build import build
    from ivg.demo.corpus import held_out_prompts
    from ivg.demo.run import load_demo_models, method_options

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--modes", nargs="*", default=["eft", "ivg"])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    path = build(progress=False)
    models = load_demo_models(path)
    prompts = held_out_prompts(args.prompts, 4242)
    dec = IVGDecoder(models)
    device = torch.device("cpu")
    dev_name, date, sha = harness.device_name(device), harness.now(), harness.commit()
    print(f"# draft_acceptance on {dev_name}, torch {torch.__version__}, commit {sha}", flush=True)
    rows = []
    for mode in args.modes:
        opts = method_options(mode, 0, args.max_new_tokens)
        results = dec.generate(prompts, opts)
        rates = acceptance(models, prompts, results, opts.resolved(have_guides=True, have_token_rm=True))
        for name, a in rates.items():
            mean = a.mean().item()
            per_round = {n: (1 - mean ** (n + 1)) / (1 - mean) for n in (3, 4)}
            print(f"{mode:<4} {name:<22} acceptance {mean:.3f}  tokens per round of 3 drafts {per_round[3]:.2f}, "
                  f"of 4 {per_round[4]:.2f}  ({len(a)} positions)", flush=True)
            rows.append(dict(date=date, commit=sha, device=dev_name, benchmark="draft_acceptance",
                             provider=f"{mode}-{name}",
                             shape=(f"demo models,prompts={len(prompts)},new={args.max_new_tokens},"
                                    f"T={opts.temperature},"
                                    f"positions={len(a)},acceptance={mean:.3f},per_round_3={per_round[3]:.2f},"
                                    f"per_round_4={per_round[4]:.2f}"),
                             dtype="float32", median_us="", gbps="", speedup=""))
    if args.record:
        harness.append_results(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
