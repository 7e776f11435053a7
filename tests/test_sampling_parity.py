"""The Triton kernel (interpreter on the CPU, compiled on a GPU) against the plain-torch reference:
same tokens, same values."""
import itertools
import math

import pytest
import torch

from ivg_kernels._args import prepare_sample_args
from ivg_kernels._backend import triton_interpreted
from ivg_kernels.reference.sampling import _guided_sample_ref

from .helpers import args_to, assert_close, count_fallbacks, requires_triton

pytestmark = requires_triton
def _inputs(n, v, g, dtype, gen, pad=3):
    """Base logits and g guides of varied widths (padded vocabularies) in ``dtype``."""
    logits = (torch.randn(n, v + pad, generator=gen) * 2.5).to(dtype)
    guides = [(torch.randn(n, v + (i % 3), generator=gen) * 1.5).to(dtype) for i in range(g)]
    return logits, guides


def _compare(a, block=0):
    from ivg_kernels.sampling import _guided_sample_triton

    a = args_to(a)  # CUDA when there is a GPU, else the interpreter on the CPU
    ref = _guided_sample_ref(a)
    tri = _guided_sample_triton(a, block)
    assert torch.equal(ref.ok, tri.ok), (ref.ok, tri.ok)
    assert torch.equal(ref.tokens, tri.tokens), f"tokens differ: ref {ref.tokens.tolist()} triton {tri.tokens.tolist()}"
    dtype = a.logits.dtype
    for name in ("logprob", "logsumexp", "input_logprobs", "input_logits"):
        assert_close(getattr(tri, name), getattr(ref, name), dtype, name, scale=10.0)
    return ref


def _row_params(n, gen, per_row):
    if not per_row:
        return dict(temperature=0.8, seed=1234, offset=7)
    return dict(
        temperature=torch.rand(n, generator=gen) * 1.5 + 0.2,
        seed=torch.randint(-(1 << 62), 1 << 62, (n,), generator=gen),
        offset=torch.randint(0, 1 << 40, (n,), generator=gen),
    )


CASES = [
    (v, dtype, g)
    for (v, dtype), g in zip(
        itertools.product([1, 7, 111, 1000, 50257], [torch.float32, torch.bfloat16, torch.float16]),
        itertools.cycle([0, 1, 2, 3, 4, 5, 6]),
    )
]


@pytest.mark.parametrize("v,dtype,g", CASES, ids=[f"V{v}-{str(d)[6:]}-G{g}" for v, d, g in CASES])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_plain_sampling_matches_reference(v, dtype, g, per_row):
    gen = torch.Generator().manual_seed(v * 31 + g)
    n = 2 if v > 10_000 else 5
    logits, guides = _inputs(n, v, g, dtype, gen)
    if per_row:
        guides = [(x, torch.randn(n, generator=gen)) if i % 2 else (x, 0.5) for i, x in enumerate(guides)]
    else:
        guides = [(x, 0.3 * (i + 1) * (-1) ** i) for i, x in enumerate(guides)]
    p = _row_params(n, gen, per_row)
    a = prepare_sample_args(logits, guides, p["temperature"], 0, 1.0, 0.0, p["seed"], p["offset"], v)
    ref = _compare(a)
    assert ref.ok.all()
    assert ((ref.tokens >= 0) & (ref.tokens < v)).all()


FILTERS = [
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=50),
    dict(top_k=999),
    dict(top_p=0.5),
    dict(top_p=0.95),
    dict(top_k=40, top_p=0.8),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.9, min_p=0.02),
    # Flat rows at a high temperature: the kept set leaves the candidate lists (exact fallback).
    dict(top_p=0.99, temperature=4.0),
    dict(top_k=300, temperature=4.0),
    dict(top_k=300, top_p=0.97, temperature=4.0),
    dict(min_p=0.002, temperature=4.0),
]


