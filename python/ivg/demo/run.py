"""Run the miniature controlled-sentiment experiment: every method on held-out prompts, judged by VADER.

Columns: mean gold reward with its standard error; InfAlign's inference-time win rate against the
base model's samples for the same prompt; the mean calibrated reward (the gold reward's rank among
those base samples); new tokens per second (every candidate row's tokens count).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence



from ..alignment_vectors import apply_alignment_vectors
from ..api import load_models
from ..decoder import IVGDecoder
from ..infalign import calibrated_reward, win_rate
from ..models import IVGModels
from ..options import DecodeOptions
from .build import BuildConfig, build
from .corpus import OPENINGS, GoldReward, held_out_prompts

METHODS = ("base", "bon", "eft", "tokenrm", "cbs-explicit", "cbs-implicit", "ivg")
# Published IMDB settings where they fit: W=K=4, L=5, temperature 0.7, no top-k.
WIDTH, SUCCESSORS, CHUNK, TEMPERATURE = 4, 4, 5, 0.7
BETA = 1.0  # strength of the tuned-minus-reference guide pair
RM_WEIGHT = 3.0  # w in z + w * Q for token-RM guidance
AV_LAMBDAS = (0.0, 1.0, 2.0)


def method_options(method: str, seed: int, max_new_tokens: int) -> DecodeOptions:
    common = dict(width=WIDTH, successors=SUCCESSORS, chunk_len=CHUNK, temperature=TEMPERATURE, seed=seed,
                  max_new_tokens=max_new_tokens)
    table = {
        "base": dict(mode="plain"),
        "bon": dict(mode="bon", n=WIDTH * SUCCESSORS, scorer="explicit"),
        "eft": dict(mode="eft"),
        "tokenrm": dict(mode="tokenrm"),
        "cbs-explicit": dict(mode="cbs", scorer="explicit"),
        "cbs-implicit": dict(mode="cbs", scorer="implicit"),
        "ivg": dict(mode="ivg"),
    }
    if method not in table:
        raise ValueError(f"methods: {method!r} is not one of {', '.join(METHODS)}")
    return DecodeOptions(**common, **table[method])


@dataclass
class Row:
    method: str
    rewards: list
    texts: list
    tokens_per_s: float = float("nan")
    win_rate: float = float("nan")
    calibrated: float = float("nan")

    @property
    def mean(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def stderr(self) -> float:
        n = len(self.rewards)
        if n < 2:
            return float("nan")
        var = sum((r - self.mean) ** 2 for r in self.rewards) / (n - 1)
        return math.sqrt(var / n)


@dataclass
class DemoReport:
    prompts: list
    rows: list = field(default_factory=list)
    build_s: float = 0.0
    wall_s: float = 0.0

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def table(self) -> str:
        lines = [f"{'method':<14} {'gold reward':>17} {'win rate vs base':>17} {'calibrated':>11} {'tokens/s':>10}",
                 "-" * 73]
        for r in self.rows:
            lines.append(f"{r.method:<14} {r.mean:+8.3f} ± {r.stderr:5.3f} {r.win_rate:17.3f} {r.calibrated:11.3f} "
                         f"{r.tokens_per_s:10.0f}")
        return "\n".join(lines)


def _score(gold, prompts, texts):
    return [gold(p + " " + t) for p, t in zip(prompts, texts)]


def load_demo_models(paths, *, device="cpu", dtype=None) -> IVGModels:
    """The demo's four models with its beta and token-RM weight: ``paths`` a demo build's folder, or a mapping
    of ``base``, ``tuned``, ``ref`` and ``rm`` to model folders of those roles (random weights of other sizes)."""
    if not isinstance(paths, Mapping):
        paths = {k: Path(paths) / k for k in ("base", "tuned", "ref", "rm")}
    return load_models(paths["base"], tuned=[paths["tuned"]], ref=[paths["ref"]], beta=[BETA], token_rm=paths["rm"],
                       token_rm_weight=RM_WEIGHT, device=device, dtype=dtype)


def run_demo(out_dir: Optional[Path] = None, *, methods: Sequence[str] = METHODS, num_prompts: int = 64,
             device: str = "cpu", cfg: BuildConfig = BuildConfig(), seed: int = 0, reference_samples: int = 8,
             av_lambdas: Sequence[float] = AV_LAMBDAS, build_root: Optional[Path] = None,
             progress: bool = True) -> DemoReport:
    t0 = time.perf_counter()
    if num_prompts < 2:
        raise ValueError(f"num_prompts={num_prompts}: expected at least 2 (standard errors need two)")
    if num_prompts > OPENINGS:
        raise ValueError(f"num_prompts={num_prompts}: expected at most {OPENINGS} (the distinct openings the corpus has)")
    for m in methods:
        method_options(m, seed, 1)  # validates the names before the build
    path = build(cfg, root=build_root, progress=progress)
    build_s = time.perf_counter() - t0
    models = load_demo_models(path, device=device)
    gold = GoldReward()
    prompts = held_out_prompts(num_prompts, cfg.seed + 999)  # distinct: a repeat would repeat its response
    report = DemoReport(prompts=prompts, build_s=build_s)
    dec = IVGDecoder(models)

    # The base model's own samples: the reference distribution of InfAlign's measures.
    ref = dec.generate(prompts, DecodeOptions(mode="bon", n=reference_samples, num_return=reference_samples,
                                              scorer=gold.scorer, temperature=TEMPERATURE, seed=seed + 12345,
                                              max_new_tokens=cfg.max_new_tokens))
    ref_rewards = [[b.score for b in r.beams] for r in ref]

    def add(method, texts, tps):
        rewards = _score(gold, prompts, texts)
        row = Row(method, rewards, texts, tps)
        row.win_rate = win_rate([[r] for r in rewards], ref_rewards)
        row.calibrated = sum(calibrated_reward(r, rr) for r, rr in zip(rewards, ref_rewards)) / len(rewards)
        report.rows.append(row)

    for m in methods:
        res = dec.generate(prompts, method_options(m, seed, cfg.max_new_tokens), progress=progress)
        add(m, [r.beams[0].text for r in res], dec.last_stats.tokens_per_s)

    # Alignment vectors: the tuned-minus-reference vector applied to the reference guide.
    g = models.guides[0]
    for lam in av_lambdas:
        steered = apply_alignment_vectors(g.ref, [(g.tuned, g.ref, float(lam))])
        av = IVGDecoder(IVGModels(steered, tokenizer=models.tokenizer))
        res = av.generate(prompts, method_options("base", seed, cfg.max_new_tokens))
        add(f"av-{lam:g}", [r.beams[0].text for r in res], av.last_stats.tokens_per_s)
    report.wall_s = time.perf_counter() - t0
    if out_dir is not None:
        write_outputs(report, Path(out_dir))
    return report


def write_outputs(report: DemoReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "outputs.jsonl").open("w") as f:
        for row in report.rows:
            for p, t, r in zip(report.prompts, row.texts, row.rewards):
                f.write(json.dumps(dict(method=row.method, prompt=p, text=t, gold_reward=r)) + "\n")
    (out_dir / "table.txt").write_text(report.table() + "\n")
    plot(report, out_dir / "reward_by_method.png")


def plot(report: DemoReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.method for r in report.rows]
    means = [r.mean for r in report.rows]
    errs = [r.stderr for r in report.rows]
    colors = ["#888888" if n == "base" else "#c0504d" if n == "ivg" else "#9bbb59" if n.startswith("av-")
              else "#4f81bd" for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    ax.bar(names, means, yerr=errs, color=colors, capsize=3)
    ax.axhline(report.row("base").mean if "base" in names else 0.0, color="#555555", lw=0.8, ls="--")
    ax.set_ylabel("mean gold reward (VADER)")
    ax.set_title(f"ivg demo: {len(report.prompts)} held-out prompts, bars ± 1 s.e.")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


