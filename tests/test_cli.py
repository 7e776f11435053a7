"""`ivg generate` end to end on tiny models saved to disk."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    # the summary tells the tokens of the responses written from those every candidate drew (W*K=4 rows a step)
    held = sum(len(r["tokens"]) for r in rows)
    assert f"the 2 best responses hold {held} tokens" in err, err
    drawn = int(err.split(" tokens drawn by all candidates")[0].split()[-1])
    assert drawn > held, err

    naive = tmp_path / "naive.jsonl"
    assert main(_args(model_dirs, naive, "--mode", "ivg", "--prompts", str(prompts), "--num-return", "2",
                      "--decoder", "naive")) == 0
    assert [json.loads(x)["tokens"] for x in naive.read_text().splitlines()] == [r["tokens"] for r in rows]


def test_out_dash_is_standard_output(model_dirs, tmp_path, capsys, monkeypatch):
    """``--out -`` wrote a file called "-" in the working folder; it is standard output, as with no ``--out``."""
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--base", model_dirs["base"], "--prompt", "the", "--max-new-tokens", "2", "--out", "-"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == "the"
    assert not (tmp_path / "-").exists()


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


def test_a_prompts_file_is_utf8_whatever_the_locale_without_its_byte_order_mark(model_dirs, tmp_path, capsys):
    """Read in the locale's encoding, a UTF-8 file with a byte-order mark (as some editors write) gave
    its first prompt a leading U+FEFF; a file in another encoding now gets one line naming it."""
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffcafé au lait\r\nthe end\r\n".encode("utf-8"))
    out = tmp_path / "o.jsonl"
    assert main(_args(model_dirs, out, "--mode", "eft", "--prompts", str(prompts))) == 0
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["café au lait", "the end"]
    prompts.write_bytes("café\n".encode("latin-1"))
    assert main(_args(model_dirs, out, "--mode", "eft", "--prompts", str(prompts), "--overwrite")) == 2
    assert f"--prompts {prompts}: not UTF-8 text (byte 3: invalid continuation byte)" in capsys.readouterr().err


def test_a_base_saved_without_a_tokenizer_is_named(model_dirs, tmp_path, capsys):
    """transformers builds a tokenizer with no ordinary token for a folder that holds only the model, which
    made every text prompt "empty (after the base template)"; token id prompts need no tokenizer."""
    from transformers import AutoModelForCausalLM

    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(model_dirs["base"]).save_pretrained(bare)
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--base", str(bare), "--prompt", "abc", "--max-new-tokens", "3", "--out", str(out)]) == 2
    assert "prompts: text prompts need a tokenizer, and the base model came without one" in capsys.readouterr().err
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"prompt": [3, 4, 5]}\n')
    assert main(["generate", "--base", str(bare), "--prompts", str(ids), "--max-new-tokens", "3", "--out", str(out),
                 "--overwrite"]) == 0
    assert len(json.loads(out.read_text())["tokens"]) == 3


def test_a_run_resumes_with_other_speed_settings_and_refuses_other_options(model_dirs, tmp_path, capsys):
    """Prompts decoded together, the host's reads and the step graphs change the speed, not the output: a
    killed run resumes with other values (fewer prompts at once after running out of memory); a run with
    another seed is refused. Both had been refused before."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {c}\n" for c in "abcdef"))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    base = ["--mode", "ivg", "--prompts", str(prompts), "--max-new-tokens", "6"]
    assert main(_args(model_dirs, full, *base, "--batch-prompts", "4")) == 0
    part.write_text("".join(full.read_text().splitlines(keepends=True)[:2]))  # a run killed after two prompts
    capsys.readouterr()
    assert main(_args(model_dirs, part, *base, "--batch-prompts", "1", "--read-every", "3", "--no-step-graphs",
                      "--backend", "reference")) == 0
    assert "resuming, 2 of 6 prompts already in" in capsys.readouterr().err
    assert part.read_text() == full.read_text()
    assert main(_args(model_dirs, part, *base, "--seed", "4")) == 2
    assert "was written with other models or options" in capsys.readouterr().err