@pytest.mark.parametrize("f", FILTERS, ids=[",".join(f"{k}={v}" for k, v in f.items()) for f in FILTERS])
def test_filters_match_reference_across_slices(f):
    """Small slices (64 columns, 16 candidates each) exercise the merge and the exact fallback."""
    gen = torch.Generator().manual_seed(len(str(f)))
    n, v = 3, 1000
    logits, guides = _inputs(n, v, 2, torch.float32, gen)
    guides = [(guides[0], 0.7), (guides[1], -0.7)]
    a = prepare_sample_args(
        logits, guides, f.get("temperature", 1.0), f.get("top_k", 0), f.get("top_p", 1.0), f.get("min_p", 0.0),
        99, torch.arange(n), None,
    )
    _compare(a, block=64)


@pytest.mark.parametrize("f", [dict(top_k=300), dict(top_p=0.9), dict(top_k=500, top_p=0.8)],
                         ids=["top_k=300", "top_p=0.9", "top_k=500,top_p=0.8"])
def test_fallback_thresholds_on_heavily_tied_rows_match_reference(f):
    """Integer logits (seven values over 1,000 tokens): the full-row threshold search lands on keys that
    hundreds of tokens share, and must keep all of them, as the reference does."""
    gen = torch.Generator().manual_seed(17)
    n, v = 3, 1000
    logits = torch.randint(-3, 4, (n, v), generator=gen).float()
    a = prepare_sample_args(logits, (), 1.0, f.get("top_k", 0), f.get("top_p", 1.0), 0.0, 7, torch.arange(n), None)
    _compare(a, block=64)


@pytest.fixture
def pool_entries(monkeypatch):
    """Sets the fallback pool's size (entries shared by a call's rows; 0: every fallback row takes the
    full-row passes) and returns counters of the two fallback paths' helpers (None when compiled kernels
    resolve their helpers at compile time, on a GPU)."""
    from ivg_kernels._triton import sampling_kernels as sk

    counting = triton_interpreted()
    counters = count_fallbacks(monkeypatch) if counting else {}

    def resize(entries):
        monkeypatch.setattr(sk, "POOL_MAX", entries)  # (launches are planned per setting: sample_launch)

    yield resize, (counters if counting else None)


@pytest.mark.parametrize("path", ["pool", "passes"])
@pytest.mark.parametrize("f", [dict(top_p=0.9), dict(top_k=2000, top_p=0.7)], ids=["top_p=0.9", "top_k=2000,top_p=0.7"])
def test_fallback_over_several_tiles_matches_reference(f, path, pool_entries):
    """A row whose kept set the candidates cannot prove takes the exact fallback: its tokens with keys in
    the range the candidates leave copied into the pool and searched there, or, when the pool is too small,
    full-row passes over the row in tiles of ``_FB_TILE`` tokens. 5,000 tied integer logits span three
    tiles (the last one partial); either path (counted, so the test fails if the candidates prove the set
    or the other path runs) keeps what the reference keeps."""
    from ivg_kernels._triton import sampling_kernels as sk

    resize, counters = pool_entries
    if path == "passes":
        resize(0)
    gen = torch.Generator().manual_seed(23)
    n, v = 2, 5000
    assert v > 2 * int(sk._FB_TILE) and v % int(sk._FB_TILE)
    logits = torch.randint(-3, 4, (n, v), generator=gen).float()
    a = prepare_sample_args(logits, (), 1.0, f.get("top_k", 0), f.get("top_p", 1.0), 0.0, 9, torch.arange(n), None)
    _compare(a, block=512)
    if counters:
        took = counters["_pool_draw" if path == "pool" else "_fallback_threshold"].calls
        other = counters["_fallback_threshold" if path == "pool" else "_pool_draw"].calls
        assert took and not other, f"precondition: {path} ran {took} times, the other path {other}"


@pytest.mark.parametrize("f", [dict(top_p=0.95), dict(top_k=300, top_p=0.9, min_p=0.001), dict(min_p=0.002)],
                         ids=["top_p=0.95", "top_k=300,top_p=0.9,min_p=0.001", "min_p=0.002"])
