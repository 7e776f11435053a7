"""The random-weight model sets the GPU benchmarks build (benchmarks/random_models.py), on the CPU."""
import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import random_models  # noqa: E402


def test_a_random_set_loads_decodes_and_round_trips_its_tokens(tmp_path):
    from transformers import AutoTokenizer

    from ivg.api import load_models

    paths = random_models.build(tmp_path, "tiny-random", "float32")
    again = random_models.build(tmp_path, "tiny-random", "float32")  # saved once, then reused
    assert paths == again and paths["ours"]["base"] == paths["published"]["base"]
    vocab = random_models.RANDOM_MODELS["tiny-random"]["vocab"]
    tok = AutoTokenizer.from_pretrained(paths["ours"]["base"])
    ids = [5, 17, vocab - 1, 3]
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids  # the published wrappers need this
    prompts = random_models.prompts(6, "tiny-random", 1)
    assert all(8 <= len(p.split()) <= 24 and "w0" not in p.split() for p in prompts)
    ours = paths["ours"]
    models = load_models(ours["base"], tuned=[ours["tuned"]], ref=[ours["ref"]], token_rm=ours["rm"])
    assert models.base.config.n_layer == random_models.RANDOM_MODELS["tiny-random"]["base"][0]
    assert models.token_rm.score_head.bias is None  # the published token RM has none
    state = torch.load(f"{paths['published']['rm']}/pytorch_model.bin")
    assert set(state) == {f"transformer.{k}" for k in models.token_rm.body.state_dict()} | {"score_head.weight"}
    assert torch.equal(state["score_head.weight"], models.token_rm.score_head.weight)


def test_the_loop_host_benchmark_times_one_read_per_chunk_boundary(capsys):
    """benchmarks/bench_loop_host.py on two prompts (32 rows): 32 tokens in chunks of 5 are 7 host reads
    (t = 5, 10, ..., 30, then the length limit at 32), each ranked and pruned, and 6 forks; the 6 reads
    before a fork are each followed by a forward (the read at the length limit launches none)."""
    import re

    from benchmarks import bench_loop_host
    from ivg.decode_loop import DecodeLoop
    from ivg.paged_model import PagedModel

    names = bench_loop_host.UNITS + ("release",)
    before = {name: DecodeLoop.__dict__[name] for name in names}
    call = PagedModel.__dict__["__call__"]
    assert bench_loop_host.main(["--prompts", "2", "--runs", "1"]) == 0
    assert {name: DecodeLoop.__dict__[name] for name in names} == before, "the loop stays wrapped"
    assert PagedModel.__dict__["__call__"] is call, "the forwards stay wrapped"
    out = capsys.readouterr().out
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S.*?)\s+(\d+) calls ", out, flags=re.M)}
    assert calls == {"read": 7, "prune": 7, "fork": 6, "score_rm_before_read": 7, "sample": 32,
                     "read to launch": 6}, out


def test_the_loop_host_benchmark_runs_prompts_that_end_at_other_steps(capsys):
    """``--batch-prompts`` and ``--eos``: more prompts than rows, with EOS ids; the header reports the host
    reads per step."""
    import re

    from benchmarks import bench_loop_host

    assert bench_loop_host.main(["--prompts", "3", "--batch-prompts", "1", "--eos", "6", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    head = re.search(r": 3 prompts, 16 rows, (\d+) steps, (\d+) reads \((\d+) host reads in all, ([\d.]+) per step\)", out)
    assert head, out
    steps, reads, host_reads, per_step = int(head[1]), int(head[2]), int(head[3]), float(head[4])
    assert steps >= 3 and reads >= 3 and host_reads >= reads  # three prompts, one at a time, each read at least once
    assert abs(per_step - host_reads / steps) < 0.01
