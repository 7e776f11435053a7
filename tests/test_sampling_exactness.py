"""One token per key on every backend: ties at tiny temperatures, exact top-p/min-p boundaries,
near-ties, the IEEE-only transcendentals, and eager calls that keep no argument alive."""
import gc
import math
import weakref

import pytest
import torch
from scipy import stats

import ivg_kernels
from ivg_kernels._args import prepare_sample_args
from ivg_kernels.reference import portable
from ivg_kernels.reference.sampling import _guided_sample_ref, _warp

from .helpers import (DEVICE, args_to, count_fallbacks, interpreter_only, requires_ptxas, requires_triton,
                      run_compiled)

def _draw(logits, n, **kw):
    """n reference draws from one row (offsets 0..n-1)."""
    out = ivg_kernels.guided_sample(logits.expand(n, -1), seed=11, offset=torch.arange(n), backend="reference", **kw)
    assert out.ok.all()
    return out.tokens, out.logprob


def _same_as_reference(logits, rows, block=16, **kw):
    """The Triton kernel's draws on ``rows`` copies of a row equal the reference's (interpreter: few rows)."""
    from ivg_kernels.sampling import _guided_sample_triton

    a = prepare_sample_args(logits.expand(rows, -1), (), kw.get("temperature", 1.0), kw.get("top_k", 0),
                            kw.get("top_p", 1.0), kw.get("min_p", 0.0), 11, torch.arange(rows), None)
    ref, tri = _guided_sample_ref(a), _guided_sample_triton(args_to(a), block=block)
    assert torch.equal(ref.tokens, tri.tokens.cpu())
    torch.testing.assert_close(tri.logprob.cpu(), ref.logprob, rtol=1e-5, atol=1e-6)


TIED = torch.tensor([[1.0, 3.0, 0.5, 3.0, 2.0, 3.0, -1.0]])
TINY = [1e-2, 1e-6, 1e-7, 1e-30]


