"""Speculative IVG in the paged decoder: greedy output equals plain decoding in every mode, tokens at
temperature > 0 follow the exact warped distribution (the first, and each later one given those before it),
values equal a recomputation for the tokens drawn (tests/test_decoder.py), and no block leaks after
rejections, an error or a finished run."""
import pytest
import torch
from scipy import stats

from ivg.decoder import IVGDecoder
from ivg.naive import NaiveDecoder
from ivg.options import DecodeOptions
from ivg_kernels._args import prepare_sample_args
from ivg_kernels.reference.sampling import warped_probs

from .decoder_fixtures import ivg_models, with_graph_buffers
from .test_decoder import MODES, PROMPTS, _opts, _same


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    return ivg_models(request.param)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_speculation_gives_the_plain_tokens_and_values(models, mode, gamma):
    opts = _opts(mode, temperature=0.0)
    plain = NaiveDecoder(models).generate(PROMPTS, opts)
    dec = IVGDecoder(models)
    spec = dec.generate(PROMPTS, DecodeOptions(**{**opts.__dict__, "speculate": gamma}))
    _same(spec, plain)
    assert dec.last_stats.drafted > 0 and 0 <= dec.last_stats.accepted <= dec.last_stats.drafted
    assert sum(dec.kv_blocks_in_use().values()) == 0


@pytest.mark.parametrize("mode", ["eft", "tokenrm", "ivg"])
def test_the_reference_guide_drafting_gives_the_plain_greedy_tokens(models, mode):
    """``draft="ref"``: the reference guide drafts (and only it runs besides the models the mode needs);
    greedy output equals plain decoding, values included."""
    opts = _opts(mode, temperature=0.0)
    plain = NaiveDecoder(models).generate(PROMPTS, opts)
    dec = IVGDecoder(models)
    spec = dec.generate(PROMPTS, DecodeOptions(**{**opts.__dict__, "speculate": 3, "draft": "ref"}))
    _same(spec, plain)
    assert "ref0" in dec._group.caches and (mode != "tokenrm" or "tune0" not in dec._group.caches)
    assert dec.last_stats.drafted > 0


def test_a_draft_model_that_does_not_exist_is_a_clear_error(models):
    with pytest.raises(ValueError, match=r"draft='base': expected 'auto', 'tune' .* or 'ref'"):
        IVGDecoder(models).generate(PROMPTS, _opts("eft", speculate=2, draft="base"))


@pytest.mark.parametrize("mode,want", [("eft", "tune0"), ("ivg", "tune0"), ("tokenrm", "ref0"), ("plain", "ref0"),
                                       ("cbs", "ref0"), ("bon", "ref0")])
def test_the_automatic_draft_is_the_tuned_guide_only_under_eft_guidance(models, mode, want):
    """``draft="auto"`` (the default): the tuned guide where the sampler adds the guide pair, else the reference
    (the only guide a token-RM run loads then)."""
    opts = _opts(mode, speculate=2, temperature=0.0)
    assert opts.draft == "auto" and opts.resolved(have_guides=True, have_token_rm=True).draft_model == want
    if mode == "tokenrm":
        dec = IVGDecoder(models)
        _same(dec.generate(PROMPTS, opts), NaiveDecoder(models).generate(PROMPTS, _opts(mode, temperature=0.0)))
        assert "ref0" in dec._group.caches and "tune0" not in dec._group.caches