def test_out_may_not_be_the_prompts_file(model_dirs, tmp_path, capsys):
    """The results would have replaced the prompts (with --overwrite, or at the end of a run over a file of
    other lines)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the movie was"}\n')
    assert main(_args(model_dirs, f"{tmp_path}/./p.jsonl", "--prompts", str(prompts), "--overwrite")) == 2
    assert f"--out {tmp_path}/./p.jsonl: the --prompts file itself" in capsys.readouterr().err
    assert prompts.read_text() == '{"prompt": "the movie was"}\n'


def test_model_paths_may_start_at_the_home_folder(model_dirs, tmp_path, monkeypatch, capsys):
    """``~/models/base`` (quoted on a command line, or from Python): "no such directory" before."""
    import shutil

    from ivg.api import generate

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(model_dirs["base"], tmp_path / "models" / "base")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--base", "~/models/base", "--prompt", "abc", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(json.loads(out.read_text())["tokens"]) == 3
    assert len(generate(["abc"], base="~/models/base", max_new_tokens=3)[0].beams[0].tokens) == 3
    (tmp_path / "p.txt").write_text("abc\n")  # the prompts and the results too
    assert main(["generate", "--base", "~/models/base", "--prompts", "~/p.txt", "--max-new-tokens", "3",
                 "--out", "~/o2.jsonl"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o2.jsonl").read_text())["prompt"] == "abc"


def test_bad_flags_give_one_clear_line(model_dirs, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--base", model_dirs["base"], "--tuned", model_dirs["tuned"], "--prompt", "a",
                 "--out", str(out)]) == 2
    assert "expected pairs" in capsys.readouterr().err
    assert main(_args(model_dirs, out, "--mode", "cbs", "-W", "0", "--prompt", "a")) == 2
    assert "--width 0: expected an int >= 1" in capsys.readouterr().err
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


def test_python_api_names_a_misspelt_argument_before_loading_any_model(model_dirs, monkeypatch):
    """A typo (a TypeError from DecodeOptions after every model had loaded) and an option the mode refuses
    fail before the first load."""
    import ivg.api as api

    monkeypatch.setattr(api, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"widht: not an argument of generate\(\); did you mean width\?"):
        api.generate(["a"], base=model_dirs["base"], mode="ivg", widht=3)
    with pytest.raises(ValueError, match=r"devcie: not an argument of generate\(\); did you mean device\?"):
        api.generate(["a"], base=model_dirs["base"], devcie="cpu")
    with pytest.raises(ValueError, match=r"width=0: expected an int >= 1"):
        api.generate(["a"], base=model_dirs["base"], mode="cbs", token_rm=model_dirs["rm"], width=0)
    with pytest.raises(ValueError, match=r"mode='eft': needs at least one \(tuned, ref\) guide pair"):
        api.generate(["a"], base=model_dirs["base"], mode="eft")
    # a decoder's sampler and attention have no CUDA kernel: "cuda" failed at the first draw, mid-run
    with pytest.raises(ValueError, match=r"backend='cuda': a decoder's sampler and attention have no CUDA kernel"):
        api.generate(["a"], base=model_dirs["base"], backend="cuda")
    with pytest.raises(ValueError, match=r"backend='fast': expected 'auto', 'reference' or 'triton'"):
        api.generate(["a"], base=model_dirs["base"], backend="fast", decoder="naive")


def test_python_api_takes_a_tokenizer_by_path(model_dirs, tmp_path):
    """tokenizer= took only a loaded tokenizer: a path (as the models take) failed at the first prompt with
    "'str' object is not callable"."""
    from ivg.api import generate

    by_path = generate(["abc"], base=model_dirs["base"], tokenizer=model_dirs["base"], max_new_tokens=4, seed=2)
    default = generate(["abc"], base=model_dirs["base"], max_new_tokens=4, seed=2)
    assert by_path[0].beams[0].tokens == default[0].beams[0].tokens and by_path[0].beams[0].text
    with pytest.raises(ValueError, match=r"tokenizer='.*empty': no tokenizer there"):
        (tmp_path / "empty").mkdir()
        generate(["abc"], base=model_dirs["base"], tokenizer=str(tmp_path / "empty"), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"tokenizer: expected a path, a hub id or a loaded tokenizer, got int"):
        generate(["abc"], base=model_dirs["base"], tokenizer=5, max_new_tokens=4)


def test_beta_may_be_one_number_or_an_array(model_dirs):
    """A NumPy or torch array of betas raised "the truth value of an array is ambiguous", one number "not
    iterable"."""
    import numpy as np

    from ivg.api import load_models

    pairs = dict(tuned=[model_dirs["tuned"]] * 2, ref=[model_dirs["ref"]] * 2)
    for beta, expect in ((np.array([1.0, 2.0]), [1.0, 2.0]), (torch.tensor([0.5, 2.0]), [0.5, 2.0]),
                         (np.float64(1.5), [1.5, 1.5]), (3.0, [3.0, 3.0]), ((), [1.0, 1.0])):
        assert [g.beta for g in load_models(model_dirs["base"], beta=beta, **pairs).guides] == expect