def test_fallback_paths_agree_bit_for_bit_and_share_the_pool(f, pool_entries):
    """Whether a row's fallback fits the pool depends on the other rows of the call (they share it), so both
    paths must give the same bits: the same tokens and, from the kept set's integer mass, the same log-probs.
    One call with a pool that holds only some of the rows mixes the paths and matches the reference."""
    resize, counters = pool_entries
    gen = torch.Generator().manual_seed(29)
    n, v = 4, 3000
    logits, guides = _inputs(n, v, 2, torch.float32, gen)
    a = prepare_sample_args(logits, [(guides[0], 0.7), (guides[1], -0.7)], 4.0, f.get("top_k", 0),
                            f.get("top_p", 1.0), f.get("min_p", 0.0), 31, torch.arange(n), None)
    from ivg_kernels.sampling import _guided_sample_triton

    pooled = _guided_sample_triton(args_to(a), 256)
    resize(0)
    passes = _guided_sample_triton(args_to(a), 256)
    assert torch.equal(pooled.tokens, passes.tokens)
    assert torch.equal(pooled.logprob, passes.logprob), (pooled.logprob, passes.logprob)
    resize(2 * v)  # about two rows' ranges: the first rows take the pool, the others overflow it
    if counters:
        counters.reset()
    _compare(a, block=256)
    if counters:
        assert counters["_pool_draw"].calls and counters["_pool_draw"].calls < n, counters["_pool_draw"].calls
        if f.get("top_p", 1.0) < 1.0:
            assert counters["_fallback_threshold"].calls, "precondition: some row overflowed the pool"


@pytest.mark.parametrize("path", ["pool", "passes"])
@pytest.mark.parametrize("top_p,bounded", [(0.95, True), (0.97, True), (0.9995, False)])
def test_a_wide_nucleus_falls_back_over_the_tokens_above_its_mass_bound(top_p, bounded, path, pool_entries):
    """Rows whose nucleus reaches deep into a spread-out tail (a head of 8 tokens with about 70% of the mass,
    6,000 tokens of N(0, 2.5^2) beside it, as the benchmark's peaked rows): the candidates (16 of each 512) hold
    about 92% of the mass and cannot reach the target, so the fallback's range starts at a bound from the total
    mass (below it every token holds less than a quarter of ``1 - p`` over ``V`` of the mass) instead of at the
    row's lowest key. The pool then takes under 65% of the rows' tokens (all of them for ``p`` within 1e-3 of 1,
    where there is no bound); with no pool the full-row passes start their search there; either way the
    tokens, log-probs and values are the reference's."""
    resize, counters = pool_entries
    n, v = 3, 6000
    resize(n * v if path == "pool" else 0)  # pool: room for every token, so the entries taken are the ranges
    gen = torch.Generator().manual_seed(41)
    logits = torch.randn(n, v, generator=gen) * 2.5
    head = torch.randint(0, v, (n, 8), generator=gen)
    logits.scatter_(1, head, 10.6)
    a = args_to(prepare_sample_args(logits, (), 1.0, 0, top_p, 0.0, 5, torch.arange(n), None))
    ref = _guided_sample_ref(a)
    from benchmarks.diagnose_top_p import pool_entries_taken
    from ivg_kernels.sampling import _guided_sample_triton

    tri, taken = pool_entries_taken(lambda: _guided_sample_triton(a, 512), n, v, 512, 1)
    assert torch.equal(ref.tokens, tri.tokens) and torch.equal(ref.ok, tri.ok), (ref.tokens, tri.tokens)
    for name in ("logprob", "logsumexp", "input_logprobs", "input_logits"):
        assert_close(getattr(tri, name), getattr(ref, name), a.logits.dtype, name, scale=10.0)
    if counters:
        took = counters["_pool_draw" if path == "pool" else "_fallback_threshold"].calls
        assert took == n, f"precondition: every row falls back ({path}: {took} rows)"
    if path == "pool":
        assert (taken < 0.65 * n * v) if bounded else (taken > 0.9 * n * v), taken


