"""The reference sampler's semantics: frequencies against transformers' warpers, support, values, greedy."""
import math

import pytest
import torch
from scipy import stats

import ivg_kernels
from ivg_kernels.reference import guided_sample_ref

from .helpers import DEVICE, requires_triton

warpers = pytest.importorskip("transformers.generation.logits_process")


def _hf_probs(z: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Exact probabilities of Hugging Face's warper chain on combined scores ``z`` [V] (float64)."""
    scores = z.double().unsqueeze(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    chain = [warpers.TemperatureLogitsWarper(temperature)]
    if top_k:
        chain.append(warpers.TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(warpers.TopPLogitsWarper(top_p))
    if min_p > 0:
        chain.append(warpers.MinPLogitsWarper(min_p))
    for w in chain:
        scores = w(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


SETTINGS = [
    dict(),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=8, top_p=0.7, min_p=0.1),
    dict(temperature=1.0, min_p=0.05),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) or "plain" for s in SETTINGS])
def test_frequencies_match_transformers_warpers(setting):
    """200k draws on a 12-token vocabulary: chi-square against the warped distribution."""
    gen = torch.Generator().manual_seed(0)
    v, n = 12, 200_000
    base, g1, g2 = (torch.randn(1, v, generator=gen) * 1.5 for _ in range(3))
    z = base + 0.8 * g1 - 0.8 * g2
    expected = _hf_probs(z[0], **setting)
    out = guided_sample_ref(
        base.expand(n, v), [(g1.expand(n, v), 0.8), (g2.expand(n, v), -0.8)],
        seed=2024, offset=torch.arange(n), **setting,
    )
    assert out.ok.all()
    counts = torch.bincount(out.tokens, minlength=v).double()
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew outside the support: {counts[~support]}"
    res = stats.chisquare(counts[support].numpy(), (expected[support] * n).numpy())
    assert res.pvalue > 1e-4, f"chi-square p={res.pvalue:.2e}: counts {counts.tolist()} expected {(expected * n).tolist()}"
    tv = 0.5 * (counts / n - expected).abs().sum().item()
    assert tv < 0.01


def test_logprob_is_the_warped_probability():
    gen = torch.Generator().manual_seed(1)
    v, n = 30, 64
    base = torch.randn(n, v, generator=gen) * 2
    guide = torch.randn(n, v, generator=gen)
    setting = dict(temperature=0.8, top_k=10, top_p=0.9)
    out = guided_sample_ref(base, [(guide, 0.5)], seed=1, offset=torch.arange(n), **setting)
    for r in range(n):
        p = _hf_probs(base[r].double() + 0.5 * guide[r].double(), **setting)
        assert p[out.tokens[r]] > 0
        assert math.isclose(out.logprob[r].item(), math.log(p[out.tokens[r]].item()), rel_tol=1e-4, abs_tol=1e-5)


def test_values_against_float64():
    gen = torch.Generator().manual_seed(2)
    n, v = 8, 257
    base = (torch.randn(n, v + 3, generator=gen) * 3).bfloat16()
    guides = [(torch.randn(n, v, generator=gen).half(), 1.5), (torch.randn(n, v + 7, generator=gen), torch.randn(n))]
    out = guided_sample_ref(base, guides, temperature=0.9, seed=5, offset=0)
    inputs = [base[:, :v].double(), guides[0][0][:, :v].double(), guides[1][0][:, :v].double()]
    lse = torch.stack([x.logsumexp(1) for x in inputs], 1)
    tok = out.tokens.unsqueeze(1)
    at = torch.cat([x.gather(1, tok) for x in inputs], 1)
    torch.testing.assert_close(out.logsumexp.double(), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.input_logits.double(), at, rtol=0, atol=0)
    torch.testing.assert_close(out.input_logprobs.double(), at - lse, rtol=1e-6, atol=1e-5)
    z = inputs[0] + 1.5 * inputs[1] + guides[1][1].double().unsqueeze(1) * inputs[2]
    logp = torch.log_softmax(z / 0.9, 1).gather(1, tok).squeeze(1)
    torch.testing.assert_close(out.logprob.double(), logp, rtol=1e-5, atol=1e-5)


def test_support_and_masked_tokens_are_never_drawn():
    gen = torch.Generator().manual_seed(3)
    n, v = 4000, 50
    base = torch.randn(n, v, generator=gen) * 2
    masked = torch.rand(n, v, generator=gen) < 0.3
    masked[:, 0] = False
    base[masked] = float("-inf")
    out = guided_sample_ref(base, temperature=1.2, top_k=7, top_p=0.85, seed=9, offset=torch.arange(n))
    assert out.ok.all()
    assert not masked.gather(1, out.tokens.unsqueeze(1)).any(), "a -inf token was drawn"
    top7 = torch.topk(base, 7, dim=1).values[:, -1:]
    assert (base.gather(1, out.tokens.unsqueeze(1)) >= top7).all(), "a token outside the top-k was drawn"
    for r in range(0, n, 97):
        p = _hf_probs(base[r], temperature=1.2, top_k=7, top_p=0.85)
        assert p[out.tokens[r]] > 0, f"row {r}: token outside the top-p set"


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_greedy_takes_the_first_maximum(backend):
    logits = torch.zeros(3, 20)
    logits[0, [3, 9]] = 5.0
    logits[1, [17, 2]] = 1.0
    guide = torch.zeros(3, 20)
    guide[2, 11] = 1.0
    logits, guide = logits.to(DEVICE), guide.to(DEVICE)
    out = ivg_kernels.guided_sample(logits, [(guide, 2.0)], temperature=0.0, top_k=3, seed=0, offset=0, backend=backend)
    assert out.tokens.tolist() == [3, 2, 11]
    assert out.logprob.tolist() == [0.0, 0.0, 0.0]


def test_same_key_same_token_different_key_varies():
    logits = torch.zeros(64, 1000)
    out1 = guided_sample_ref(logits, seed=7, offset=torch.arange(64))
    out2 = guided_sample_ref(logits, seed=7, offset=torch.arange(64))
    assert torch.equal(out1.tokens, out2.tokens)
    assert out1.tokens.unique().numel() > 50
    out3 = guided_sample_ref(logits, seed=8, offset=torch.arange(64))
    assert not torch.equal(out1.tokens, out3.tokens)


def test_float64_is_supported_by_the_reference():
    logits = torch.randn(4, 100, dtype=torch.float64)
    out = ivg_kernels.guided_sample(logits, seed=0, offset=0, top_p=0.9)
    assert out.logprob.dtype == torch.float64 and out.ok.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.1, 0.85, 0.7, 1e-3, 0.0])