@pytest.mark.parametrize("filt", [dict(), dict(top_k=5), dict(top_p=0.8, min_p=0.02)], ids=["none", "top_k", "top_p+min_p"])
@pytest.mark.parametrize("draft", ["tune", "ref"])
@pytest.mark.parametrize("guidance", ["eft", "tokenrm"])
def test_first_tokens_follow_the_warped_distribution(filt, draft, guidance):
    """3,000 best-of-N candidates of one prompt, two tokens each, speculating 3 with either guide drafting:
    their first tokens against the exact distribution of the sampler (EFT or token-RM guidance,
    temperature 1.3)."""
    models = ivg_models("gpt2")
    n = 3000
    scorer = "implicit" if guidance == "eft" else "explicit"
    opts = DecodeOptions(mode="bon", n=n, num_return=n, scorer=scorer, tokenwise=(guidance,), temperature=1.3,
                         max_new_tokens=2, seed=5, eos_token_ids=(), speculate=3, draft=draft, **filt)
    dec = IVGDecoder(models)
    res = dec.generate(PROMPTS[:1], opts)[0]
    first = torch.tensor([b.tokens[0] for b in res.beams])
    ids = torch.tensor([models.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    g = models.guides[0]
    with torch.no_grad():
        last = [m(ids).logits[:, -1] for m in (models.base, g.tuned, g.ref, models.token_rm)]
    guides = ([(last[1], g.beta), (last[2], -g.beta)] if guidance == "eft"
              else [(last[3], models.token_rm_weight)])
    a = prepare_sample_args(last[0], guides, 1.3, filt.get("top_k", 0), filt.get("top_p", 1.0), filt.get("min_p", 0.0),
                            0, 0, None)
    p = warped_probs(a)[0]
    counts = torch.bincount(first, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0, "a first token outside the filtered support"
    keep = p * n >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([p[keep] * n, (p[~keep] * n).sum().view(1)])
    observed, expected = observed[expected > 0], expected[expected > 0]
    assert stats.chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue > 1e-4
    # some drafts rejected, and (with EFT) some kept: under token-RM guidance and top-k 5 the reference's
    # five tokens can all lie outside the target's, and then every first token is a residual draw
    assert dec.last_stats.accepted < dec.last_stats.drafted and (guidance == "tokenrm" or dec.last_stats.accepted > 0)


def _pit(p, q, tokens, gen):
    """Randomised probability-integral transforms of ``tokens`` [n] under the rows of ``p`` [n, V], each row's
    tokens ordered by ``q / p`` (the draft's favourites last): uniform on (0, 1) exactly when each token was
    drawn from its row of ``p``; a lean towards the draft ``q`` moves them up."""
    order = torch.argsort(q / p, dim=1)
    cdf = p.gather(1, order).cumsum(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p.shape[1]).expand_as(order))
    at = p.gather(1, tokens.unsqueeze(1)).squeeze(1)
    below = cdf.gather(1, rank.gather(1, tokens.unsqueeze(1))).squeeze(1) - at
    return below + torch.rand(len(tokens), generator=gen, dtype=p.dtype) * at


def _surprise_z(p, tokens):
    """z-score of the summed ``log p(token)`` against its law when each token comes from its row of ``p``
    (mean ``-H(p_i)``, variance ``Var_{p_i}(log p)`` per row): a sample from any other distribution tends to
    pick tokens that ``p`` finds less likely, and the score falls."""
    logp = torch.where(p > 0, p.log(), 0.0)
    mean = (p * logp).sum(dim=1)
    var = (p * logp ** 2).sum(dim=1) - mean ** 2
    return float((logp.gather(1, tokens.unsqueeze(1)).squeeze(1) - mean).sum() / var.sum().sqrt())


@pytest.mark.parametrize("filt", [dict(), dict(top_p=0.8, min_p=0.02)], ids=["none", "top_p+min_p"])
@pytest.mark.parametrize("guidance", ["eft", "tokenrm"])
def test_later_tokens_follow_the_warped_distribution_given_the_earlier_ones(filt, guidance):
    """2,000 best-of-N candidates of one prompt, four tokens each, speculating 3 with the tuned guide
    drafting: each candidate's tokens at positions 1 to 3 (kept drafts, the round's last draws, residuals, each
    in its own context) against the exact warped distribution given the tokens before it. The first-token test
    above cannot see a draft model that read a wrong context (under EFT its logits are part of ``p``) or a
    draft tested against another position's distribution; these statistics can: the probability-integral
    transforms (Kolmogorov-Smirnov against uniform) and the summed log-likelihood (a z-score)."""
    models = ivg_models("gpt2")
    n, new = 2000, 4
    scorer = "implicit" if guidance == "eft" else "explicit"
    opts = DecodeOptions(mode="bon", n=n, num_return=n, scorer=scorer, tokenwise=(guidance,), temperature=1.3,
                         max_new_tokens=new, seed=11, eos_token_ids=(), speculate=3, draft="tune", **filt)
    dec = IVGDecoder(models)
    res = dec.generate(PROMPTS[:1], opts)[0]
    assert 0 < dec.last_stats.accepted < dec.last_stats.drafted
    tokens = torch.tensor([b.tokens for b in res.beams])  # [n, new]
    ids = torch.tensor(models.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"])
    x = torch.cat([ids.expand(n, -1), tokens], dim=1)
    g = models.guides[0]
    with torch.no_grad():  # each model's logits before response tokens 0 .. new-1: [n, new, V]
        base, tune, ref, rm = (m(x).logits[:, len(ids) - 1:-1] for m in (models.base, g.tuned, g.ref, models.token_rm))
    warp = dict(temperature=1.3, top_k=0, top_p=filt.get("top_p", 1.0), min_p=filt.get("min_p", 0.0), seed=0,
                offset=0, vocab_size=None)
    gen = torch.Generator().manual_seed(0)
    for k in range(1, new):
        guides = ([(tune[:, k], g.beta), (ref[:, k], -g.beta)] if guidance == "eft"
                  else [(rm[:, k], models.token_rm_weight)])
        p = warped_probs(prepare_sample_args(base[:, k], guides, **warp))
        q = warped_probs(prepare_sample_args(tune[:, k], [], **warp))
        assert (p.gather(1, tokens[:, k:k + 1]) > 0).all(), f"position {k}: a token outside the filtered support"
        u = _pit(p, q, tokens[:, k], gen)
        pv = stats.kstest(u.numpy(), "uniform").pvalue
        z = _surprise_z(p, tokens[:, k])
        assert pv > 1e-4, f"position {k}: KS p = {pv:.2e}, mean transform {u.mean():.3f}"
        assert abs(z) < 4.5, f"position {k}: log-likelihood z = {z:.2f}"


@pytest.mark.parametrize("mode", ["eft", "tokenrm", "ivg"])
def test_sampled_speculation_is_reproducible_and_batch_invariant(models, mode):
    opts = _opts(mode, speculate=2, temperature=0.9)
    together = IVGDecoder(models).generate(PROMPTS, opts)
    alone = [IVGDecoder(models).generate([p], opts)[0] for p in PROMPTS]
    _same(together, alone, tol=1e-12)
    assert any(r.beams[0].tokens != s.beams[0].tokens
               for r, s in zip(together, IVGDecoder(models).generate(PROMPTS, _opts(mode, temperature=0.9))))


@pytest.mark.parametrize("mode", ["eft", "ivg"])
def test_speculation_over_graph_buffers_changes_nothing(models, monkeypatch, mode):
    """Every draft step and every full-width verification through ``ivg.cuda_graphs`` (off CUDA: its
    static, padded buffers run eagerly): the results of the plain forwards, and the verifications of
    ``speculate`` + 1 tokens per row did go through the buffers."""
    opts = _opts(mode, speculate=3, temperature=0.9, max_new_tokens=12)
    plain = IVGDecoder(models, block_size=4)
    want = plain.generate(PROMPTS, opts)
    assert plain.last_stats.graph_replays == 0
    with_graph_buffers(monkeypatch)
    dec = IVGDecoder(models, block_size=4)
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    assert dec.last_stats.graph_replays == sum(pm.graphs.replays for pm in dec._paged.values()) > 0
    keys = {n: set(pm.graphs._graphs) for n, pm in dec._paged.items()}
    assert any(k[3] == 4 for n, ks in keys.items() if n != "tune0" for k in ks), keys  # verifications
    assert any(k[3] == 1 for k in keys["tune0"]), keys  # draft steps
    assert sum(dec.kv_blocks_in_use().values()) == 0


def _verify_widths(monkeypatch):
    """Spy on the rounds: per verification, the tokens each row read."""
    from ivg import speculative_loop

    seen, real = [], speculative_loop.SpeculativeLoop._verify

    def spy(self, rows, drafts_of, *a):
        seen.append([g + 1 for g in drafts_of])
        return real(self, rows, drafts_of, *a)

    monkeypatch.setattr(speculative_loop.SpeculativeLoop, "_verify", spy)
    return seen


@pytest.mark.parametrize("mode", ["eft", "tokenrm", "ivg"])
def test_rounds_padded_to_equal_widths_give_the_same_results(models, monkeypatch, mode):
    """Where forwards replay CUDA graphs, a round in which rows may draft unequal numbers (near a chunk
    boundary or the length limit) is padded so that every row reads as many tokens: the extra drafts are
    never tested and are cut from the caches, so tokens and values are those of the ragged rounds."""
    from ivg import speculative_loop

    opts = _opts(mode, speculate=3, temperature=0.9, max_new_tokens=13)
    seen = _verify_widths(monkeypatch)
    monkeypatch.setattr(speculative_loop, "PAD_ROUNDS", False)
    want = IVGDecoder(models, block_size=4).generate(PROMPTS, opts)
    assert any(len(set(w)) > 1 for w in seen), "precondition: some ragged round"
    seen.clear()
    monkeypatch.setattr(speculative_loop, "PAD_ROUNDS", True)
    dec = IVGDecoder(models, block_size=4)
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    assert seen and all(len(set(w)) == 1 for w in seen), seen
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_a_round_that_padding_would_take_past_the_positions_stays_ragged(models, monkeypatch):
    """Best-of-5 of a prompt whose length plus ``max_new_tokens`` is exactly the models' 96 positions: the
    rounds that padding would take past them stay ragged, with the results of unpadded rounds."""
    from ivg import speculative_loop

    prompt = [5 + i % 20 for i in range(96 - 10)]  # 86 token ids, 10 new tokens
    opts = _opts("bon", speculate=3, temperature=0.9, max_new_tokens=10, eos_token_ids=())
    monkeypatch.setattr(speculative_loop, "PAD_ROUNDS", False)
    want = IVGDecoder(models, block_size=4).generate([prompt], opts)
    seen = _verify_widths(monkeypatch)
    monkeypatch.setattr(speculative_loop, "PAD_ROUNDS", True)
    got = IVGDecoder(models, block_size=4).generate([prompt], opts)
    _same(got, want, tol=1e-6)
    assert all(len(b.tokens) == 10 for b in got[0].beams)
    assert any(len(set(w)) > 1 for w in seen), seen  # a round left ragged
    assert any(len(w) > 1 and len(set(w)) == 1 for w in seen), seen  # and padded (or equal) ones


def test_no_block_leaks_after_an_error_in_a_round(models, monkeypatch):
    from ivg import round_graphs

    dec = IVGDecoder(models)
    calls, real = [], round_graphs.speculative_verify

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("verification failed")
        return real(*a, **k)

    monkeypatch.setattr(round_graphs, "speculative_verify", flaky)
    with pytest.raises(RuntimeError, match="verification failed"):
        dec.generate(PROMPTS, _opts("ivg", speculate=3))
    assert set(dec.kv_blocks_in_use().values()) == {0}
    monkeypatch.setattr(round_graphs, "speculative_verify", real)
    _same(dec.generate(PROMPTS, _opts("ivg", speculate=3)), IVGDecoder(models).generate(PROMPTS, _opts("ivg", speculate=3)))


def test_a_row_past_its_chunk_boundary_is_an_error_not_a_hang(models, monkeypatch):
    """A row that held more tokens than its chunk allows would never reach the boundary its prompt waits at (a
    drafting bug did that: the run looped forever). It is refused with an error, and the caches are left empty."""
    from ivg.speculative_loop import SpeculativeLoop

    real = SpeculativeLoop._update

    def one_too_many(self, rows, gam, record):
        kept = real(self, rows, gam, record)
        req, b = rows[0]
        if not b.finished:  # the first row takes one more token than the round gave it
            b.tokens.append(b.tokens[-1])
        return kept

    monkeypatch.setattr(SpeculativeLoop, "_update", one_too_many)
    dec = IVGDecoder(models)
    with pytest.raises(RuntimeError, match="past its chunk boundary"):
        dec.generate(PROMPTS, _opts("ivg", speculate=3, eos_token_ids=()))
    assert set(dec.kv_blocks_in_use().values()) == {0}


def test_a_flagged_draft_is_reported_never_fed_and_leaks_nothing(models, monkeypatch):
    """Drafts stay on the device within a round: a draft the draft model could not draw (-1, NaN logits)
    feeds the next draft forward as 0 and is reported by the round's one read of the device."""
    from ivg import speculative_loop

    calls, real = [], speculative_loop.draft_sample

    def poisoned(*a, **k):
        calls.append(1)
        d = real(*a, **k)
        return torch.where(torch.arange(len(d), device=d.device) == 0, -1, d) if len(calls) == 4 else d

    monkeypatch.setattr(speculative_loop, "draft_sample", poisoned)
    dec = IVGDecoder(models)
    with pytest.raises(RuntimeError, match="the draft model's logits held NaN/inf"):
        dec.generate(PROMPTS, _opts("eft", speculate=3))
    assert set(dec.kv_blocks_in_use().values()) == {0}
    monkeypatch.setattr(speculative_loop, "draft_sample", real)
    dec.generate(PROMPTS, _opts("eft", speculate=3, eos_token_ids=()))
    st = dec.last_stats
    assert st.host_reads == st.steps, "one read of the device per round"


def test_the_accepted_count_is_the_drafts_the_responses_took(models):
    """``RunStats.accepted`` counts the drafts a response took: a round takes its kept drafts and one token more,
    unless the response finishes (here at EOS) on a kept draft, and the drafts kept after that are not taken. For
    one prompt's one row (eft) every round but the last thus gives exactly one token that is not a draft, and the
    last one or none: ``new_tokens - accepted`` is ``steps`` or ``steps - 1``. A third of the vocabulary as EOS
    ends responses inside their rounds."""
    vocab = models.base.config.vocab_size
    eos = tuple(range(0, vocab, 3))
    inside = 0
    for seed in range(6):
        for prompt in PROMPTS:
            dec = IVGDecoder(models)
            dec.generate([prompt], _opts("eft", speculate=4, eos_token_ids=eos, seed=seed))
            s = dec.last_stats
            assert s.accepted <= s.drafted and s.steps - 1 <= s.new_tokens - s.accepted <= s.steps, (seed, prompt)
            inside += s.new_tokens - s.accepted == s.steps - 1
    assert inside  # some response finished on a kept draft


def test_bad_speculate_values_are_named():
    models = ivg_models("gpt2")
    for bad, match in ((-1, "speculate=-1"), (1.5, "speculate=1.5"), (True, "speculate=True")):
        with pytest.raises(ValueError, match=match):
            IVGDecoder(models).generate(PROMPTS, _opts("eft", speculate=bad))
    from ivg.models import IVGModels

    with pytest.raises(ValueError, match="speculate=2: the naive baseline does not speculate"):
        NaiveDecoder(models).generate(PROMPTS, _opts("eft", speculate=2))
    with pytest.raises(ValueError, match="speculate=2: needs a .tuned, ref. guide pair"):
        IVGDecoder(IVGModels(models.base, tokenizer=models.tokenizer)).generate(PROMPTS, _opts("plain", speculate=2))
    for bad, match in ((dict(speculate=0, speculate_adapt=True), "speculate_adapt=True: expected speculate >= 1"),
                       (dict(speculate=2, speculate_adapt=1), "speculate_adapt=1: expected True or False")):
        with pytest.raises(ValueError, match=match):
            IVGDecoder(models).generate(PROMPTS, _opts("eft", **bad))


@pytest.mark.parametrize("mode", ["eft", "ivg"])
def test_adapting_drafts_give_the_tokens_of_a_fixed_count(models, mode):
    """``speculate_adapt``: the drafts per round move within [1, speculate] with how many were kept
    (``RunStats.gammas``), and tokens and values are those of a fixed ``speculate``: each position is decided
    by the same draft, test and residual whatever the round's length."""
    opts = _opts(mode, temperature=0.9, max_new_tokens=12)
    dec = IVGDecoder(models)
    fixed = dec.generate(PROMPTS, DecodeOptions(**{**opts.__dict__, "speculate": 4}))
    assert set(dec.last_stats.gammas) == {4}
    adapted = dec.generate(PROMPTS, DecodeOptions(**{**opts.__dict__, "speculate": 4, "speculate_adapt": True}))
    gammas = dec.last_stats.gammas
    _same(adapted, fixed)
    assert gammas[0] == 4 and len(set(gammas)) > 1 and all(1 <= g <= 4 for g in gammas), gammas
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_the_decoder_uses_the_fused_verification_where_it_applies(monkeypatch):
    """backend='triton' (the interpreter here): rounds go through the fused kernel when no filter is set,
    and greedy output still equals plain decoding; with top-p they use the reference."""
    from ivg_kernels._triton import speculative_kernels

    models = ivg_models("gpt2", dtype=torch.float32)
    calls, real = [], speculative_kernels.launch_speculative_verify
    monkeypatch.setattr(speculative_kernels, "launch_speculative_verify", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = _opts("eft", temperature=0.0, max_new_tokens=8)
    plain = IVGDecoder(models, backend="reference").generate(PROMPTS[:2], opts)
    spec = IVGDecoder(models, backend="triton").generate(PROMPTS[:2], DecodeOptions(**{**opts.__dict__, "speculate": 2}))
    assert [r.beams[0].tokens for r in spec] == [r.beams[0].tokens for r in plain]
    assert calls, "the fused kernel was not used"
    calls.clear()
    IVGDecoder(models, backend="triton").generate(PROMPTS[:1], _opts("eft", temperature=0.8, top_p=0.9,
                                                                     max_new_tokens=4, speculate=2))
    assert not calls, "top-p rounds must use the reference"


def test_fused_draft_draws_give_the_reference_tokens(monkeypatch):
    """backend='triton' (the interpreter here): the drafts of sampled rounds are drawn by the fused draft
    kernel where it applies, and the output equals the reference backend's for the same seed."""
    from ivg_kernels._triton import speculative_kernels

    models = ivg_models("gpt2", dtype=torch.float32)
    calls, real = [], speculative_kernels.DraftLaunch.__call__  # (every launch of the draft kernel, remembered or not)
    monkeypatch.setattr(speculative_kernels.DraftLaunch, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = _opts("eft", temperature=0.9, max_new_tokens=6, speculate=3)
    want = IVGDecoder(models, backend="reference").generate(PROMPTS[:2], opts)
    got = IVGDecoder(models, backend="triton").generate(PROMPTS[:2], opts)
    assert calls, "the fused draft kernel was not used"
    assert [r.beams[0].tokens for r in got] == [r.beams[0].tokens for r in want]
    calls.clear()
    IVGDecoder(models, backend="triton").generate(PROMPTS[:1], _opts("eft", temperature=0.8, top_k=3,
                                                                     max_new_tokens=4, speculate=2))
    assert not calls, "top-k drafts must use the reference"


@pytest.mark.parametrize("mode", ["eft", "ivg", "bon"])
def test_the_output_does_not_depend_on_how_many_tokens_are_drafted(models, mode):
    """Every position is decided by the same rule (a draft from q, the test, the residual), so at
    temperature > 0 any speculate >= 1 gives the same tokens and values for a seed. A speculate past the response
    length drafts what is left (it sized the KV pools by max_new_tokens + speculate: 10**9 asked for 10**8 blocks)."""
    outs = []
    for gamma in (1, 2, 4, 10 ** 9):
        dec = IVGDecoder(models)
        outs.append(dec.generate(PROMPTS, _opts(mode, speculate=gamma, temperature=0.9, top_p=0.95)))
        assert dec.last_stats.accepted > 0
    for out in outs[1:]:
        _same(outs[0], out)