def test_the_mass_bound_stays_below_a_nucleus_that_ends_in_a_flat_tail():
    """The top-p fallback's floor is valid near its limit: one token holds 87% of the mass and 5,999 nearly equal
    tokens the rest, so at top_p 0.9 the nucleus ends inside the tail, whose tokens each hold about 1.3 times
    ``(1 - p) / V`` of the mass, 5.2 times the bound's per-token mass ``(1 - p) / (4 V)`` (a bound at 1.5 times
    ``(1 - p) / V`` cuts the nucleus here: tested). The same tokens and values as the reference."""
    n, v = 2, 6000
    gen = torch.Generator().manual_seed(7)
    tail = math.log(0.13 / (v - 1))
    logits = tail + 0.01 * torch.randn(n, v, generator=gen)
    logits[:, 17] = math.log(0.87)
    _compare(prepare_sample_args(logits, (), 1.0, 0, 0.9, 0.0, 5, torch.arange(n), None), block=512)


def test_per_row_filters_and_greedy_rows_match_reference():
    gen = torch.Generator().manual_seed(5)
    n, v = 6, 700
    logits, guides = _inputs(n, v, 3, torch.bfloat16, gen)
    guides = [(x, torch.randn(n, generator=gen)) for x in guides]
    a = prepare_sample_args(
        logits, guides,
        torch.tensor([0.0, 0.7, 1.0, 0.0, 2.0, 1.3]),
        torch.tensor([0, 5, 0, 3, 100, 699], dtype=torch.int32),
        torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0, 0.99]),
        torch.tensor([0.0, 0.0, 0.05, 0.0, 0.0, 0.01]),
        torch.arange(n) * 1000, torch.full((n,), 3), None,
    )
    _compare(a, block=128)


@pytest.mark.parametrize("v", [50257])
def test_large_vocab_filters_default_blocks(v):
    gen = torch.Generator().manual_seed(v)
    logits, guides = _inputs(1, v, 2, torch.bfloat16, gen)
    a = prepare_sample_args(logits, [(guides[0], 1.0), (guides[1], -1.0)], 0.7, 50, 0.9, 0.0, 3, 4, None)
    _compare(a)


def test_flagged_rows_match_reference():
    logits = torch.randn(4, 33)
    logits[0, 5] = float("nan")
    logits[1] = float("-inf")
    logits[2, :30] = float("-inf")  # only three candidates
    guide = torch.randn(4, 33)
    guide[3, 7] = float("inf")
    a = prepare_sample_args(logits, [(guide, 0.5)], 1.0, 0, 0.9, 0.0, 0, 0, None)
    ref = _compare(a, block=16)
    assert ref.ok.tolist() == [False, False, True, False]
    assert ref.tokens[2] >= 30


