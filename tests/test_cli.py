"""`ivg generate` end to end on tiny models saved to disk."""
import json
import subprocess
import sys

import pytest

from ivg.cli import main

from .decoder_fixtures import save_model_dirs


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_model_dirs(tmp_path_factory.mktemp("models"))


def _args(d, out, *extra):
    return ["generate", "--base", d["base"], "--tuned", d["tuned"], "--ref", d["ref"], "--beta", "1.5",
            "--token-rm", d["rm"], "--dtype", "float64", "-W", "2", "-K", "2", "-L", "3", "--max-new-tokens", "8",
            "--temperature", "1.0", "--seed", "3", "--out", str(out), *extra]


def test_generate_writes_one_json_line_per_prompt(model_dirs, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the movie was"}\n{"prompt": "a"}\n')
    out = tmp_path / "out.jsonl"
    assert main(_args(model_dirs, out, "--mode", "ivg", "--prompts", str(prompts), "--num-return", "2")) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the movie was", "a"]
    for r in rows:
        assert set(r) >= {"prompt", "text", "tokens", "score", "implicit_value", "explicit_value", "beams"}
        assert len(r["beams"]) == 2 and r["beams"][0]["tokens"] == r["tokens"]
        assert r["beams"][0]["score"] >= r["beams"][1]["score"]
    err = capsys.readouterr().err
    assert "2 prompts" in err and "tokens/s" in err

    naive = tmp_path / "naive.jsonl"
    assert main(_args(model_dirs, naive, "--mode", "ivg", "--prompts", str(prompts), "--num-return", "2",
                      "--decoder", "naive")) == 0
    assert [json.loads(x)["tokens"] for x in naive.read_text().splitlines()] == [r["tokens"] for r in rows]


def test_python_m_ivg_is_the_same_entry_point(model_dirs, tmp_path):
    out = tmp_path / "out.jsonl"
    txt = tmp_path / "p.txt"
    txt.write_text("hello there\n")
    res = subprocess.run([sys.executable, "-m", "ivg", *_args(model_dirs, out, "--mode", "bon", "-N", "3",
                                                               "--prompts", str(txt))],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())
    assert row["prompt"] == "hello there" and "beams" not in row


def test_bad_flags_give_one_clear_line(model_dirs, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--base", model_dirs["base"], "--tuned", model_dirs["tuned"], "--prompt", "a",
                 "--out", str(out)]) == 2
    assert "expected pairs" in capsys.readouterr().err
    assert main(_args(model_dirs, out, "--mode", "cbs", "-W", "0", "--prompt", "a")) == 2
    assert "width=0" in capsys.readouterr().err
    assert main(_args(model_dirs, out, "--mode", "cbs")) == 2
    assert "no prompts" in capsys.readouterr().err


def test_python_api_rejects_unknown_decoder_and_dtype(model_dirs):
    from ivg.api import generate

    with pytest.raises(ValueError, match="decoder='fast'"):
        generate(["a"], base=model_dirs["base"], decoder="fast", max_new_tokens=2)
    with pytest.raises(ValueError, match="dtype='float8'"):
        generate(["a"], base=model_dirs["base"], dtype="float8", max_new_tokens=2)
    with pytest.raises(ValueError, match="beta: expected one beta per guide pair"):
        generate(["a"], base=model_dirs["base"], tuned=[model_dirs["tuned"]] * 2, ref=[model_dirs["ref"]] * 2,
                 beta=[1.0, 2.0, 3.0], max_new_tokens=2)


def test_info_reports_backends_and_the_cuda_build(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "guided_sample backend for" in out
    assert "CUDA kernels (csrc/)" in out and "measured shape ranges" in out
