"""The fused speculative verification and draft draw (Triton; the interpreter on CPU) against the
plain-torch reference: same accepted counts and tokens, the same values, the same flagged rows; and the
dispatch rules of ``ivg_kernels.speculative_verify`` and ``ivg_kernels.draft_sample``."""
import math

import pytest
import torch

from ivg_kernels.reference.speculative import draft_draw_ref, speculative_verify_ref
from ivg_kernels.speculative import draft_sample, speculative_verify

from .helpers import DEVICE, requires_triton


def _case(r, s, v, g, seed, temperature, scale=1.2, similar=True):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(r, s, v, generator=gen) * scale
    guides = [(torch.randn(r, s, v + i, generator=gen) * scale, w) for i, w in zip(range(g), (1.0, -1.0, 0.5, -0.25))]
    draft = (base + 0.3 * torch.randn(r, s, v, generator=gen)) if similar else torch.randn(r, s, v, generator=gen)
    seeds = torch.arange(r, dtype=torch.int64) * 104729 + seed
    offset = (torch.arange(s) * 65536).expand(r, s) + torch.arange(r).unsqueeze(1)
    drafts = torch.stack([draft_draw_ref(draft[:, k], temperature=temperature, seed=seeds, offset=offset[:, k])
                          for k in range(s - 1)], 1) if s > 1 else torch.zeros(r, 0, dtype=torch.int64)
    num = torch.randint(0, s, (r,), generator=gen)
    return base, guides, draft, drafts, num, seeds, offset


def _on_device(base, guides, draft, drafts, num, seeds, offset):
    """A case's tensors on the test device (CUDA on a GPU machine, where the interpreter does not run)."""
    return (*(x.to(DEVICE) for x in (base, draft, drafts, num, seeds, offset)), [(g.to(DEVICE), w) for g, w in guides])


