"""`ivg demo`: a deterministic builder, the outputs, and (on the full build) the guided methods beating base."""
import json
import math

import pytest
import torch

pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

from ivg.cli import main  # noqa: E402
from ivg.demo.build import REDUCED, build  # noqa: E402
from ivg.demo.run import METHODS, run_demo  # noqa: E402


def _weights(path):
    from safetensors.torch import load_file

    return {f"{d}/{k}": v for d in ("base", "ref", "tuned", "rm") for f in sorted((path / d).glob("*.safetensors"))
            for k, v in load_file(f).items()}


def test_builder_is_deterministic(tmp_path):
    a = build(REDUCED, root=tmp_path / "a", progress=False)
    b = build(REDUCED, root=tmp_path / "b", progress=False)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between two builds"
    assert (a / "base" / "tokenizer.json").read_text() == (b / "base" / "tokenizer.json").read_text()
    assert build(REDUCED, root=tmp_path / "a", progress=False) == a  # cached


def test_reduced_demo_writes_outputs_table_and_plot(tmp_path):
    out = tmp_path / "out"
    # 10 prompts: the draws that made them repeated "overall it was a" at the 10th (the decoder then repeats a
    # response, and a mean over prompts counts it twice as one sample)
    report = run_demo(out, cfg=REDUCED, build_root=tmp_path / "cache", num_prompts=10, reference_samples=2,
                      av_lambdas=(0.0, 1.0), progress=False)
    assert len(set(report.prompts)) == 10, report.prompts
    rows = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == set(METHODS) | {"av-0", "av-1"}
    assert len(rows) == 10 * (len(METHODS) + 2)
    assert all(set(r) == {"method", "prompt", "text", "gold_reward"} for r in rows)
    assert all(-1.0 <= r["gold_reward"] <= 1.0 for r in rows)
    assert (out / "reward_by_method.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.table()
    assert all(m in table for m in METHODS) and "win rate" in table
    with pytest.raises(ValueError, match="methods: 'nope'"):
        run_demo(None, methods=["nope"], cfg=REDUCED, build_root=tmp_path / "cache")


def test_the_demo_names_its_flags(capsys):
    """``--prompts 1`` was reported as ``num_prompts=1``, the Python argument's name."""
    assert main(["demo", "--prompts", "1"]) == 2
    assert "ivg demo: error: --prompts 1: expected at least 2 (standard errors need two)" in capsys.readouterr().err
    assert main(["demo", "--prompts", "272"]) == 2  # before anything is built
    assert "ivg demo: error: --prompts 272: expected at most 271 (the distinct openings" in capsys.readouterr().err


def test_held_out_prompts_are_distinct_and_follow_the_draws():
    from ivg.demo.corpus import OPENINGS, held_out_prompts, make_prompts

    drawn = make_prompts(600, 999)
    first_seen = list(dict.fromkeys(drawn))
    assert len(set(drawn[:64])) < 64  # the draws themselves repeat
    for n in (1, 10, 64):
        got = held_out_prompts(n, 999)
        assert got == first_seen[:n] and len(set(got)) == n
    everything = held_out_prompts(OPENINGS, 5)
    assert len(set(everything)) == OPENINGS == 271
    assert held_out_prompts(64, 4242) == held_out_prompts(64, 4242) != held_out_prompts(64, 4243)
    for bad in (0, OPENINGS + 1, 2.0, True):
        with pytest.raises(ValueError, match=r"n=.*expected 1 to 271"):
            held_out_prompts(bad, 1)


def test_full_demo_guided_methods_beat_base_sampling(tmp_path, capsys):
    """The benchmark-style check on the full build (cached under ~/.cache/ivg after the first run)."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "ivg" in table and "gold reward" in table
    rows = [json.loads(x) for x in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r["gold_reward"])

    def mean_se(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    base, base_se = mean_se(by["base"])
    for method in ("bon", "eft", "tokenrm", "cbs-explicit", "cbs-implicit", "ivg"):
        m, se = mean_se(by[method])
        assert m - base > 3 * math.sqrt(se ** 2 + base_se ** 2), f"{method}: {m:.3f} ± {se:.3f} vs base {base:.3f}"