def test_one_guide_pair_may_be_given_without_lists_and_other_kinds_are_named(model_dirs):
    """``tuned="path"`` was read as its characters (one model each: "expected pairs, got 14 tuned and 12 ref"); one
    path or loaded model is now a list of one. A number as a path was passed to ``os.stat`` (an int as a file
    descriptor: ``base=0`` read standard input's status), a dtype as beta, a list as dtype and a string as templates
    failed with Python's own errors; each is named."""
    from ivg.api import load_models

    one = load_models(model_dirs["base"], tuned=model_dirs["tuned"], ref=Path(model_dirs["ref"]), beta=0.5)
    listed = load_models(model_dirs["base"], tuned=[model_dirs["tuned"]], ref=[model_dirs["ref"]], beta=[0.5])
    assert len(one.guides) == 1 and one.guides[0].beta == 0.5
    assert all(torch.equal(a, b) for a, b in zip(one.guides[0].ref.state_dict().values(),
                                                 listed.guides[0].ref.state_dict().values()))
    base = model_dirs["base"]
    for kw, match in [(dict(base=1.5), "base=1.5: expected a model folder, a hub id or a loaded model, got float"),
                      (dict(base=0), "base=0: expected a model folder"),
                      (dict(base=base, token_rm=2 ** 70), "token_rm=.*: expected a model folder"),
                      (dict(base=base, tuned=None, ref=[model_dirs["ref"]]), "tuned=None: expected a list of model"),
                      (dict(base=base, tuned=[model_dirs["tuned"]], ref=[model_dirs["ref"]], beta=torch.int64),
                       "beta=torch.int64: expected a number or one per guide pair"),
                      (dict(base=base, dtype=["float32"]), r"dtype=\['float32'\]: expected one of"),
                      (dict(base=base, templates="{prompt}"), "templates='{prompt}': expected a mapping of roles")]:
        with pytest.raises(ValueError, match=match):
            load_models(**kw)


def test_decoders_refuse_a_backend_their_ops_lack_when_made():
    from ivg.decoder import IVGDecoder
    from ivg.naive import NaiveDecoder

    from .decoder_fixtures import ivg_models

    models = ivg_models()
    for make in (IVGDecoder, NaiveDecoder):
        with pytest.raises(ValueError, match=r"backend='cuda': a decoder's sampler and attention have no CUDA kernel"):
            make(models, backend="cuda")
        with pytest.raises(ValueError, match=r"backend=None: expected 'auto', 'reference' or 'triton'"):
            make(models, backend=None)