def test_scalar_parameters_give_what_per_row_tensors_of_them_give(dtype, temperature):
    """One temperature and guide weight as Python floats (the reference scales by their reciprocal on the
    host) give bitwise what [N] tensors of the same values give (scaled row by row), filtered or not,
    bad rows included; so do the draft draw and the warped distribution. (At 1.1 and 0.85 the float32
    reciprocal differs from the double one rounded to float32.)"""
    from ivg_kernels._args import prepare_sample_args
    from ivg_kernels.reference.sampling import warped_probs
    from ivg_kernels.reference.speculative import draft_draw_ref

    gen = torch.Generator().manual_seed(11)
    n, v = 6, 37
    logits = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    guide = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    logits[1, 3], logits[2, 0], guide[3, 5] = math.nan, math.inf, -math.inf
    logits[4, :3] = logits[4, 3]  # a tie
    logits[5] = -math.inf  # nothing to draw
    row = lambda x: torch.full((n,), x, dtype=torch.float64)  # noqa: E731
    keys = dict(seed=torch.arange(n) + 5, offset=torch.arange(n) * 3)
    for filters in (dict(), dict(top_k=4), dict(top_p=0.8, min_p=0.05)):
        a = dict(temperature=temperature, **filters, **keys)
        b = dict(temperature=row(temperature), **filters, **keys)
        one = guided_sample_ref(logits, [(guide, -0.6)], **a)
        per_row = guided_sample_ref(logits, [(guide, row(-0.6))], **b)
        for name in ("tokens", "logprob", "input_logprobs", "input_logits", "ok"):
            x, y = getattr(one, name), getattr(per_row, name)
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)) and torch.equal(x.isnan(), y.isnan()), name
        assert one.ok.tolist() == [True, False, False, False, True, False]
        p1 = warped_probs(prepare_sample_args(logits, [(guide, -0.6)], temperature, filters.get("top_k", 0),
                                              filters.get("top_p", 1.0), filters.get("min_p", 0.0), 0, 0, None))
        p2 = warped_probs(prepare_sample_args(logits, [(guide, row(-0.6))], row(temperature), filters.get("top_k", 0),
                                              filters.get("top_p", 1.0), filters.get("min_p", 0.0), 0, 0, None))
        assert torch.equal(p1.nan_to_num(7.0), p2.nan_to_num(7.0))
        assert torch.equal(draft_draw_ref(logits, **a), draft_draw_ref(logits, **b))


@pytest.mark.parametrize("filters", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [1, 300, 800])
def test_rows_drawn_in_slices_give_one_call_bit_for_bit(monkeypatch, one_thread, dtype, budget, filters):
    """On the CPU the reference draws its rows in slices of at most ``CPU_SAMPLE_BYTES`` of ``[rows, V]`` (one row at
    1 byte, a few at the others): every field of the result is the one call's, bit for bit, with per-row tensors
    for every parameter and guide weight, greedy rows, filters, a tie and bad rows among them."""
    from ivg_kernels.reference import sampling as ref

    gen = torch.Generator().manual_seed(5)
    n, v = 9, 37
    logits = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    guide = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    logits[1, 3], guide[3, 5], logits[5] = math.nan, math.inf, -math.inf  # bad rows
    logits[4, :3] = logits[4, 3]  # a tie
    kw = dict(temperature=torch.tensor([0.7, 1.0, 0.0, 0.5, 1e-3, 1.0, 0.0, 2.0, 0.9], dtype=torch.float64),
              top_k=torch.tensor([0, 3, 0, 5, 0, 0, 2, 0, 40]), top_p=torch.tensor([1.0, 0.8, 1.0, 0.5, 0.9, 1, 1, 0.95, 1]),
              min_p=torch.tensor([0.0, 0, 0.1, 0, 0, 0.05, 0, 0, 0.2]), seed=torch.arange(n) + 3, offset=torch.arange(n) * 7)
    guides = [(guide, torch.linspace(-1.0, 1.0, n, dtype=torch.float64))]
    if not filters:  # (unfiltered calls take half the budget)
        kw = dict(kw, top_k=0, top_p=1.0, min_p=0.0)
        budget *= 2
    whole = ref.guided_sample_ref(logits, guides, **kw)
    monkeypatch.setattr(ref, "CPU_SAMPLE_BYTES", budget)
    calls, real = [], ref._sample_rows
    monkeypatch.setattr(ref, "_sample_rows", lambda a: calls.append(a.num_rows) or real(a))
    sliced = ref.guided_sample_ref(logits, guides, **kw)
    assert sum(calls) == n and len(calls) > 1 and (budget > 1 or set(calls) == {1}), calls
    for name in whole._fields:
        x, y = getattr(whole, name), getattr(sliced, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y) if not x.is_floating_point() else torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
    assert whole.ok.tolist() == [True, False, True, False, True, False, True, True, True]