@requires_triton
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("r,s,v,g", [(24, 4, 37, 2), (16, 1, 40, 1), (12, 3, 64, 4), (20, 5, 17, 0)])
def test_fused_verification_matches_the_reference(r, s, v, g, temperature):
    base, draft, drafts, num, seeds, offset, gd = _on_device(*_case(r, s, v, g, r + s + v, temperature))
    want = speculative_verify_ref(base, gd, draft, drafts, num, temperature=temperature, seed=seeds, offset=offset)
    got = speculative_verify(base, gd, draft, drafts, num, temperature=temperature, seed=seeds, offset=offset,
                             backend="triton")
    assert torch.equal(got.ok, want.ok)
    assert torch.equal(got.num_accepted, want.num_accepted), (got.num_accepted, want.num_accepted)
    assert torch.equal(got.tokens, want.tokens)
    live = want.tokens >= 0
    torch.testing.assert_close(got.input_logits[live].double(), want.input_logits[live].double())
    torch.testing.assert_close(got.input_logprobs[live].double(), want.input_logprobs[live].double(), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(got.logprob[live], want.logprob[live], atol=1e-5, rtol=0)
    if temperature > 0 and s > 1:
        assert 0 < int(want.num_accepted.sum()) < int(num.sum()), "precondition: some drafts kept, some rejected"


@requires_triton
def test_fused_verification_flags_the_rows_the_reference_flags():
    base, guides, draft, drafts, num, seeds, offset = _case(6, 3, 33, 2, 1, 1.0)
    num[:] = torch.tensor([2, 2, 0, 1, 2, 1])
    base[0, 2, 5] = float("nan")  # read: position num_draft
    base[1, 1, 3] = float("inf")
    guides[0][0][2, 2, 1] = float("nan")  # not read: past num_draft
    draft[3, 0, 7] = float("nan")  # a drafted position of the draft
    draft[5, 2, 2] = float("nan")  # past the row's one draft and its final position: not read
    base, draft, drafts, num, seeds, offset, gd = _on_device(base, guides, draft, drafts, num, seeds, offset)
    want = speculative_verify_ref(base, gd, draft, drafts, num, seed=seeds, offset=offset)
    got = speculative_verify(base, gd, draft, drafts, num, seed=seeds, offset=offset, backend="triton")
    assert want.ok.tolist() == [False, False, True, False, True, True]
    assert torch.equal(got.ok, want.ok) and torch.equal(got.tokens, want.tokens)


@requires_triton
def test_a_position_with_no_finite_score_flags_its_row_wherever_it_is_read():
    """A position whose scores are all -inf (no token to draw) flags its row on both backends when the row reads
    it: a drafted position of the base or of the draft, or position num_draft; not past it. (The fused kernel did
    not flag position num_draft when a draft before it was rejected.)"""
    base, guides, draft, drafts, num, seeds, offset = _case(4, 3, 33, 2, 5, 1.0)
    num[:] = torch.tensor([2, 2, 2, 1])
    base[0, 0] = float("-inf")  # a drafted position, before the last
    draft[1, 1] = float("-inf")
    base[2, 2] = float("-inf")  # position num_draft, read even where an earlier draft is rejected (as here)
    base[3, 2] = float("-inf")  # past the final position of a row with one draft: not read
    base, draft, drafts, num, seeds, offset, gd = _on_device(base, guides, draft, drafts, num, seeds, offset)
    want = speculative_verify_ref(base, gd, draft, drafts, num, seed=seeds, offset=offset)
    got = speculative_verify(base, gd, draft, drafts, num, seed=seeds, offset=offset, backend="triton")
    assert want.ok.tolist() == [False, False, False, True]
    assert torch.equal(got.ok, want.ok) and torch.equal(got.tokens, want.tokens)


@requires_triton
@pytest.mark.parametrize("temperature", [1e-6, 1e-30])
def test_fused_verification_log_probs_of_ties_at_tiny_temperatures(temperature):
    """Tied tokens at a tiny temperature: the fused path's log-probs are the reference's (-log of the number of
    ties), not float32 rounded at ``|z / T|`` of a million or more (they read -0.75 for -log 2 there)."""
    base, guides, draft, drafts, num, seeds, offset = _case(6, 3, 40, 1, 7, 1.0)
    base = (base * 2).round() / 2  # ties at each row's maximum
    guides = [(torch.zeros_like(g), w) for g, w in guides]
    base[:, :, :5] = base.amax(dim=2, keepdim=True)  # at least five tied tokens per position
    drafts = torch.stack([draft_draw_ref(draft[:, k], temperature=temperature, seed=seeds, offset=offset[:, k])
                          for k in range(2)], 1)
    base, draft, drafts, num, seeds, offset, gd = _on_device(base, guides, draft, drafts, num, seeds, offset)
    want = speculative_verify_ref(base, gd, draft, drafts, num, temperature=temperature, seed=seeds, offset=offset)
    got = speculative_verify(base, gd, draft, drafts, num, temperature=temperature, seed=seeds, offset=offset,
                             backend="triton")
    assert torch.equal(got.tokens, want.tokens)
    live = want.tokens >= 0
    ties = (base == base.amax(dim=2, keepdim=True)).sum(dim=2).double()
    torch.testing.assert_close(want.logprob[live], -ties.log()[live])  # the reference, against the count
    torch.testing.assert_close(got.logprob[live], want.logprob[live], atol=1e-6, rtol=0)


def _foreign_drafts(r, v, seed):
    """Rows where p = q (the draft is the base, no guide) and the draft token is one ``q`` gives no mass
    (a -inf logit): it is rejected and ``max(p - q, 0)`` is empty. The replacement must come from ``p``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(r, 1 + 1, v, generator=gen)
    base[:, :, 0] = float("-inf")  # token 0: no mass in p or q
    base[:, :, v - 1] = float("-inf")  # nor the last (where an inverse-CDF draw over an empty row would land)
    drafts = torch.zeros(r, 1, dtype=torch.int64)
    num = torch.ones(r, dtype=torch.int64)
    seeds = torch.arange(r, dtype=torch.int64) * 7919 + seed
    offset = torch.arange(r * 2, dtype=torch.int64).view(r, 2) * 65536
    return base, base.clone(), drafts, num, seeds, offset


def test_a_rejection_without_residual_mass_draws_from_p():
    """Drafts a draft model gave no mass to (a caller's own): every rejected row's token follows ``p`` (chi-square
    over 4,000 rows), never the empty residual's last token."""
    r, v = 4000, 6
    base, draft, drafts, num, seeds, offset = _foreign_drafts(r, v, 3)
    base[:, 0, 1:v - 1] = torch.tensor([2.0, 1.0, 0.0, -1.0])  # one p for every row at position 0
    draft[:, 0] = base[:, 0]
    out = speculative_verify_ref(base, [], draft, drafts, num, seed=seeds, offset=offset)
    assert out.ok.all() and (out.num_accepted == 0).all()
    counts = torch.bincount(out.tokens[:, 0], minlength=v).double()
    assert counts[0] == 0 and counts[v - 1] == 0, counts
    p = base[0, 0].softmax(0).double()
    chi2 = float(((counts[1:v - 1] - r * p[1:v - 1]) ** 2 / (r * p[1:v - 1])).sum())
    assert chi2 < 16.3, (chi2, counts)  # 3 degrees of freedom, p = 0.001


@requires_triton
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_fused_verification_draws_from_p_where_the_residual_is_empty(temperature):
    """Both backends give the same token for drafts outside ``q``'s support; greedy rows give the target's argmax."""
    base, draft, drafts, num, seeds, offset = _foreign_drafts(40, 9, 5)
    base, draft, drafts, num, seeds, offset, _ = _on_device(base, [], draft, drafts, num, seeds, offset)
    want = speculative_verify_ref(base, [], draft, drafts, num, temperature=temperature, seed=seeds, offset=offset)
    got = speculative_verify(base, [], draft, drafts, num, temperature=temperature, seed=seeds, offset=offset,
                             backend="triton")
    assert torch.equal(got.tokens, want.tokens) and (want.num_accepted == 0).all()
    first = want.tokens[:, 0].cpu()
    assert bool(((first > 0) & (first < 8)).all()), first
    if temperature == 0:
        assert torch.equal(first, base[:, 0].cpu().argmax(dim=1))


def test_dispatch_and_errors():
    base, draft, drafts, num, seeds, offset, guides = _on_device(*_case(3, 3, 20, 2, 2, 1.0))
    out = speculative_verify(base, guides, draft, drafts, num, top_p=0.9, seed=seeds, offset=offset)  # reference
    assert out.tokens.shape == (3, 3)
    with pytest.raises(ValueError, match="backend='triton': the fused verification takes no top-k"):
        speculative_verify(base, guides, draft, drafts, num, top_k=5, seed=seeds, offset=offset, backend="triton")
    with pytest.raises(ValueError, match=r"draft_logits=.*\[3, 3, V_d\]"):
        speculative_verify(base, guides, draft[:, :1], drafts, num, seed=seeds, offset=offset)
    with pytest.raises(ValueError, match=r"num_draft=.*integer tensor \[3\]"):
        speculative_verify(base, guides, draft, drafts, num.float(), seed=seeds, offset=offset)
    with pytest.raises(ValueError, match=r"guides\[1\]="):
        speculative_verify(base, [guides[0], (guides[1][0][:, :2], 1.0)], draft, drafts, num, seed=seeds, offset=offset)
    with pytest.raises(ValueError, match="temperature=-1"):
        speculative_verify(base, guides, draft, drafts, num, temperature=-1, seed=seeds, offset=offset)


@requires_triton
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_draft_draw_matches_the_reference(temperature, dtype):
    """Tokens of the fused draft draw equal draft_draw_ref's, row by row (rows of unequal shape: a peaked
    and a flat half, a padded vocabulary, rows with NaN, +inf and no finite score flagged -1)."""
    gen = torch.Generator().manual_seed(11)
    r, v = 96, 300
    logits = torch.randn(r, v + 4, generator=gen) * torch.linspace(0.2, 6.0, r).unsqueeze(1)
    logits[3, 10], logits[4, 20], logits[5] = float("nan"), float("inf"), float("-inf")
    logits = logits.to(dtype).to(DEVICE)
    seeds = (torch.arange(r, dtype=torch.int64) * 7919 + 5).to(DEVICE)
    offset = (torch.arange(r, dtype=torch.int64) * 65536 + 3).to(DEVICE)
    want = draft_draw_ref(logits, temperature=temperature, seed=seeds, offset=offset, vocab_size=v)
    got = draft_sample(logits, temperature=temperature, seed=seeds, offset=offset, vocab_size=v, backend="triton")
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert got[3] == got[4] == got[5] == -1 and bool((want[6:] >= 0).all())
    if temperature > 0:  # the draws are draws: not every row's argmax
        assert int((want[6:] != logits[6:, :v].float().argmax(dim=1)).sum()) > 10
    scalar = draft_sample(logits[6:], temperature=temperature, seed=1, offset=2, vocab_size=v, backend="triton")
    assert torch.equal(scalar, draft_draw_ref(logits[6:], temperature=temperature, seed=1, offset=2, vocab_size=v))


def test_draft_draw_dispatch_and_errors():
    logits = torch.randn(4, 30, device=DEVICE)
    seeds, offset = torch.arange(4, device=DEVICE), torch.arange(4, device=DEVICE)
    out = draft_sample(logits, top_p=0.9, seed=seeds, offset=offset)  # top-p: the reference on every device
    assert out.shape == (4,) and bool((out >= 0).all())
    with pytest.raises(ValueError, match="backend='triton': the fused draft draw takes no top-k"):
        draft_sample(logits, top_k=5, seed=seeds, offset=offset, backend="triton")
    with pytest.raises(ValueError, match="backend='triton': the fused draft draw"):
        draft_sample(logits, temperature=torch.ones(4), seed=seeds, offset=offset, backend="triton")
    with pytest.raises(ValueError, match=r"logits=.*2-D"):
        draft_sample(logits[0], seed=seeds, offset=offset)
    with pytest.raises(ValueError, match="backend="):
        draft_sample(logits, seed=seeds, offset=offset, backend="nope")


@pytest.mark.parametrize("filters", [{}, dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)], ids=str)
def test_reference_ops_keep_every_tensor_on_the_inputs_device(filters):
    """The plain-torch sampler, draft draw and verification on tensors of a device other than the CPU
    ("meta": shapes only, no data) with the seed and offset as tensors there or as Python integers: no
    operation mixes in a CPU tensor (on a GPU that failed every draw: Philox's integer counters were made
    on the CPU), and the outputs live on that device."""
    import ivg_kernels
    from ivg_kernels.reference.speculative import spec_uniforms

    meta = torch.device("meta")
    base, draft, drafts, num, seeds, offset, gd = _on_device(*_case(6, 3, 20, 2, 1, 0.7))
    base, draft, drafts, num, seeds, offset = (x.to(meta) for x in (base, draft, drafts, num, seeds, offset))
    gd = [(g.to(meta), w) for g, w in gd]
    outs = [speculative_verify_ref(base, gd, draft, drafts, num, temperature=0.7, seed=seeds, offset=offset, **filters),
            draft_draw_ref(draft[:, 0], temperature=0.7, seed=seeds, offset=offset[:, 0], **filters),
            spec_uniforms(seeds, offset[:, 0])]
    for seed, off in ((seeds, offset[:, 0]), (7, 3)):
        for t in (0.7, 0.0, torch.full((6,), 0.5, device=meta)):
            outs.append(ivg_kernels.guided_sample(base[:, 0], [(g[:, 0], w) for g, w in gd], temperature=t, seed=seed,
                                                  offset=off, backend="reference", **filters))
    tensors = [t for o in outs for t in (o if isinstance(o, tuple) else (o,)) if isinstance(t, torch.Tensor)]
    assert len(tensors) > 20 and all(t.device == meta for t in tensors)


def test_guides_and_scalar_parameters_of_the_wrong_kind_are_named():
    """A guide list that is not a list, and a temperature, top-k, top-p or min-p of the wrong type, failed with
    Python's own TypeError (a comparison or an iteration) that named no argument; each is named now, and a
    guide pair's message shows its items' kinds and shapes, not a tensor's values."""
    r, s, v = 2, 3, 10
    logits, draft = torch.randn(r, s, v), torch.randn(r, s, v)
    args = (torch.randint(0, v, (r, s - 1)), torch.tensor([2, 1]))
    kw = dict(seed=1, offset=torch.zeros(r, s, dtype=torch.long), backend="reference")
    for guides in (None, 1.5, draft):
        with pytest.raises(ValueError, match=r"guides=.*: expected a list of \(tensor \[2, 3, V_i\], weight\) pairs"):
            speculative_verify(logits, guides, draft, *args, **kw)
    with pytest.raises(ValueError, match=r"guides\[0\]='\(tensor\[2, 10\], float\)': expected a \(tensor \[2, 3, V"):
        speculative_verify(logits, [(draft[:, 0], 1.0)], draft, *args, **kw)
    for name, value in (("temperature", None), ("temperature", "0.7"), ("temperature", math.inf), ("top_k", 2.5),
                        ("top_p", [0.9]), ("min_p", "0"), ("top_p", 1.5)):
        with pytest.raises(ValueError, match=f"^{name}="):
            speculative_verify(logits, [], draft, *args, **kw, **{name: value})


def test_draft_counts_tokens_and_uniforms_are_checked_on_the_reference_path():
    """A draft count past S - 1 or below 0, a drafted token outside the vocabulary, or uniforms of another
    shape were taken silently (or failed with an IndexError); each is named now. Positions past a row's
    count are never read: any token there is fine."""
    r, s, v = 2, 3, 10
    logits, draft = torch.randn(r, s, v), torch.randn(r, s, v)
    drafts, offset = torch.randint(0, v, (r, s - 1)), torch.zeros(r, s, dtype=torch.long)
    for num, message in ((torch.tensor([3, 1]), r"num_draft=.*counts in 0 \.\. 2 \(S - 1\); row 0 has 3"),
                         (torch.tensor([1, -1]), r"num_draft=.*row 1 has -1")):
        with pytest.raises(ValueError, match=message):
            speculative_verify(logits, [], draft, drafts, num, seed=1, offset=offset, backend="reference")
    bad = drafts.clone()
    bad[1, 0] = v
    with pytest.raises(ValueError, match=rf"draft_tokens=.*token ids in \[0, {v}\) where drafted; row 1, draft 0 is {v}"):
        speculative_verify(logits, [], draft, bad, torch.tensor([2, 1]), seed=1, offset=offset, backend="reference")
    bad = drafts.clone()
    bad[1, 1] = -7  # past row 1's one draft: not read
    speculative_verify(logits, [], draft, bad, torch.tensor([2, 1]), seed=1, offset=offset, backend="reference")
    with pytest.raises(ValueError, match=r"uniforms=.*float64 tensor \[2, 3, 3\]"):
        speculative_verify(logits, [], draft, drafts, torch.tensor([2, 1]), seed=1, offset=offset,
                           uniforms=torch.zeros(r, s), backend="reference")
    with pytest.raises(ValueError, match=r"uniforms=.*float64 tensor \[2, 3\]"):
        draft_sample(torch.randn(r, v), seed=1, offset=0, uniforms=torch.zeros(3), backend="reference")