def test_info_reports_backends_and_the_cuda_build(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "guided_sample backend for" in out
    assert "CUDA kernels (csrc/)" in out and "'auto' picks" in out


def test_info_names_the_releases_a_bug_report_needs(monkeypatch, capsys):
    """Python's and Triton's and transformers' releases (``ivg info`` named only torch's), read from the installed
    packages' metadata, and whether tensor parallelism is available with that transformers."""
    import platform
    from importlib import metadata

    from ivg.cli import _versions

    assert main(["info"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith(f"python {platform.python_version()}  triton {metadata.version('triton')}  "
                           f"transformers {metadata.version('transformers')}  (tensor parallelism: ")
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: "5.20.2" if n == "transformers" else real(n))
    assert _versions().endswith("transformers 5.20.2  (tensor parallelism: needs transformers >= 5.23)")

    def missing(n):
        raise metadata.PackageNotFoundError(n)

    monkeypatch.setattr(metadata, "version", missing)
    assert _versions().endswith("triton not installed  transformers not installed  (tensor parallelism: no "
                                "transformers)")


def test_a_reader_that_closes_early_gets_no_traceback():
    """``ivg info | head -1`` (or ``ivg generate ... | head``) printed a BrokenPipeError traceback; now the command
    stops quietly with status 1."""
    proc = subprocess.Popen([sys.executable, "-m", "ivg", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has imported torch, so its first line meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_info_says_where_auto_picks_the_cuda_kernels():
    from ivg.cli import _cuda_picks

    assert _cuda_picks({"copy_blocks": []}).startswith("'auto' picks none of them")
    assert _cuda_picks({"copy_blocks": [(1, 8, 1, 64)], "other": []}) == \
        "'auto' picks them in 1 measured shape range (copy_blocks)"
    assert "in 3 measured shape ranges (a, b)" in _cuda_picks({"a": [(1, 1, 1, 1)] * 2, "b": [(2, 2, 2, 2)]})


def _tokens(path):
    return [json.loads(x)["tokens"] for x in path.read_text().splitlines()]


def _plain(d, out, *extra):
    return ["generate", "--base", d["base"], "--dtype", "float64", "--mode", "plain", "--seed", "5", "--out",
            str(out), *extra]


def test_ignore_eos_runs_every_response_to_max_new_tokens(model_dirs, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {c}" for c in "abcdefghijkl") + "\n")
    args = ["--prompts", str(prompts), "--temperature", "3.0", "--max-new-tokens", "40"]
    stops, runs = tmp_path / "eos.jsonl", tmp_path / "no-eos.jsonl"
    assert main(_plain(model_dirs, stops, *args)) == 0
    assert any(len(t) < 40 for t in _tokens(stops)), "precondition: some response ends at EOS by default"
    assert main(_plain(model_dirs, runs, *args, "--ignore-eos")) == 0
    assert all(len(t) == 40 for t in _tokens(runs))
    assert any(1 in t for t in _tokens(runs)), "EOS (id 1) drawn and decoded past"


def test_template_per_role_reaches_both_decoders(model_dirs, tmp_path):
    from ivg.api import generate

    common = ["--tuned", model_dirs["tuned"], "--ref", model_dirs["ref"], "--prompt", "the plot", "--temperature",
              "1", "--max-new-tokens", "8"]
    plain, templated, naive = (tmp_path / f"{n}.jsonl" for n in ("plain", "templated", "naive"))
    assert main(_plain(model_dirs, plain, *common, "--mode", "eft")) == 0
    assert main(_plain(model_dirs, templated, *common, "--mode", "eft", "--template", "base=so, {prompt}")) == 0
    assert main(_plain(model_dirs, naive, *common, "--mode", "eft", "--template", "base=so, {prompt}",
                       "--decoder", "naive")) == 0
    assert _tokens(templated) != _tokens(plain), "precondition: the base's template changes the tokens"
    assert _tokens(naive) == _tokens(templated)
    api = generate(["the plot"], base=model_dirs["base"], tuned=[model_dirs["tuned"]], ref=[model_dirs["ref"]],
                   dtype="float64", mode="eft", temperature=1.0, max_new_tokens=8, seed=5,
                   templates={"base": "so, {prompt}"})
    assert [api[0].beams[0].tokens] == _tokens(templated)


def test_chat_template_wraps_each_models_prompt(model_dirs, tmp_path, capsys):
    from transformers import AutoTokenizer

    from ivg.api import generate

    out = tmp_path / "o.jsonl"
    assert main(_plain(model_dirs, out, "--prompt", "a", "--chat-template")) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "prompt/s" not in err  # found when the models load, before decoding
    chat = tmp_path / "chat-base"
    import shutil

    shutil.copytree(model_dirs["base"], chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = "{% for m in messages %}({{ m['content'] }}){% endfor %}{% if add_generation_prompt %}!{% endif %}"
    tok.save_pretrained(chat)
    d = dict(model_dirs, base=str(chat))
    assert main(_plain(d, out, "--prompt", "so", "--chat-template", "--temperature", "0", "--max-new-tokens", "6")) == 0
    expect = generate(["so"], base=model_dirs["base"], dtype="float64", temperature=0.0, max_new_tokens=6, seed=5,
                      templates={"base": "({prompt})!"})  # "(" and ")" are unknown characters: <unk> ids
    assert _tokens(out) == [expect[0].beams[0].tokens]


def test_min_p_and_batch_prompts_reach_the_decoder(model_dirs, tmp_path, capsys):
    from ivg.api import generate, make_decoder

    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(_plain(model_dirs, a, "--prompts", str(prompts), "--min-p", "0.3", "--max-new-tokens", "6")) == 0
    assert main(_plain(model_dirs, b, "--prompts", str(prompts), "--min-p", "0.3", "--max-new-tokens", "6",
                       "--batch-prompts", "1")) == 0
    assert _tokens(a) == _tokens(b)
    c = tmp_path / "c.jsonl"  # the host reads every 4th step: the same tokens
    assert main(_plain(model_dirs, c, "--prompts", str(prompts), "--min-p", "0.3", "--max-new-tokens", "6",
                       "--read-every", "4")) == 0
    assert _tokens(c) == _tokens(a)
    assert main(_plain(model_dirs, c, "--prompts", str(prompts), "--batch-prompts", "0")) == 2
    assert "--batch-prompts 0: expected an int >= 1" in capsys.readouterr().err
    assert main(_plain(model_dirs, c, "--prompt", "a", "--read-every", "0")) == 2
    assert "--read-every 0: expected an int >= 1" in capsys.readouterr().err
    assert make_decoder(base=model_dirs["base"], read_every=4)[0].read_every == 4
    d = tmp_path / "d.jsonl"  # per-model steps: the same tokens (off CUDA nothing replays either way)
    assert main(_plain(model_dirs, d, "--prompts", str(prompts), "--min-p", "0.3", "--max-new-tokens", "6",
                       "--no-step-graphs")) == 0
    assert _tokens(d) == _tokens(a)
    assert make_decoder(base=model_dirs["base"], step_graphs=False)[0].step_graphs is False
    assert make_decoder(base=model_dirs["base"])[0].step_graphs is True
    api = generate(["one", "two", "three"], base=model_dirs["base"], dtype="float64", min_p=0.3, max_new_tokens=6,
                   seed=5)
    assert _tokens(a) == [r.beams[0].tokens for r in api]
    other = generate(["one", "two", "three"], base=model_dirs["base"], dtype="float64", max_new_tokens=6, seed=5)
    assert _tokens(a) != [r.beams[0].tokens for r in other], "precondition: min-p changes the draws"


def test_a_missing_model_path_is_one_line_naming_the_flag(model_dirs, tmp_path, capsys):
    from ivg.api import generate

    assert main(["generate", "--base", "/nonexistent/model", "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("ivg generate: error: --base /nonexistent/model: no such directory; expected a local "
                           "model folder or a hub id")
    assert main(["generate", "--base", model_dirs["base"], "--token-rm", "./no/such/rm", "--prompt", "a"]) == 2
    assert "--token-rm ./no/such/rm: no such directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"tuned\[0\]='/nope'"):
        generate(["a"], base=model_dirs["base"], tuned=["/nope"], ref=[model_dirs["ref"]], max_new_tokens=2)
    assert main(_plain(model_dirs, tmp_path / "o.jsonl", "--prompt", "a", "--template", "base=no prompt")) == 2
    assert "{prompt}" in capsys.readouterr().err


def test_speculate_reaches_the_decoder(model_dirs, tmp_path, capsys):
    """--speculate N: greedy output equals plain decoding; sampled output equals the Python API's; a
    negative N is one line naming the flag."""
    plain, spec = tmp_path / "plain.jsonl", tmp_path / "spec.jsonl"
    common = ["--mode", "ivg", "--prompt", "good", "--prompt", "a"]
    assert main(_args(model_dirs, plain, *common, "--temperature", "0")) == 0
    assert main(_args(model_dirs, spec, *common, "--temperature", "0", "--speculate", "3")) == 0
    assert _tokens(plain) == _tokens(spec)
    by_ref = tmp_path / "by_ref.jsonl"  # the reference guide drafting: the same greedy tokens
    assert main(_args(model_dirs, by_ref, *common, "--temperature", "0", "--speculate", "3", "--draft", "ref")) == 0
    assert _tokens(plain) == _tokens(by_ref)
    sampled = tmp_path / "sampled.jsonl"
    assert main(_args(model_dirs, sampled, *common, "--speculate", "2")) == 0
    from ivg.api import generate

    api = generate(["good", "a"], base=model_dirs["base"], tuned=[model_dirs["tuned"]], ref=[model_dirs["ref"]],
                   beta=[1.5], token_rm=model_dirs["rm"], dtype="float64", mode="ivg", width=2, successors=2,
                   chunk_len=3, max_new_tokens=8, temperature=1.0, seed=3, speculate=2)
    assert _tokens(sampled) == [r.beams[0].tokens for r in api]
    capsys.readouterr()
    assert main(_args(model_dirs, tmp_path / "bad.jsonl", *common, "--speculate", "-1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--speculate -1: expected an int >= 0" in err[0], err


def test_bad_device_out_scorer_and_chunk_len_are_one_line_naming_the_flag(model_dirs, tmp_path, capsys):
    """Each of these failed with a traceback (torch's assertion, a FileNotFoundError after the decode, an
    ImportError, int()'s message) instead of a line naming the flag; each now fails before any model loads."""
    out = tmp_path / "o.jsonl"
    cases = [
        (["--device", "bogus"], "--device bogus: not a device"),
        # no CUDA here, or fewer than 100 devices: both name the flag
        (["--device", "cuda:99"], "--device cuda:99: "),
        (["-L", "2.5"], "--chunk-len '2.5': expected an int >= 1, or inf"),
        (["-L", "-3"], "--chunk-len '-3': expected an int >= 1, or inf"),
        (["--num-return", "9"], "--num-return 9: expected at most 2 for mode 'ivg'"),
        (["-W", "0"], "--width 0: expected an int >= 1"),
        (["--top-p", "2"], "--top-p 2.0: expected top_p in (0, 1]"),
        (["--scorer", "no_such_module_xyz:score"],
         "--scorer no_such_module_xyz:score: cannot import no_such_module_xyz"),
        (["--scorer", "json:no_such_function"], "--scorer json:no_such_function: json has no callable"),
    ]
    for extra, message in cases:
        assert main(_args(model_dirs, out, "--mode", "ivg", "--prompt", "a", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    args = _args(model_dirs, out, "--mode", "ivg", "--prompt", "a")
    args[args.index("--beta") + 1] = "nan"
    assert main(args) == 2
    assert "beta[0]=nan: expected a finite number" in capsys.readouterr().err
    for bad, message in [(tmp_path / "missing" / "o.jsonl", "no such directory"), (tmp_path, "a directory")]:
        assert main(_args(model_dirs, bad, "--mode", "plain", "--prompt", "a")) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # nothing decoded, nothing written
    assert main(["demo", "--device", "bogus"]) == 2
    assert "--device bogus: not a device" in capsys.readouterr().err


def test_python_api_names_a_bad_device_beta_and_token_rm_weight(model_dirs):
    from ivg.api import generate

    with pytest.raises(ValueError, match="device='bogus': not a device"):
        generate(["a"], base=model_dirs["base"], device="bogus", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"beta\[1\]=inf: expected a finite number"):
        generate(["a"], base=model_dirs["base"], tuned=[model_dirs["tuned"]] * 2, ref=[model_dirs["ref"]] * 2,
                 beta=[1.0, float("inf")], max_new_tokens=2)
    with pytest.raises(ValueError, match="token_rm_weight=nan"):
        generate(["a"], base=model_dirs["base"], token_rm=model_dirs["rm"], token_rm_weight=float("nan"),
                 mode="tokenrm", max_new_tokens=2)
    # numbers of other types (a one-element tensor, numpy) pass as before
    import numpy as np
    import torch

    out = generate(["a"], base=model_dirs["base"], tuned=[model_dirs["tuned"]], ref=[model_dirs["ref"]],
                   beta=[torch.tensor(0.5)], token_rm=model_dirs["rm"], token_rm_weight=np.float32(0.5),
                   mode="ivg", width=1, successors=2, max_new_tokens=2)
    assert len(out) == 1 and len(out[0].beams[0].tokens) >= 1


def test_every_option_says_what_it_does_and_its_default():
    """`ivg SUBCOMMAND --help` explains every option, and names the default of each that has one."""
    import argparse

    from ivg.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = f"ivg {command} {action.option_strings[-1] if action.option_strings else action.dest}"
            if not action.help:
                missing.append(f"{name}: no help")
            elif action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in action.help:
                missing.append(f"{name}: help does not name the default {action.default!r}")
    assert not missing, "\n".join(missing)


def test_a_bad_prompts_file_is_one_line_naming_the_file_and_line(model_dirs, tmp_path, capsys):
    """A line that is not JSON, not an object with a prompt, or whose prompt is neither text nor token ids:
    one line naming the file and its line number (blank lines counted), not json's message alone or a
    traceback. A prompt may be a list of token ids."""
    out = tmp_path / "o.jsonl"
    for text, message in [
        ('{"prompt": "a"}\n\nnot json\n', "line 3 is not JSON (Expecting value, column 1)"),
        ('{"prompt": "a"}\n"a"\n', 'line 2 has no "prompt" field'),
        ('\n{"prompt": 5}\n', """line 2's "prompt" is 5; expected a string or a list of token ids"""),
    ]:
        path = tmp_path / "p.jsonl"
        path.write_text(text)
        assert main(_args(model_dirs, out, "--mode", "plain", "--prompts", str(path))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--prompts {path}: {message}" in err[0], err
    path = tmp_path / "ids.jsonl"
    path.write_text('{"prompt": [3, 4, 5]}\n')
    assert main(_args(model_dirs, out, "--mode", "plain", "--prompts", str(path))) == 0
    from ivg.api import generate

    api = generate([[3, 4, 5]], base=model_dirs["base"], tuned=[model_dirs["tuned"]], ref=[model_dirs["ref"]],
                   beta=[1.5], token_rm=model_dirs["rm"], dtype="float64", mode="plain", max_new_tokens=8,
                   temperature=1.0, seed=3)
    assert _tokens(out) == [r.beams[0].tokens for r in api]


def test_a_score_head_of_the_wrong_width_is_one_line(model_dirs, tmp_path, capsys):
    """A token RM folder whose score head does not fit its body loaded, then failed at the first forward
    with a matrix-shape error; it is named when it loads now."""
    import shutil

    import torch
    from safetensors.torch import save_file

    rm = tmp_path / "rm"
    shutil.copytree(model_dirs["rm"], rm)
    save_file({"score_head.weight": torch.zeros(33, 5)}, str(rm / "score_head.safetensors"))
    args = _args(model_dirs, tmp_path / "o.jsonl", "--mode", "ivg", "--prompt", "a")
    args[args.index("--token-rm") + 1] = str(rm)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "score_head.weight [33, 5]; expected [vocab, 16] for the body's hidden size 16" in err[0]


def test_ivg_bench_offers_every_benchmark_script():
    """``ivg bench OP`` runs ``benchmarks/bench_OP.py``: every such script is offered, and only those."""
    from ivg.cli import BENCHMARKS

    scripts = {p.stem[len("bench_"):] for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py")}
    assert set(BENCHMARKS) == scripts
