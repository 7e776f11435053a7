"""Data-parallel `ivg generate` under torchrun (gloo, 2 CPU processes) and resuming a killed run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ivg.distributed import read_done, run_id, shard_by_length

from .test_cli import model_dirs  # noqa: F401  (fixture)

PROMPTS = ["the movie was", "a", "it is a truly wonderful day, and", "bad", "what a film", "i think",
           "the end", "so so so", "never again", "a b c d e f g"]


def _cmd(d, out, prompts, nproc, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return launcher + ["-m", "ivg", "generate", "--base", d["base"], "--tuned", d["tuned"], "--ref", d["ref"],
                       "--beta", "1.5", "--token-rm", d["rm"], "--dtype", "float64", "--mode", "ivg", "-W", "2",
                       "-K", "2", "-L", "3", "--temperature", "1.0", "--seed", "5", "--prompts", str(prompts),
                       "--out", str(out), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def test_shards_partition_and_balance():
    lengths = [50, 3, 40, 7, 7, 30, 2, 60, 1, 10]
    shards = shard_by_length(lengths, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    assert all(s == sorted(s) for s in shards)
    loads = [sum(lengths[i] + 1 for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths) + 1
    assert shard_by_length(lengths, 3) == shards
    assert shard_by_length([], 2) == [[], []]
    with pytest.raises(ValueError, match="num_shards"):
        shard_by_length(lengths, 0)


def test_read_done_skips_a_torn_line_and_refuses_foreign_files(tmp_path):
    run = run_id({"seed": 1})
    f = tmp_path / "o.jsonl"
    f.write_text(json.dumps(dict(index=1, run=run, prompt="b", text="x")) + "\n" + '{"index": 0, "run": "')
    assert list(read_done(f, ["a", "b"], run)) == [1]
    f.write_text(json.dumps(dict(index=0, run=run, prompt="zzz", text="x")) + "\n")
    with pytest.raises(ValueError, match="line 1 holds another prompt"):
        read_done(f, ["a", "b"], run)
    f.write_text(json.dumps(dict(index=0, run="other", prompt="a", text="x")) + "\n")
    with pytest.raises(ValueError, match="other models or options"):
        read_done(f, ["a", "b"], run)
    f.write_text(json.dumps(dict(prompt="a", text="x")) + "\n")
    with pytest.raises(ValueError, match="no valid \"index\""):
        read_done(f, ["a", "b"], run)


def test_two_gloo_ranks_write_what_one_process_writes(model_dirs, tmp_path, prompt_file):  # noqa: F811
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    for out, n in ((one, 1), (two, 2)):
        r = subprocess.run(_cmd(model_dirs, out, prompt_file, n, "--max-new-tokens", "8", "--save-every", "2"),
                           env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert one.read_text() == two.read_text()
    rows = _rows(two)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["tokens"] for r in rows)


def test_a_killed_run_resumes_without_duplicates_or_losses(model_dirs, tmp_path):  # noqa: F811
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    # 40 prompts, 20 rounds of about 60 ms after the first lines: time enough to stop the run part-way on a
    # loaded machine (with 10 prompts it could finish between the poll and the kill)
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    args = ("--max-new-tokens", "24", "--save-every", "1")
    r = subprocess.run(_cmd(model_dirs, full, prompt_file, 1, *args), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(_cmd(model_dirs, part, prompt_file, 2, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(part.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; give it more work"
    subprocess.run(["pkill", "-STOP", "-f", str(part)], check=False)  # freeze the writers first
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher; torchrun starts each worker in a session of its own:
    subprocess.run(["pkill", "-KILL", "-f", str(part)], check=False)  # every process writing this file
    proc.wait()
    time.sleep(0.5)
    saved = len(part.read_text().splitlines())
    assert 2 <= saved < len(prompts)
    r = subprocess.run(_cmd(model_dirs, part, prompt_file, 2, *args), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    assert part.read_text() == full.read_text()


def test_every_rank_stops_when_rank_0_refuses_the_output_file(model_dirs, tmp_path, prompt_file):  # noqa: F811
    out = tmp_path / "foreign.jsonl"
    out.write_text(json.dumps(dict(index=0, run="someone-else", prompt=PROMPTS[0], text="x")) + "\n")
    r = subprocess.run(_cmd(model_dirs, out, prompt_file, 2, "--max-new-tokens", "4"), env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert "other models or options" in r.stderr
    assert out.read_text().count("\n") == 1, "the refused file is left as it was"


def test_a_prompt_that_fails_on_one_rank_stops_every_rank(model_dirs, tmp_path):  # noqa: F811
    """A prompt too long for the models, in one rank's shard: that rank's decoder refused it and the other rank
    waited in the round's gather for ever (the run hung until a timeout). Every rank now stops before decoding
    (each checks its share first), naming the prompt by its index in the input and the rank that failed; one
    process names it the same way, with rounds smaller than the input, and writes nothing."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:9] + ["x" * 90]) + "\n")  # 90 tokens + 8 new > the models' 96 positions
    out = tmp_path / "o.jsonl"
    start = time.perf_counter()
    r = subprocess.run(_cmd(model_dirs, out, prompts, 2, "--max-new-tokens", "8"), env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode != 0 and time.perf_counter() - start < 200
    assert "prompts[9]: 90 tokens + max_new_tokens 8 exceed base's 96 positions" in r.stderr
    assert "failed: prompts[9]" in r.stderr, "the other rank says which rank failed"
    alone = subprocess.run([sys.executable, "-m", "ivg"] + _cmd(model_dirs, out, prompts, 1, "--max-new-tokens", "8",
                                                                  "--save-every", "4")[7:], env=_env(),
                           capture_output=True, text=True, timeout=240)
    assert alone.returncode == 2
    assert "error: prompts[9]: 90 tokens" in alone.stderr, alone.stderr[-500:]
    assert not out.exists() or out.read_text() == "", "checked before the first round: nothing decoded"


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A Llama base (4 heads, 2 KV heads: one per rank under 2-way tensor parallelism) and gpt2 guides."""
    from .decoder_fixtures import save_model_dirs

    return save_model_dirs(tmp_path_factory.mktemp("tp_models"), "llama")


def _tensor_parallel_transformers():
    """Skip where the installed transformers is older than the tensor parallelism this decoder is tested with
    (``test_tensor_parallel_needs_a_recent_transformers`` checks the refusal there)."""
    from ivg.models import check_tensor_parallel_transformers

    pytest.importorskip("accelerate")  # transformers' tensor parallelism needs it
    try:
        check_tensor_parallel_transformers()
    except ValueError as e:
        pytest.skip(str(e))


def test_tensor_parallel_needs_a_recent_transformers(monkeypatch, llama_dirs):
    """Under transformers 5.17 to 5.22 the tensor-parallel runs below failed (a vocabulary of 33 refused for 2
    ranks, GPT-2 sharded without a plan); such versions are refused by name before anything loads."""
    import transformers

    from ivg.models import check_tensor_parallel_transformers, load_causal_lm

    for old in ("5.0.0", "5.17.0", "5.22.2"):
        with pytest.raises(ValueError, match=rf"tensor parallelism needs transformers >= 5\.23 \(installed: {old}\)"):
            check_tensor_parallel_transformers(old)
    for new in ("5.23.0", "5.25.0", "5.30.0.dev0", "6.0.0"):
        check_tensor_parallel_transformers(new)
    monkeypatch.setattr(transformers, "__version__", "5.20.2")
    with pytest.raises(ValueError, match=r"tp_plan: tensor parallelism needs transformers >= 5\.23"):
        load_causal_lm(llama_dirs["base"], tp_plan="auto")


def test_tensor_parallel_base_writes_what_one_process_writes(llama_dirs, tmp_path, prompt_file):
    _tensor_parallel_transformers()
    one, tp = tmp_path / "one.jsonl", tmp_path / "tp.jsonl"
    for out, n, extra in ((one, 1, ()), (tp, 2, ("--tensor-parallel",))):
        r = subprocess.run(_cmd(llama_dirs, out, prompt_file, n, "--max-new-tokens", "8", *extra), env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "tensor parallel" in r.stderr
    assert [json.loads(x)["tokens"] for x in tp.read_text().splitlines()] == \
        [json.loads(x)["tokens"] for x in one.read_text().splitlines()]
    assert tp.read_text() == one.read_text()


def test_tensor_parallel_refuses_a_base_without_a_plan(model_dirs, tmp_path, prompt_file):  # noqa: F811
    _tensor_parallel_transformers()
    r = subprocess.run(_cmd(model_dirs, tmp_path / "o.jsonl", prompt_file, 2, "--max-new-tokens", "4",
                            "--tensor-parallel"), env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert "GPT2LMHeadModel" in r.stderr and "tp_plan" in r.stderr


@pytest.mark.filterwarnings("ignore::ivg.decoder.RepeatedPromptsWarning")  # (one prompt in several forms)
def test_prompts_of_every_kind_the_decoder_takes_and_other_kinds_named(model_dirs, tmp_path):  # noqa: F811
    """In one process (outside torchrun): a tensor or array of token ids failed to be written ("Object of type Tensor
    is not JSON serializable"), a string alone was split into one prompt per character, and a number or a
    non-path ``out`` failed with Python's own errors; token ids of every kind are written as lists now, the same line
    as a list gives, and the rest is named."""
    import numpy as np
    import torch

    from ivg.distributed import generate_sharded

    kw = dict(base=model_dirs["base"], max_new_tokens=2, progress=False, seed=3)
    lines, _ = generate_sharded(["the", [5, 6, 7], torch.tensor([5, 6, 7]), np.array([5, 6, 7])], **kw)
    rows = [json.loads(x) for x in lines]
    assert [r["prompt"] for r in rows] == ["the", [5, 6, 7], [5, 6, 7], [5, 6, 7]]
    assert rows[1]["tokens"] == rows[2]["tokens"] == rows[3]["tokens"]
    for prompts, match in [("the movie", "prompts: expected a list of strings or token id lists, got str"),
                           (3, "got int"), (["a", 1.5], r"prompts\[1\]: expected a string or a list of token ids"),
                           ([torch.tensor([[1, 2]])], r"prompts\[0\]: expected a 1-D integer tensor")]:
        with pytest.raises(ValueError, match=match):
            generate_sharded(prompts, **kw)
    with pytest.raises(ValueError, match="out=1.5: expected a file path or None"):
        generate_sharded(["the"], out=1.5, **kw)
    assert not list(tmp_path.iterdir())


def test_run_id_names_callables_by_import_path():
    def make():
        def scorer(prompts, responses):
            return [0.0] * len(prompts)

        return scorer

    first, second = make(), make()  # two objects at two addresses, one import path: as in two processes
    assert first is not second
    assert run_id({"scorer": first, "seed": 1}) == run_id({"scorer": second, "seed": 1})
    assert run_id({"scorer": first, "seed": 1}) != run_id({"scorer": first, "seed": 2})
