"""Speculative sampling of the guided distribution (plain-torch reference): the tokens it produces
are distributed exactly as the sampler's warped distribution at every filter (chi-square), greedy
rows give greedy tokens, and the values it reports are the inputs' at the tokens."""
import pytest
import torch
from scipy import stats

from ivg_kernels.reference.sampling import warped_probs
from ivg_kernels._args import prepare_sample_args
from ivg_kernels.reference.speculative import draft_draw_ref, speculative_verify_ref

V, S = 6, 3  # vocabulary, positions (two drafts)
FILTERS = [dict(), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.15), dict(temperature=0.6, top_k=4, top_p=0.9)]


def _logits(seed, rows=1):
    gen = torch.Generator().manual_seed(seed)
    base, tune, ref = (torch.randn(rows, S, V, generator=gen, dtype=torch.float64) * 1.5 for _ in range(3))
    return base, tune, ref


def _run(base, tune, ref, n_keys, num_draft, **filt):
    """n_keys rows of the same (context-free) logits with different seeds: drafts from the tuned guide
    alone, targets base + tune - ref."""
    r = n_keys
    b, t, f = (x.expand(r, S, V).contiguous() for x in (base, tune, ref))
    seed = torch.arange(r, dtype=torch.int64) * 7919 + 3
    offset = torch.arange(S, dtype=torch.int64).expand(r, S) * 65536
    drafts = torch.stack([draft_draw_ref(t[:, k], seed=seed, offset=offset[:, k], **filt) for k in range(S - 1)], 1)
    out = speculative_verify_ref(b, [(t, 1.0), (f, -1.0)], t, drafts, torch.full((r,), num_draft), seed=seed,
                                 offset=offset, **filt)
    return out, drafts


def _target(base, tune, ref, k, **filt):
    a = prepare_sample_args(base[:, k], [(tune[:, k], 1.0), (ref[:, k], -1.0)], filt.get("temperature", 1.0),
                            filt.get("top_k", 0), filt.get("top_p", 1.0), filt.get("min_p", 0.0), 0, 0, None)
    return warped_probs(a)[0]


def _chi2(tokens, p):
    counts = torch.bincount(tokens, minlength=V).double()
    support = p > 0
    assert counts[~support].sum() == 0, f"drew a token outside the support: {counts.tolist()} vs {p.tolist()}"
    if support.sum() == 1:
        return 1.0
    return stats.chisquare(counts[support].numpy(), (p[support] * counts.sum()).numpy()).pvalue


@pytest.mark.parametrize("filt", FILTERS, ids=[str(f) for f in FILTERS])
def test_every_new_token_is_distributed_as_the_sampler_target(filt):
    base, tune, ref = _logits(len(filt))
    out, _ = _run(base, tune, ref, 20000, S - 1, **filt)
    assert out.ok.all()
    for k in range(S):  # the token at position k exists when k <= num_accepted; its law is p_k (context-free rows)
        have = out.num_accepted >= k
        assert have.sum() > 2000
        pv = _chi2(out.tokens[have, k], _target(base, tune, ref, k, **filt))
        assert pv > 1e-4, f"position {k}: chi-square p = {pv}"
    rate = out.num_accepted.double().mean() / (S - 1)
    assert 0.0 < rate < 1.0, "random logits: some drafts should be kept and some rejected"


def test_no_draft_draws_from_the_target():
    base, tune, ref = _logits(11)
    out, _ = _run(base, tune, ref, 20000, 0, top_p=0.8)
    assert (out.num_accepted == 0).all() and (out.tokens[:, 1:] == -1).all()
    assert _chi2(out.tokens[:, 0], _target(base, tune, ref, 0, top_p=0.8)) > 1e-4


def test_greedy_rows_give_the_greedy_tokens():
    for seed in range(20):
        base, tune, ref = _logits(100 + seed)
        out, drafts = _run(base, tune, ref, 4, S - 1, temperature=0.0)
        z = base + tune - ref  # [1, S, V]
        best = z[0].argmax(dim=1)
        n = 0
        while n < S - 1 and drafts[0, n] == best[n]:
            n += 1
        assert (out.num_accepted == n).all()
        want = torch.cat([best[:n + 1], torch.full((S - n - 1,), -1)])
        assert (out.tokens == want).all(), (out.tokens[0], want)
        assert (drafts == tune[0, :-1].argmax(dim=1)).all(), "greedy drafts are the draft's argmax"


