"""``ivg.planned_steps.PlannedSteps``: a speculative round's draft forwards planned at once give, step by step, the
logits ``PagedModel.forward`` gives for the same tokens, bit for bit, look the same block tables up, and leave the
cache where one forward per step leaves it; speculative decoding gives the same output either way."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from ivg import planned_steps  # noqa: E402
from ivg.decoder import IVGDecoder  # noqa: E402
from ivg.options import DecodeOptions  # noqa: E402
from ivg.paged_model import PagedModel  # noqa: E402
from ivg.planned_steps import PlannedSteps  # noqa: E402

from .decoder_fixtures import ivg_models  # noqa: E402
from .helpers import DEVICE  # noqa: E402
from .test_decoder import _same  # noqa: E402
from .test_paged_models import BACKENDS, CONFIGS, V  # noqa: E402

COUNTS = [3, 1, 6, 2, 5]  # tokens each row reads in the round (the forks first): ragged, crossing blocks of 4


def _model(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[family]), attn_implementation="eager").eval().to(
        DEVICE)


def _rows(pm, gen):
    """Five sequences: a prompt forked into three (they share its blocks, the last one partly filled, so the
    round's first slot of each is a copy on write), and two more prompts."""
    a, b, c = pm.blocks.new_sequences(3)
    pm([a, b, c], [torch.randint(0, V, (n,), generator=gen).tolist() for n in (9, 6, 13)])
    kids = pm.blocks.fork(a, 3)
    pm.blocks.free(a)
    return [*kids, b, c]


# Every family through its lean forward (GPT-2, Llama, Mistral with a sliding window, Qwen2) and through transformers'
# (lean=False) with the reference attention, beam groups forced on and off; Triton (the interpreter) on two.
CASES = ([(f, "reference", s, None) for f in CONFIGS for s in (False, True)]
         + [("llama-gqa", "reference", False, False)]
         + [(f, b, False, None) for f in ("gpt2", "mistral-window") for b in BACKENDS if b != "reference"])


@pytest.mark.parametrize("family,backend,shared,lean", CASES,
                         ids=[f"{f}-{b}-{'groups' if s else 'rows'}{'-transformers' if lean is False else ''}"
                              for f, b, s, lean in CASES])
def test_planned_steps_are_one_forward_per_step(family, backend, shared, lean):
    model = _model(family)
    one, planned = (PagedModel(model, num_blocks=64, block_size=4, backend=backend, shared_prefix=shared, lean=lean)
                    for _ in range(2))
    seqs = [_rows(pm, torch.Generator().manual_seed(1)) for pm in (one, planned)]
    assert seqs[0] == seqs[1]
    seqs = seqs[0]
    gen = torch.Generator().manual_seed(2)
    before = planned.blocks.seq_lens(seqs).tolist()
    steps, with_groups = PlannedSteps(planned, seqs, COUNTS), 0
    assert planned.blocks.seq_lens(seqs).tolist() == [n + c for n, c in zip(before, COUNTS)]
    for k in range(max(COUNTS)):
        rows = [i for i, c in enumerate(COUNTS) if c > k]
        assert steps.rows(k) == (None if len(rows) == len(seqs) else rows)
        ids = torch.randint(0, V, (len(rows),), generator=gen).to(DEVICE)
        want = one([seqs[i] for i in rows], ids)
        table, lens = one.blocks.tables([seqs[i] for i in rows])  # what forward looked up for this step
        batch = steps.batches[k][2]
        assert torch.equal(batch.block_table.cpu(), table) and torch.equal(batch.seq_lens.cpu(), lens)
        grouped = one._group_lists(table, lens) if shared else None  # forward's beam groups of this step
        assert (batch.groups is None) == (grouped is None)
        with_groups += batch.groups is not None
        got = steps(k, ids)
        assert torch.equal(got, want), f"step {k}: max |diff| {(got - want).abs().max().item():.2e}"
    assert planned.blocks.seq_lens(seqs).tolist() == one.blocks.seq_lens(seqs).tolist()
    assert with_groups == (3 if shared else 0)  # the forks share blocks while two of them read at once
    # the keys and values the steps wrote are the ones forward wrote: a next forward over every row agrees
    ids = torch.randint(0, V, (len(seqs),), generator=gen).to(DEVICE)
    assert torch.equal(planned(seqs, ids), one(seqs, ids))
    for pm in (one, planned):
        pm.blocks.free_many(seqs)
        pm.blocks.check_invariants()
        assert pm.blocks.num_free_blocks == pm.blocks.num_blocks


def test_planning_errors_leave_the_cache_as_it_was_and_steps_run_in_order():
    pm = PagedModel(_model("gpt2"), num_blocks=128, block_size=4)
    seqs = _rows(pm, torch.Generator().manual_seed(1))
    lens = pm.blocks.seq_lens(seqs).tolist()
    with pytest.raises(ValueError, match="counts: expected 5 counts >= 1"):
        PlannedSteps(pm, seqs, [1, 2, 0, 1, 1])
    with pytest.raises(ValueError, match="seq_ids: expected at least one sequence"):
        PlannedSteps(pm, [], [])
    with pytest.raises(ValueError, match=r"past GPT2LMHeadModel's 256 positions"):
        PlannedSteps(pm, seqs, [1, 1, 1, 1, 250])  # (the last prompt holds 13 tokens)
    # back to their lengths (the forks keep the copies of their shared last block the append made, as after an
    # error in forward), nothing leaked
    assert pm.blocks.seq_lens(seqs).tolist() == lens
    pm.blocks.check_invariants()
    steps = PlannedSteps(pm, seqs, [2, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"k=1: expected step 0 of 2 \(steps run in order, each once\)"):
        steps(1, torch.zeros(1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"ids: expected 5 tokens \(the rows of step 0\), got \[4\]"):
        steps(0, torch.zeros(4, dtype=torch.long, device=DEVICE))
    steps(0, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="k=0: expected step 1 of 2"):
        steps(0, torch.zeros(5, dtype=torch.long, device=DEVICE))
    pm.blocks.truncate_many(seqs, lens)
    pm.blocks.free_many(seqs)
    assert pm.blocks.num_free_blocks == pm.blocks.num_blocks


@pytest.fixture(scope="module")
def models():
    return ivg_models("gpt2")


@pytest.mark.parametrize("options", [
    dict(mode="eft", temperature=0.8, speculate=4, max_new_tokens=12, seed=5),
    dict(mode="ivg", width=2, successors=2, chunk_len=4, temperature=1.0, speculate=3, max_new_tokens=10, seed=3),
], ids=["eft", "ivg"])
def test_speculative_decoding_is_the_same_with_and_without_planned_steps(models, monkeypatch, options):
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    opts = DecodeOptions(**options)
    monkeypatch.setattr(planned_steps, "PLAN", False)
    want = IVGDecoder(models).generate(prompts, opts)
    monkeypatch.setattr(planned_steps, "PLAN", True)
    calls, real = [], PlannedSteps.__call__

    def counted(self, k, ids):
        calls.append(k)
        return real(self, k, ids)

    monkeypatch.setattr(PlannedSteps, "__call__", counted)
    dec = IVGDecoder(models)
    _same(dec.generate(prompts, opts), want, tol=0.0)
    assert calls and max(calls) >= 2, "the draft forwards did not go through PlannedSteps"
    assert set(dec.kv_blocks_in_use().values()) == {0}