def test_bad_tensor_parameters_are_flagged_not_drawn():
    logits = torch.randn(5, 40)
    a = prepare_sample_args(
        logits, (), torch.tensor([-1.0, float("nan"), 1.0, 1.0, 1.0]), 0,
        torch.tensor([1.0, 1.0, 0.0, 1.5, 0.9]), torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0]), 1, 2, None,
    )
    ref = _compare(a, block=16)
    assert not ref.ok.any()
    assert (ref.tokens == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_and_positive_zero_are_one_value(dtype):
    """-0.0 == +0.0, so a filter keeps both or neither and they tie, as in the reference (the kernel's
    ordered integer key of a float once put -0.0 below +0.0: a top-k or top-p boundary between them
    dropped the -0.0 token and changed the draws and log-probs)."""
    z = -0.0
    rows = torch.tensor([
        [z, 0.0, -1.0, -2.0, -3.0],  # a tie at the max: top-k 1 keeps both
        [1.0, z, 0.0, -3.0, -4.0],  # a tie at the k-th largest (k = 2)
        [0.0, z, -0.5, -1.0, 0.25],  # top-p reaches its target inside the tie
        [z, z, 0.0, -5.0, -5.0],
    ]).to(dtype)
    assert torch.signbit(rows[0, 0]) and not torch.signbit(rows[0, 1])
    for f in (dict(top_k=1), dict(top_k=2), dict(top_p=0.4, temperature=4.0), dict(top_p=0.7), dict(min_p=0.5),
              dict(top_k=2, top_p=0.9, min_p=0.1)):
        for seed in range(6):
            a = prepare_sample_args(rows, [], f.get("temperature", 1.0), f.get("top_k", 0), f.get("top_p", 1.0),
                                    f.get("min_p", 0.0), seed, torch.arange(4), None)
            ref = _compare(a)
            if f == dict(top_k=1):  # the specification: the two zeros tie at the max, each drawn with p = 1/2
                assert ref.tokens[0].item() in (0, 1) and abs(ref.logprob[0].item() + math.log(2)) < 1e-6


def test_scalar_seeds_and_offsets_of_every_integer_width():
    """A Python int seed or offset in each range Triton types its own way (int32, [2**31, 2**32), int64,
    negative) draws what the reference draws, with and without filters (Triton's interpreter held ints in
    [2**31, 2**32) as 32-bit data, so their high words came out wrong there)."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 300, generator=gen)
    values = (7, -5, 2 ** 31, 2 ** 32 - 1, 2 ** 31 + 12345, 2 ** 40 + 3, -(2 ** 31) - 3, 2 ** 62 + 1)
    for seed, offset in zip(values, values[3:] + values[:3]):
        for top_k in (0, 3):
            a = prepare_sample_args(logits, [], 1.0, top_k, 1.0, 0.0, seed, offset, None)
            _compare(a)


_WIDTH_CASES = [{}, dict(top_k=50), dict(top_k=300), dict(top_p=0.5), dict(min_p=0.05),
                dict(top_k=40, top_p=0.9, min_p=0.01)]


@pytest.mark.parametrize("f", _WIDTH_CASES, ids=[",".join(f"{k}={v}" for k, v in f.items()) or "none"
                                                 for f in _WIDTH_CASES])
def test_a_row_gives_the_same_bits_in_slices_of_any_width(f, pool_entries):
    """The slice width follows the call's row count (``pick_block``: 1,024 tokens for one row of 151,936, 4,096
    from eight rows), so a row's result must not depend on it. Every output bit for bit in slices of 1,024 and
    4,096 (each input's log-sum-exp from per-granule sums merged in one order); and the tokens and
    log-probs also in slices of 16 (every token a candidate: each kept set proven from the candidates, where
    wider slices' 16 candidates make wide kept sets fall back), the kept set's log-prob from its exact integer
    mass on every path. (Before: the log-sum-exps were merged from per-slice sums, 1 to 5 of 8 rows differing
    in the last place between widths, and a proven kept set's log-prob was a float sum over the candidates in
    an order the slices set.)"""
    resize, counters = pool_entries
    gen = torch.Generator().manual_seed(41)
    n, v = 4, 2048  # (slices of 4,096: the whole row in one)
    logits, guides = _inputs(n, v, 2, torch.bfloat16, gen)
    a = args_to(prepare_sample_args(logits, [(guides[0], 0.7), (guides[1], -0.7)], 0.9, f.get("top_k", 0),
                                    f.get("top_p", 1.0), f.get("min_p", 0.0), 77, torch.arange(n), None))
    from ivg_kernels.sampling import _guided_sample_triton

    first = _guided_sample_triton(a, 1024)  # (the widths of GPU calls of 1 and of 8 rows, and 16: few to compile)
    for block in (4096, 16):
        other = _guided_sample_triton(a, block)
        names = ("tokens", "logprob") if block < 256 else first._fields
        for name in names:
            assert torch.equal(getattr(first, name), getattr(other, name)), (block, name, getattr(first, name),
                                                                            getattr(other, name))
    if counters and f.get("top_k") == 300:  # the wide top-k set: proven in slices of 16, a fallback in wider ones
        assert counters["_pool_draw"].calls, "precondition: some row fell back"