def test_values_are_the_inputs_at_the_tokens_and_nan_after():
    base, tune, ref = _logits(5, rows=3)
    seed = torch.tensor([1, 2, 3])
    offset = torch.arange(S).expand(3, S) * 65536 + torch.tensor([[0], [1], [2]])
    drafts = torch.stack([draft_draw_ref(tune[:, k], seed=seed, offset=offset[:, k]) for k in range(S - 1)], 1)
    out = speculative_verify_ref(base, [(tune, 1.0), (ref, -1.0)], tune, drafts, torch.tensor([2, 1, 0]),
                                 seed=seed, offset=offset)
    for r in range(3):
        n = int(out.num_accepted[r])
        assert n <= [2, 1, 0][r]
        for k in range(S):
            if k > n:
                assert out.tokens[r, k] == -1 and torch.isnan(out.input_logprobs[r, k]).all()
                continue
            tok = int(out.tokens[r, k])
            for i, x in enumerate((base, tune, ref)):
                assert out.input_logits[r, k, i] == x[r, k, tok]
                assert torch.isclose(out.input_logprobs[r, k, i], torch.log_softmax(x[r, k], 0)[tok])
            if k < n:
                assert tok == drafts[r, k]


def test_a_bad_row_is_flagged_and_the_others_are_not():
    base, tune, ref = _logits(9, rows=2)
    base[1, 1, 2] = float("nan")
    seed, offset = torch.tensor([4, 5]), torch.arange(S).expand(2, S) * 65536
    drafts = torch.stack([draft_draw_ref(tune[:, k], seed=seed, offset=offset[:, k]) for k in range(S - 1)], 1)
    out = speculative_verify_ref(base, [(tune, 1.0), (ref, -1.0)], tune, drafts, torch.tensor([2, 2]),
                                 seed=seed, offset=offset)
    assert out.ok.tolist() == [True, False] and (out.tokens[1] == -1).all()
    quiet = speculative_verify_ref(base, [(tune, 1.0), (ref, -1.0)], tune, drafts, torch.tensor([2, 0]),
                                   seed=seed, offset=offset)
    assert quiet.ok.tolist() == [True, True], "a NaN at a position the row does not read is no error"


@pytest.mark.parametrize("budget", [1, 200, 500])
def test_rows_verified_in_slices_give_one_call_bit_for_bit(monkeypatch, one_thread, budget):
    """On the CPU the verification takes its rows in slices of at most ``CPU_SAMPLE_BYTES`` of float64
    probabilities (one row per slice at 1 byte, a few at the others): every output is the one call's, bit for bit,
    with per-row temperatures, filters, guide weights and seeds, unequal draft counts, greedy and bad rows; a
    per-row tensor of the wrong length is still refused by name."""
    from ivg_kernels.reference import sampling, speculative as spec

    gen = torch.Generator().manual_seed(9)
    r = 7
    base, tune, ref = (torch.randn(r, S, V, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    base[2, 1, 3] = float("nan")  # a bad row (it reads position 1)
    kw = dict(temperature=torch.tensor([0.7, 1.0, 0.5, 0.0, 1.3, 0.9, 1.0], dtype=torch.float64),
              top_k=torch.tensor([0, 3, 0, 0, 4, 0, 2]), top_p=torch.tensor([1.0, 1, 0.8, 1, 0.9, 1, 1]),
              min_p=torch.tensor([0.0, 0, 0, 0.1, 0, 0.2, 0]), seed=torch.arange(r) * 31 + 1)
    offset = torch.arange(r * S).view(r, S) * 4
    guides = [(tune, torch.linspace(0.5, 1.5, r, dtype=torch.float64)), (ref, -1.0)]
    drafts = torch.stack([spec.draft_draw_ref(tune[:, k], offset=offset[:, k], **kw) for k in range(S - 1)], 1)
    num = torch.tensor([2, 1, 2, 0, 2, 1, 2])
    whole = spec.speculative_verify_ref(base, guides, tune, drafts.clamp(min=0), num, offset=offset, **kw)
    monkeypatch.setattr(sampling, "CPU_SAMPLE_BYTES", budget)
    calls, real = [], spec._verify_rows
    monkeypatch.setattr(spec, "_verify_rows", lambda logits, *a: calls.append(len(logits)) or real(logits, *a))
    sliced = spec.speculative_verify_ref(base, guides, tune, drafts.clamp(min=0), num, offset=offset, **kw)
    assert sum(calls) == r and len(calls) > 1 and (budget > 1 or set(calls) == {1}), calls
    for name in ("num_accepted", "tokens", "logprob", "input_logprobs", "input_logits", "ok"):
        x, y = getattr(whole, name), getattr(sliced, name)
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)) if x.is_floating_point() else torch.equal(x, y), name
    assert whole.ok.tolist() == [True, True, False, True, True, True, True]
    with pytest.raises(ValueError, match="temperature"):
        spec.speculative_verify_ref(base, guides, tune, drafts.clamp(min=0), num, offset=offset,
                                    **{**kw, "temperature": torch.ones(r + 1, dtype=torch.float64)})