@pytest.mark.parametrize("temperature", TINY)
def test_ties_stay_uniform_at_tiny_temperatures(temperature):
    """Three tokens tied at the maximum: uniform at any temperature, not the lowest id."""
    tokens, logprob = _draw(TIED, 4000, temperature=temperature)
    counts = torch.bincount(tokens, minlength=7)
    assert counts[[0, 2, 4, 6]].sum() == 0, counts.tolist()
    res = stats.chisquare(counts[[1, 3, 5]].numpy())
    assert res.pvalue > 1e-4, f"T={temperature}: counts {counts.tolist()} (p={res.pvalue:.1e})"
    torch.testing.assert_close(logprob, torch.full_like(logprob, -math.log(3)), rtol=0, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("temperature", TINY)
def test_kernel_draws_ties_like_the_reference(temperature):
    _same_as_reference(TIED, 48, block=4, temperature=temperature)


BOUNDARY = torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log()


@requires_triton
@pytest.mark.parametrize("ties", [[300, 262, 258, 700], [900, 300], [9, 12]],
                         ids=["within-and-across", "across", "within"])
def test_greedy_ties_take_the_lowest_id_within_and_across_slices(ties):
    """Temperature 0 draws the first index of the maximum, as the reference does, also where the tied maxima lie
    in one slice of the row (its own first index) or in several (the lowest of the slices' firsts)."""
    row = torch.zeros(1, 1000)
    row[0, ties] = 2.0
    out = ivg_kernels.guided_sample(row, temperature=0.0, seed=0, offset=0, backend="reference")
    assert out.tokens.tolist() == [min(ties)]
    _same_as_reference(row, 2, block=256, temperature=0.0)  # slices of one granule, 256 tokens: 0-255, 256-511, ...


def test_top_p_mass_exactly_at_p_keeps_the_nucleus_only():
    """log([0.3, 0.1, 0.1, 0.5]) with top_p=0.8: the nucleus is {0, 3}, as Hugging Face's warper keeps."""
    tokens, _ = _draw(BOUNDARY, 4000, top_p=0.8)
    counts = torch.bincount(tokens, minlength=4)
    assert counts[1] == 0 and counts[2] == 0, counts.tolist()
    res = stats.binomtest(int(counts[3]), 4000, 0.5 / 0.8)
    assert res.pvalue > 1e-4, counts.tolist()


@requires_triton
def test_kernel_keeps_the_same_nucleus_at_the_boundary():
    _same_as_reference(BOUNDARY, 32, block=4, top_p=0.8)


# The nucleus reaches its target exactly at its first token: that token's integer mass, 2**40 (it is the max), equals
# nucleus_target(p, total) for the row's total 2**40 + 1,114,113 (the second token's mass) at p = 1 - 2**-24.
EXACT_REACH = torch.tensor([[0.0, -13.80231761932373]])
TOP_P_EXACT = 1 - 2 ** -24  # a float32 value


def test_a_nucleus_ends_at_the_first_token_that_reaches_its_target_exactly():
    """The top-p set is the top tokens up to the first whose cumulative integer mass reaches (>=, not >) the
    target: the second token is dropped, so every draw is token 0 with log-prob 0 exactly."""
    masses = portable.mass_int(EXACT_REACH[0] - EXACT_REACH[0].max())
    assert masses.tolist() == [2 ** 40, 1_114_113]  # the construction
    assert portable.nucleus_target(torch.tensor([TOP_P_EXACT]), masses.sum().view(1)).item() == 2 ** 40
    tokens, logprob = _draw(EXACT_REACH, 64, top_p=TOP_P_EXACT)
    assert (tokens == 0).all() and (logprob == 0).all(), (tokens.tolist(), logprob.tolist())


@requires_triton
def test_kernel_ends_the_nucleus_where_the_reference_does():
    from ivg_kernels.sampling import _guided_sample_triton

    a = prepare_sample_args(EXACT_REACH.expand(8, -1), (), 1.0, 0, TOP_P_EXACT, 0.0, 11, torch.arange(8), None)
    tri = _guided_sample_triton(args_to(a), block=4)
    assert (tri.tokens.cpu() == 0).all() and (tri.logprob.cpu() == 0).all(), tri.logprob.tolist()


def test_the_gumbel_winner_is_decided_on_the_exact_sum(monkeypatch):
    """A filtered row draws the kept token with the largest ``x + g`` summed exactly, not as rounded: here both
    float32 sums round to 1 + 2**-23, and the exact ones are 1 + 2**-24 + 2**-30 and 1 + 2**-23 (noise injected),
    so the second token wins, whichever column it stands in."""
    from ivg_kernels.reference import sampling

    for order in ([0, 1], [1, 0]):
        x = torch.tensor([[1.0, 1.0 + 2 ** -23]])[:, order]
        g = torch.tensor([[2 ** -24 + 2 ** -30, 0.0]])[:, order]
        assert (x + g)[0, 0] == (x + g)[0, 1]  # a tie once rounded
        monkeypatch.setattr(sampling, "gumbel_noise", lambda seed, offset, ids, g=g: g)
        won = sampling._gumbel_argmax(x, torch.ones_like(x, dtype=torch.bool), torch.tensor([1]), torch.tensor([0]),
                                      torch.arange(2))
        assert won.tolist() == [order.index(1)]


def _boundary_rows(gen, n, v):
    """Rows of dyadic probabilities, so that partial sums land exactly on round top-p and min-p values."""
    weights = torch.randint(1, 9, (n, v), generator=gen).double()
    return (weights / weights.sum(1, keepdim=True)).log().float()


@requires_triton
@pytest.mark.parametrize("setting", [dict(top_p=0.5), dict(top_p=0.75), dict(top_p=0.25, temperature=0.5),
                                     dict(min_p=0.25), dict(min_p=0.5, top_p=0.875), dict(top_k=3, top_p=0.5)])
def test_kernel_and_reference_agree_on_exact_boundaries(setting):
    """Masses that sum to top_p exactly, and tokens exactly at min_p * max: same kept set, same token."""
    gen = torch.Generator().manual_seed(len(str(setting)))
    n, v = 24, 8
    logits = _boundary_rows(gen, n, v)
    a = args_to(prepare_sample_args(logits, (), setting.get("temperature", 1.0), setting.get("top_k", 0),
                                    setting.get("top_p", 1.0), setting.get("min_p", 0.0), 5, torch.arange(n), None))
    from ivg_kernels.sampling import _guided_sample_triton

    ref, tri = _guided_sample_ref(a), _guided_sample_triton(a, block=16)
    assert torch.equal(ref.tokens.cpu(), tri.tokens.cpu())
    torch.testing.assert_close(tri.logprob.cpu(), ref.logprob.cpu(), rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("temperature", [1.0, 1e-3, 1e-8])
def test_kernel_and_reference_agree_on_near_ties(temperature):
    """Many tokens one or two ulps apart, across slices: the exact-sum comparison decides identically."""
    gen = torch.Generator().manual_seed(3)
    n, v = 12, 300
    top = torch.tensor(4.0)
    steps = torch.randint(0, 3, (n, v), generator=gen)
    logits = top.expand(n, v).clone()
    for _ in range(2):  # 0, 1 or 2 ulps below the top
        logits = torch.where(steps > _, torch.nextafter(logits, torch.tensor(-math.inf)), logits)
    logits[:, ::7] -= 3.0
    a = args_to(prepare_sample_args(logits, [(torch.zeros(n, v), 0.5)], temperature, 0, 1.0, 0.0,
                                    torch.arange(n) * 7919, 3, None))
    from ivg_kernels.sampling import _guided_sample_triton

    ref, tri = _guided_sample_ref(a), _guided_sample_triton(a, block=64)
    assert torch.equal(ref.tokens.cpu(), tri.tokens.cpu())


@requires_triton
@pytest.mark.parametrize("setting", [dict(top_k=20), dict(top_k=50), dict(top_p=0.5), dict(top_k=30, top_p=0.9),
                                     dict(min_p=0.999)])
def test_kernel_candidates_among_values_closer_than_their_sort_key(setting):
    """Stage 1 sorts candidates by a 32-bit key that keeps only the float's high bits: 40 tokens per slice
    within 2**-17 of each other tie on it, so the candidates it keeps are not the top 16 by value. The
    kept set and the token must still be the reference's (by the exact path or the full-row fallback)."""
    from ivg_kernels.sampling import _guided_sample_triton

    gen = torch.Generator().manual_seed(len(str(setting)))
    n, v = 6, 700
    logits = torch.randn(n, v, generator=gen) - 3.0
    for start in (0, 256, 512):
        near = start + torch.randperm(150, generator=gen)[:40]
        logits[:, near] = 5.0 + torch.rand(n, 40, generator=gen) * 2.0 ** -15
    a = args_to(prepare_sample_args(logits, (), 1.0, setting.get("top_k", 0), setting.get("top_p", 1.0),
                                    setting.get("min_p", 0.0), torch.arange(n) + 99, 4, None))
    ref = _guided_sample_ref(a)
    tri = _guided_sample_triton(a, block=256)
    assert torch.equal(ref.tokens, tri.tokens.cpu())
    torch.testing.assert_close(tri.logprob.cpu(), ref.logprob, rtol=1e-5, atol=1e-5)


@requires_triton
def test_a_top_k_threshold_equal_to_the_cut_keeps_the_ties_left_out_of_the_candidates():
    """17 tokens tied at the top of one slice, top-k 16: stage 1 keeps 16 of them (the lowest ids) as candidates,
    and the cut, the bound on every other token's key, is the float's high bits with its 12 low bits set. For a
    value whose key ends in 12 set bits, the k-th key equals the cut, so a tied token outside the candidates may
    hold it: the exact path over the candidates would drop it. Top-k keeps every tie at the k-th value (the
    reference), and the kernel's exact path needs a threshold above the cut: it falls back and draws all 17, each
    as the reference does. (Two checks keep such a row from the exact path, the top-k set's and the threshold's
    against the cut; either is enough, and with both loosened to ``>=`` the 17th tie is never drawn.)"""
    from ivg_kernels.sampling import _guided_sample_triton

    tie = torch.tensor([0x3F800FFF], dtype=torch.int32).view(torch.float32).item()  # 1.000488..., key low bits 0xFFF
    n, v = 48, 64
    logits = torch.full((n, v), -4.0)
    logits[:, 3:20] = tie  # ids 3 .. 19
    a = prepare_sample_args(logits, (), 1.0, 16, 1.0, 0.0, 5, torch.arange(n), None)
    ref = _guided_sample_ref(a)
    assert set(ref.tokens.tolist()) == set(range(3, 20)), "precondition: the reference draws every tie, 19 too"
    tri = _guided_sample_triton(args_to(a), block=256)
    assert torch.equal(ref.tokens, tri.tokens.cpu())
    torch.testing.assert_close(tri.logprob.cpu(), ref.logprob, rtol=1e-5, atol=1e-6)


# --- the unfiltered draw: inverse CDF over 256-token granules -----------------------------------

def _granule_rows(gen, n, v):
    """Rows whose mass spreads over several granules, with a last partial granule and a granule of -inf."""
    logits = torch.randn(n, v, generator=gen) * 1.5
    logits[:, 300:] += 2.0  # the max tends to lie in a later granule than the first
    logits[:, 256:512] = -math.inf  # a whole granule that can never be drawn
    return logits


def _peaked_rows(n, v, gen):
    """Rows like a language model's: N(0, 1) plus a Zipf-like head of 64 tokens (bench_sampling's "peaked")."""
    x = torch.randn(n, v, generator=gen)
    head = torch.randint(0, v, (n, 64), generator=gen)
    x.scatter_(1, head, (12.0 - 2.5 * torch.log(torch.arange(1, 65, dtype=torch.float32))).expand(n, 64))
    return x


@interpreter_only
@pytest.mark.parametrize("kind,top_p,expect_fallback", [("peaked", 0.9, False), ("peaked", 0.95, False),
                                                         ("flat", 0.9, True)])
def test_top_p_rows_take_the_fallback_only_when_the_nucleus_outgrows_the_candidates(monkeypatch, kind, top_p,
                                                                                   expect_fallback):
    """A top-p row without top-k measures its nucleus against the granules' total from stage 1, so a
    nucleus among the candidates is exact without a pass over the row (before, the tail's mass left the
    total unknown and every such row took about 33 full passes). Flat rows, whose nucleus holds most of
    the vocabulary, still take the fallback (the pool, or full-row passes). Tokens equal the reference's
    either way."""
    from ivg_kernels._triton import sampling_kernels as sk
    from ivg_kernels.sampling import _guided_sample_triton

    counters = count_fallbacks(monkeypatch)
    monkeypatch.setattr(sk, "MAX_CANDIDATES", 16)  # the coverage expected below (the default; tune_stage1 varies it)
    gen = torch.Generator().manual_seed(3)
    n, v = 3, 4096
    rows = [_peaked_rows(n, v, gen) if kind == "peaked" else torch.randn(n, v, generator=gen) for _ in range(3)]
    a = prepare_sample_args(rows[0], [(rows[1], 1.0), (rows[2], -1.0)], 0.7, 0, top_p, 0.0, 5, torch.arange(n), None)
    got = _guided_sample_triton(a, block=256)  # 16 slices of 16 candidates
    assert torch.equal(got.tokens, _guided_sample_ref(a).tokens)
    assert counters.total() == (n if expect_fallback else 0), f"{counters.total()} of {n} rows took the fallback"


@interpreter_only
@pytest.mark.parametrize("setting", [dict(top_k=40), dict(top_k=40, top_p=0.9), dict(min_p=0.001)])
def test_likely_tokens_at_low_ids_stay_among_the_candidates(monkeypatch, setting):
    """Byte-level BPE vocabularies number their frequent tokens first, so a model's likely next tokens crowd
    the low ids. A slice holds every S-th granule of the row, not a contiguous run, so those tokens spread
    over the slices' candidates: 48 likely tokens among the first 2,048 ids (one slice of 2,048 contiguous
    ids would hold them all, and keep 16) need no fallback, and the tokens are the reference's."""
    from ivg_kernels._triton import sampling_kernels as sk
    from ivg_kernels.sampling import _guided_sample_triton

    counters = count_fallbacks(monkeypatch)
    monkeypatch.setattr(sk, "MAX_CANDIDATES", 16)  # the coverage expected below (the default; tune_stage1 varies it)
    gen = torch.Generator().manual_seed(8)
    n, v = 3, 8192
    logits = torch.randn(n, v, generator=gen)
    head = torch.stack([torch.randperm(2048, generator=gen)[:48] for _ in range(n)])
    logits.scatter_(1, head, (12.0 - 2.0 * torch.log(torch.arange(1, 49, dtype=torch.float32))).expand(n, 48))
    a = prepare_sample_args(logits, (), 0.8, setting.get("top_k", 0), setting.get("top_p", 1.0),
                            setting.get("min_p", 0.0), 7, torch.arange(n), None)
    got = _guided_sample_triton(a, block=2048)  # 4 slices of 8 granules
    assert torch.equal(got.tokens, _guided_sample_ref(a).tokens)
    assert not counters.total(), f"{counters.total()} of {n} rows took the fallback"


@interpreter_only
@pytest.mark.parametrize("kind", ["ranked", "flat"])
def test_candidate_coverage_predicts_the_kernels_fallbacks(monkeypatch, kind):
    """benchmarks/candidate_coverage.py replays stage 2's candidate test in torch to predict fallbacks at shapes
    the interpreter cannot run; on small rows its count of unproven rows is the kernel's count of fallbacks."""
    from benchmarks.bench_sampling import make_rows
    from benchmarks.candidate_coverage import proven
    from ivg_kernels._triton import sampling_kernels as sk
    from ivg_kernels.sampling import _guided_sample_triton

    counters = count_fallbacks(monkeypatch)
    n, v, block = 4, 6144, 1024  # 6 slices of 4 granules
    base, tune, ref = make_rows(kind, n, v, torch.device("cpu"), torch.Generator().manual_seed(v))
    for k, p, mp in ((12, 1.0, 0.0), (60, 1.0, 0.0), (0, 0.95, 0.0), (0, 1.0, 0.02), (30, 0.9, 0.0)):
        a = prepare_sample_args(base.float(), [(tune.float(), 1.0), (ref.float(), -1.0)], 0.7, k, p, mp, 3,
                                torch.arange(n), None)
        x, x_max = _warp(a)[:2]
        predicted = n - int(proven(x, x_max, dict(top_k=k, top_p=p, min_p=mp), block, "strided").sum())
        counters.reset()
        got = _guided_sample_triton(a, block=block)
        assert torch.equal(got.tokens, _guided_sample_ref(a).tokens)
        assert counters.total() == predicted, (f"top_k={k} top_p={p} min_p={mp}: {counters.total()} fallbacks, "
                                               f"{predicted} predicted")


def test_unfiltered_draw_follows_the_softmax_across_granules():
    gen = torch.Generator().manual_seed(5)
    v, n = 700, 20_000  # granules [0, 256), [256, 512) (all -inf), [512, 700)
    row = _granule_rows(gen, 1, v)
    tokens, logprob = _draw(row, n, temperature=0.9)
    p = torch.softmax(row[0].double() / 0.9, 0)
    assert not ((tokens >= 256) & (tokens < 512)).any()
    counts = torch.bincount(tokens, minlength=v).double()
    # Tokens in groups of about equal expected count, so that every cell expects at least 20 draws.
    order = p.argsort()
    groups = (p[order].cumsum(0) * n / 20).floor().clamp(max=n / 20 - 1).long()
    obs = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, counts[order])
    exp = torch.zeros_like(obs).index_add_(0, groups, p[order] * n)
    res = stats.chisquare(obs[exp > 0].numpy(), exp[exp > 0].numpy())
    assert (exp > 0).sum() > 100 and res.pvalue > 1e-4, f"chi-square p={res.pvalue:.1e}"
    torch.testing.assert_close(logprob.double(), p[tokens].log(), rtol=0, atol=1e-5)


@requires_triton
def test_kernel_draw_does_not_depend_on_the_slice_width():
    """Granules are part of the definition: slices of 1, 2 or 4 granules draw the reference's tokens."""
    from ivg_kernels.sampling import _guided_sample_triton

    gen = torch.Generator().manual_seed(6)
    n, v = 6, 1100
    logits = _granule_rows(gen, n, v)
    guide = torch.randn(n, v + 5, generator=gen).to(torch.bfloat16)
    a = args_to(prepare_sample_args(logits, [(guide, -0.75)], torch.rand(n, generator=gen) + 0.3, 0, 1.0, 0.0,
                                    torch.arange(n) * 31337, torch.arange(n) + 40, None))
    ref = _guided_sample_ref(a)
    assert ref.ok.all()
    for block in (256, 512, 1024):
        tri = _guided_sample_triton(a, block=block)
        assert torch.equal(ref.tokens, tri.tokens.cpu()), f"block {block}"
        torch.testing.assert_close(tri.logprob.cpu(), ref.logprob, rtol=1e-5, atol=1e-5)


def test_draw_uniforms_use_53_bits_and_their_own_counter():
    from ivg_kernels.reference.philox import philox_words
    from ivg_kernels.reference.sampling import DRAW_COUNTER, draw_uniforms

    seed, offset = torch.arange(4096), torch.full((4096,), 9)
    u1, u2 = draw_uniforms(seed, offset)
    assert u1.dtype == torch.float64 and bool(((u1 >= 0) & (u1 < 1) & (u2 >= 0) & (u2 < 1)).all())
    assert (u1 * 2.0 ** 53 % 2 ** 22 != 0).float().mean() > 0.99, "the low bits come from the second word"
    assert stats.kstest(torch.cat([u1, u2]).numpy(), "uniform").pvalue > 1e-4
    w = philox_words(seed[:1], offset[:1], torch.tensor([4 * DRAW_COUNTER]))
    assert float(u1[0]) == ((int(w[0, 0]) << 21) + (int(philox_words(seed[:1], offset[:1], torch.tensor(
        [4 * DRAW_COUNTER + 1]))[0, 0]) >> 11)) * 2.0 ** -53
    assert DRAW_COUNTER > (1 << 30), "above every token's counter (token id >> 2)"


def test_plog_and_mass_int_are_accurate():
    u = (torch.arange(1, 1 << 23, 37, dtype=torch.int64) * 2 + 1).float() * 2.0 ** -24  # the uniforms' grid
    err = (portable.plog(u).double() - u.double().log()).abs() / u.double().log().abs()
    assert err.max() < 4 * 2.0 ** -24, f"plog: {err.max().item():.2e} relative"
    x = torch.logspace(-7.5, 1.3, 10_001)  # the outer log's domain
    err = (portable.plog(x).double() - x.double().log()).abs()
    assert err.max() < 1e-6
    d = -torch.linspace(0, 12, 10_001)
    mass = portable.mass_int(d).double() / 2.0 ** 40
    torch.testing.assert_close(mass, d.double().exp(), rtol=1e-6, atol=2.0 ** -40)
    assert portable.mass_int(torch.tensor([0.0, -math.inf, -31.0])).tolist() == [2 ** 40, 0, 0]


try:
    import triton
    import triton.language as tl

    from ivg_kernels._triton.sampling_kernels import _mass_int, _plog

    @triton.jit
    def _portable_kernel(x_ptr, d_ptr, log_out, mass_out, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(log_out + i, _plog(tl.load(x_ptr + i)))
        tl.store(mass_out + i, _mass_int(tl.load(d_ptr + i)))

except ImportError:  # the parity test is skipped
    pass


@requires_triton
def test_triton_twins_of_plog_and_mass_int_give_the_same_bits():
    gen = torch.Generator().manual_seed(0)
    block = 4096
    x = torch.rand(block, generator=gen) * 17 + 1e-7
    d = -torch.rand(block, generator=gen) * 35
    d[:4] = torch.tensor([0.0, -math.inf, -1e-30, -29.5])
    log_out, mass_out = torch.empty(block, device=DEVICE), torch.empty(block, dtype=torch.int64, device=DEVICE)
    _portable_kernel[(1,)](x.to(DEVICE), d.to(DEVICE), log_out, mass_out, BLOCK=block, enable_fp_fusion=False)
    assert torch.equal(log_out.cpu().view(torch.int32), portable.plog(x).view(torch.int32))
    assert torch.equal(mass_out.cpu(), portable.mass_int(d))


# --- eager calls keep nothing alive ---------------------------------------------------------------

_LEAK_SCRIPT = r"""
import gc, weakref, torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import compile_offline as co
from ivg_kernels._triton import sampling_kernels as sk

launches = []  # the kernels compile for sm_90 and each launch is recorded, not made (no GPU here)

def call(fn, i):
    x, g = torch.randn(2, 100), torch.randn(2, 100)
    ref = weakref.ref(x)
    fn(x, [g], [0.5], None, None, 1.0, None, 0, None, 1.0, None, 0.0, None, 1, None, i, 100, False, 0)
    return ref

with co.offline_target(90, launches):
    for name, fn in [("launcher", sk.launch_guided_sample), ("op", torch.ops.ivg_kernels.guided_sample)]:
        refs = [call(fn, i) for i in range(3)]  # the first call launches through Triton, the others directly
        made = len(launches)
        launches.clear()  # the records hold the arguments
        gc.collect()
        print(name, sum(r() is not None for r in refs), len(kernel_side_table.constant_args), made)
"""


@requires_ptxas
def test_eager_launches_keep_no_input_alive_without_the_interpreter(tmp_path):
    """Three eager calls, compiled for sm_90 and launched into a stand-in driver (through Triton's launch,
    then directly): no input stays alive, and torch's wrap_triton side table (which would store them)
    stays empty."""
    res = run_compiled(_LEAK_SCRIPT, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert lines == {"launcher": "0 0 6", "op": "0 0 6"}, f"alive inputs, side-table entries, launches: {lines}"


@requires_triton
def test_eager_calls_keep_no_input_alive():
    refs = []
    for i in range(3):
        x, g = torch.randn(3, 50, device=DEVICE), torch.randn(3, 50, device=DEVICE)
        refs += [weakref.ref(x), weakref.ref(g)]
        out = ivg_kernels.guided_sample(x, [(g, 0.5)], top_p=0.9, seed=1, offset=i, backend="triton")
        assert out.ok.all()
        out2 = torch.ops.ivg_kernels.guided_sample(x, [g], [0.5], None, None, 1.0, None, 0, None, 1.0, None, 0.0,
                                                   None, 1, None, i, 50, False, 0)
        assert out2[5].all()
        del x, g, out, out2
    gc.collect()
    assert not any(r() is not None for r in refs)
