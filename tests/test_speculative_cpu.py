"""The speculative verification's CPU shortcut (``ivg_kernels.reference.speculative_cpu``: unfiltered rows at one
temperature > 0, the rest in numpy) gives the reference's own computation bit for bit: tokens, accepted counts,
log-probs, values and flags, on random rows with ties, -inf tails, NaN and +inf, drafts drawn from ``q`` (kept
and rejected) and arbitrary ones. On one intra-op thread (``one_thread``): with several, torch may split a row's
sums between threads by a call's size, and the shortcut makes p and q in one call where the reference makes two."""
import math
import random

import pytest
import torch

from ivg_kernels.reference import speculative as ref
from ivg_kernels.reference import speculative_cpu
from ivg_kernels.reference.speculative import spec_uniforms
from ivg_kernels.speculative import speculative_verify

FIELDS = ("num_accepted", "tokens", "logprob", "input_logprobs", "input_logits", "ok")


def _verify(lean: bool, monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        if not lean:
            m.setattr(ref, "lean_applies", lambda *a: False)
        return speculative_verify(*args, **kwargs)


def _same(got, want, where):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (where, name, a.dtype, b.dtype)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (where, name, a, b)


def _rows(rng, g, r, s, v, dtype):
    x = torch.randn(r, s, v, generator=g, dtype=torch.float64) * rng.choice([0.3, 2.0, 8.0])
    kind = rng.choice(["plain", "levels", "tail", "bad", "plain"])
    if kind == "levels":  # few distinct values: ties everywhere
        x = torch.randint(-2, 3, (r, s, v), generator=g).double()
    elif kind == "tail":
        x[..., : v // 2] = -math.inf
    elif kind == "bad":
        x[rng.randrange(r), rng.randrange(s), rng.randrange(v)] = rng.choice([math.nan, math.inf, -math.inf])
    return x.to(dtype)


def _case(rng, seed):
    g = torch.Generator().manual_seed(seed)
    r, s, v = rng.choice([1, 2, 5, 16]), rng.choice([1, 2, 5, 6]), rng.choice([2, 7, 64, 596])
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
    base = _rows(rng, g, r, s, v, dtype)
    guides = [(_rows(rng, g, r, s, v + rng.choice([0, 3]), dtype), rng.choice([0.5, 1.0, -1.0, -0.5, 0.0, 2.0]))
              for _ in range(rng.choice([0, 1, 2, 3]))]
    # the draft: a guide, or its own rows (now and then in another dtype: p and q then go in separate calls)
    draft = guides[0][0] if guides and rng.random() < 0.5 else _rows(
        rng, g, r, s, v, rng.choice([dtype, torch.float64, torch.float32]))
    temperature = rng.choice([0.7, 1.0, 1.3, 1e-3, 4.0])
    seeds = torch.tensor([rng.randrange(1 << 40) for _ in range(r)])
    offset = torch.tensor([[rng.randrange(1 << 30) for _ in range(s)] for _ in range(r)])
    uniforms = spec_uniforms(seeds, offset)
    vocab = rng.choice([None, v, max(1, v - 1)])
    w = vocab or v
    if rng.random() < 0.7:  # drafts from q, as a draft model draws them: some kept, some rejected
        q = torch.softmax(draft[:, :-1, :w].double() / temperature, dim=-1).nan_to_num(1.0)
        drafts = ref.inverse_cdf(q, uniforms[:, :-1, 0])
    else:
        drafts = torch.randint(0, w, (r, s - 1), generator=g)
    num_draft = torch.tensor([rng.randrange(s) for _ in range(r)])
    kwargs = dict(temperature=temperature, seed=seeds, offset=offset, vocab_size=vocab, backend="reference",
                  uniforms=uniforms if rng.random() < 0.8 else None)
    return (base, guides, draft, drafts, num_draft), kwargs


@pytest.mark.parametrize("seed", range(4))
def test_the_cpu_shortcut_gives_the_references_bits(monkeypatch, seed, one_thread):
    rng = random.Random(seed)
    taken, real = [], speculative_cpu.verify_rows_cpu
    monkeypatch.setattr(ref, "verify_rows_cpu", lambda *a: taken.append(1) or real(*a))
    seen = {"kept all": 0, "rejected": 0, "bad": 0}
    for case in range(60):
        args, kwargs = _case(rng, seed * 1000 + case)
        got = _verify(True, monkeypatch, *args, **kwargs)
        want = _verify(False, monkeypatch, *args, **kwargs)
        _same(got, want, (seed, case))
        n, nd = want.num_accepted, args[4]
        seen["kept all"] += int(((n == nd) & want.ok).sum())
        seen["rejected"] += int(((n < nd) & want.ok).sum())
        seen["bad"] += int((~want.ok).sum())
    assert len(taken) >= 60 and min(seen.values()) >= 3, (len(taken), seen)  # the shortcut ran, every kind of row


@pytest.mark.parametrize("weight", [-1.0, -0.25, 0.0, 1.0])
def test_a_guides_plus_inf_flags_its_row_at_any_weight(monkeypatch, weight, one_thread):
    """A guide's +inf (which a negative weight turns into -inf in the scores, leaving their max finite) flags
    its row on both paths; the other rows decide as usual."""
    g = torch.Generator().manual_seed(3)
    base, tuned, guide = (torch.randn(3, 4, 50, generator=g) for _ in range(3))
    guide[1, 2, 7] = math.inf
    args = (base, [(tuned, 1.0), (guide, weight)], tuned, torch.randint(0, 50, (3, 3), generator=g),
            torch.tensor([3, 3, 3]))
    kwargs = dict(temperature=0.8, seed=torch.tensor([1, 2, 3]), offset=torch.arange(12).view(3, 4))
    got = _verify(True, monkeypatch, *args, **kwargs)
    _same(got, _verify(False, monkeypatch, *args, **kwargs), weight)
    assert got.ok.tolist() == [True, False, True] and (got.tokens[1] == -1).all()


def test_logits_that_require_grad_verify_as_detached_ones():
    g = torch.Generator().manual_seed(4)
    base, tuned, ref_ = (torch.randn(2, 3, 40, generator=g, requires_grad=True) for _ in range(3))
    drafts, nd = torch.randint(0, 40, (2, 2), generator=g), torch.tensor([2, 1])
    kwargs = dict(temperature=0.9, seed=torch.tensor([5, 6]), offset=torch.arange(6).view(2, 3))
    got = speculative_verify(base, [(tuned, 1.0), (ref_, -1.0)], tuned, drafts, nd, **kwargs)
    want = speculative_verify(base.detach(), [(tuned.detach(), 1.0), (ref_.detach(), -1.0)], tuned.detach(), drafts,
                              nd, **kwargs)
    assert torch.equal(got.tokens, want.tokens) and got.ok.all()
    assert torch.equal(got.logprob.nan_to_num(), want.logprob.nan_to_num())


def test_a_draft_outside_both_supports_is_replaced_by_a_draw_from_p(monkeypatch, one_thread):
    """``p`` equal to ``q`` (the draft is the base, no guides) and drafts where both are 0: each is rejected, the
    residual ``max(p - q, 0)`` has no mass, and the replacement comes from ``p`` on both paths (never the last
    token, which an empty residual's inverse CDF would give)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 3, 30, generator=g)
    base[..., 20:] = -math.inf
    drafts = torch.randint(20, 30, (6, 2), generator=g)
    args = (base, [], base, drafts, torch.tensor([2, 2, 1, 1, 2, 0]))
    kwargs = dict(temperature=1.1, seed=torch.arange(6), offset=torch.arange(18).view(6, 3))
    got = _verify(True, monkeypatch, *args, **kwargs)
    _same(got, _verify(False, monkeypatch, *args, **kwargs), "empty residual")
    assert got.ok.all() and (got.num_accepted == 0).all() and (got.tokens[:, 0] < 20).all()


def test_an_inverse_cdf_draw_takes_the_first_token_whose_mass_exceeds_the_target():
    """"Exceeds", strictly: where ``u`` times the total equals a cumulative mass exactly, the draw is the token
    after it (a uniform is an odd multiple of 2**-24: ``3 * 2**-24`` of a total of ``2**24`` is 3, the first
    token's mass), and never a zero-mass token. Both CPU implementations."""
    u = torch.tensor([3 * 2.0 ** -24, 3 * 2.0 ** -24, 5 * 2.0 ** -24], dtype=torch.float64)
    dist = torch.tensor([[3.0, 2.0 ** 24 - 3, 0.0], [3.0, 0.0, 2.0 ** 24 - 3], [3.0, 0.0, 2.0 ** 24 - 3]],
                        dtype=torch.float64)
    want = [1, 2, 2]
    assert ref.inverse_cdf(dist, u).tolist() == want
    assert speculative_cpu.inverse_cdf_np(dist.numpy(), u.numpy()).tolist() == want


@pytest.mark.parametrize("seed", range(3))
def test_the_cpu_draft_shortcut_draws_the_references_tokens(monkeypatch, seed, one_thread):
    """``draft_draw_ref``'s shortcut (``speculative_cpu.draft_rows_cpu``) draws the general path's tokens on random rows
    (ties, -inf tails, NaN and +inf, three dtypes, vocabularies cut by ``vocab_size``, tiny and large temperatures),
    with the uniforms given or made from the keys, and -1 for the same bad rows."""
    rng = random.Random(seed)
    taken, real = [], speculative_cpu.draft_rows_cpu
    monkeypatch.setattr(ref, "draft_rows_cpu", lambda *a: taken.append(1) or real(*a))
    bad = drawn = 0
    for case in range(60):
        g = torch.Generator().manual_seed(seed * 1000 + case)
        r, v = rng.choice([1, 2, 5, 16]), rng.choice([2, 7, 64, 596])
        x = _rows(rng, g, r, 1, v, rng.choice([torch.float32, torch.float64, torch.bfloat16]))[:, 0]
        seeds = torch.tensor([rng.randrange(1 << 40) for _ in range(r)])
        offset = torch.tensor([rng.randrange(1 << 30) for _ in range(r)])
        kwargs = dict(temperature=rng.choice([0.7, 1.0, 1.3, 1e-3, 4.0]), seed=seeds, offset=offset,
                      vocab_size=rng.choice([None, v, max(1, v - 1)]),
                      uniforms=spec_uniforms(seeds, offset) if rng.random() < 0.7 else None)
        got = ref.draft_draw_ref(x, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(ref, "lean_applies", lambda *a: False)
            want = ref.draft_draw_ref(x, **kwargs)
        assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want), (seed, case, got, want)
        bad, drawn = bad + int((want < 0).sum()), drawn + int((want >= 0).sum())
    assert len(taken) == 60 and bad >= 3 and drawn >= 100, (len(taken), bad, drawn)


def test_the_draft_shortcut_is_not_taken_with_a_filter_or_at_temperature_0(monkeypatch):
    """Top-k, top-p, min-p and greedy rows take the general path (the shortcut draws from unfiltered rows at one
    temperature > 0 only)."""
    taken = []
    monkeypatch.setattr(ref, "draft_rows_cpu", lambda *a: taken.append(1))
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    for kw in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(temperature=0.0),
               dict(temperature=torch.tensor([0.5, 0.7, 1.0]))):
        out = ref.draft_draw_ref(x, seed=1, offset=torch.arange(3), **kw)
        assert out.shape == (3,) and (out >= 0).all(), kw
    assert not taken
