"""The CPU reference's shortcuts give what the plain computation gives, bit for bit: for filtered rows the
ranking thresholds from each row's largest scores (``topk``) instead of the sorted row, and the Gumbel noise of
the kept tokens only (the whole-row versions are the module's own definition, step 3 on the sorted rows and the
noise of every token, run here by turning both shortcuts off); for small unfiltered calls the draw in numpy."""
import math
import random

import pytest
import torch

from ivg_kernels._args import prepare_sample_args
from ivg_kernels.reference import portable, sampling
from ivg_kernels.reference.sampling import _guided_sample_ref


def _whole_rows(monkeypatch):
    """Turn both shortcuts off: every threshold from the sorted rows, every token's noise."""
    monkeypatch.setattr(sampling, "_kept_columns", lambda kept: None)
    monkeypatch.setattr(sampling, "_rank_thresholds", lambda x, x_max, k, k_on, p, neg_inf: sampling._thresholds(
        x.sort(dim=1, descending=True).values, x, x_max, k, k_on, p, neg_inf)[:2])


def _rows(rng: random.Random, n: int, v: int, dtype) -> torch.Tensor:
    """Rows of several kinds: flat, peaked, few distinct values (ties at every threshold), a long run of ties
    below the maximum, -inf tails, and now and then a NaN or +inf row."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    rows = []
    for _ in range(n):
        kind = rng.choice(["flat", "peaked", "levels", "plateau", "tail", "bad"])
        x = torch.randn(v, generator=g, dtype=torch.float64)
        if kind == "peaked":
            x = x * rng.choice([4.0, 12.0])
        elif kind == "levels":  # a handful of values: whole runs tie at the k-th score and at a nucleus's edge
            x = torch.randint(-3, 3, (v,), generator=g).double() * rng.choice([0.5, 1.0, 3.0])
        elif kind == "plateau":  # one top token, then hundreds tied
            x = torch.full((v,), 1.0, dtype=torch.float64)
            x[rng.randrange(v)] = 3.0
            x[torch.randperm(v, generator=g)[: v // 3]] = -2.0
        elif kind == "tail":
            x[torch.randperm(v, generator=g)[: v // 2]] = -math.inf
        elif kind == "bad":
            x[rng.randrange(v)] = rng.choice([math.nan, math.inf])
        rows.append(x)
    return torch.stack(rows).to(dtype)


def _param(rng, n, scalar, values):
    return rng.choice(values) if rng.random() < 0.5 else torch.tensor([rng.choice(values) for _ in range(n)],
                                                                       dtype=scalar)


def _case(rng: random.Random):
    n, v = rng.choice([1, 3, 8, 17]), rng.choice([7, 300, 600, 1100, 5000])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
    guides = [(_rows(rng, n, v + rng.choice([0, 5]), dtype), rng.choice([1.0, -0.5, 2.0]))
              for _ in range(rng.choice([0, 1, 2]))]
    top_k = _param(rng, n, torch.int64, [0, 1, 2, 5, 50, 120, 200, 400, v - 1, v, v + 3])
    top_p = _param(rng, n, torch.float64, [1.0, 0.99, 0.95, 0.9, 0.5, 0.2, 1e-3])
    min_p = _param(rng, n, torch.float64, [0.0, 0.0, 0.05, 0.3])
    temperature = _param(rng, n, torch.float64, [0.7, 1.0, 1e-3, 2.5] + ([0.0] if rng.random() < 0.3 else []))
    vocab = rng.choice([None, max(1, v - rng.randrange(5))])
    return (_rows(rng, n, v, dtype), guides, temperature, top_k, top_p, min_p, rng.randrange(1 << 40),
            torch.tensor([rng.randrange(1 << 20) for _ in range(n)]), vocab)


def _count_paths(monkeypatch) -> dict:
    """Counts of the paths taken, in rows: thresholds decided by the top scores (``top``), or from the sorted rows
    after those did not decide them (``fallback``); in calls, noise of the kept tokens only (``sparse``)."""
    seen = {"top": 0, "fallback": 0, "sparse": 0}
    calls = []
    rank, thresholds, kept_columns = sampling._rank_thresholds, sampling._thresholds, sampling._kept_columns

    def counted_rank(*args):
        calls.clear()
        out = rank(*args)
        if calls and calls[0][0] == "top":
            sorted_after = sum(n for kind, n in calls[1:] if kind == "sorted")
            seen["top"] += calls[0][1] - sorted_after
            seen["fallback"] += sorted_after
        return out

    def counted_thresholds(x_sorted, x, *rest):
        calls.append(("top" if x_sorted.shape[1] < x.shape[1] else "sorted", len(x)))
        return thresholds(x_sorted, x, *rest)

    def counted_kept_columns(kept):
        out = kept_columns(kept)
        seen["sparse"] += out is not None
        return out

    monkeypatch.setattr(sampling, "_rank_thresholds", counted_rank)
    monkeypatch.setattr(sampling, "_thresholds", counted_thresholds)
    monkeypatch.setattr(sampling, "_kept_columns", counted_kept_columns)
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_shortcuts_give_the_whole_rows_result(monkeypatch, seed):
    rng = random.Random(seed)
    seen = _count_paths(monkeypatch)
    for case in range(40):
        args = _case(rng)
        got = _guided_sample_ref(prepare_sample_args(*args))
        with monkeypatch.context() as m:
            _whole_rows(m)
            want = _guided_sample_ref(prepare_sample_args(*args))
        for name, a, b in zip(got._fields, got, want):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (
                f"seed {seed}, case {case}: {name} differs\n{a}\n{b}")
    assert min(seen.values()) >= 3, seen  # each path taken (the draws of either kind too)


def test_thresholds_from_the_top_scores_equal_the_sorted_rows_where_they_are_used():
    """Rows whose nucleus or top-k ties reach past the top scores go to the sorted rows; the others agree."""
    rng = random.Random(7)
    for _ in range(60):
        n, v = 6, rng.choice([600, 2000])
        x = _rows(rng, n, v, torch.float32).float()
        x = torch.where(x.isnan() | (x == math.inf), 0.0, x)
        x_max = x.amax(dim=1)
        k = torch.tensor([rng.choice([0, 3, 50, 150, 300]) for _ in range(n)])
        p = torch.tensor([rng.choice([1.0, 0.9, 0.3]) for _ in range(n)], dtype=torch.float32)
        k_on = (k > 0) & (k < v)
        neg_inf = torch.full_like(x_max, -math.inf)
        got = sampling._rank_thresholds(x, x_max, k, k_on, p, neg_inf)
        want = sampling._thresholds(x.sort(dim=1, descending=True).values, x, x_max, k, k_on, p, neg_inf)[:2]
        for a, b in zip(got, want):
            assert torch.equal(a, b), (k, p, a, b)


def test_numpy_sorts_rows_as_torch_does():
    """The fallback rows' sort (numpy's) gives torch's sorted values: float32 and float64 rows with ties, zeros of
    both signs, -inf tails and huge values (NaN rows are flagged and never read: not compared)."""
    g = torch.Generator().manual_seed(11)
    for trial in range(40):
        n, v = 1 + trial % 5, [1, 2, 15, 16, 17, 600, 5000][trial % 7]
        x = torch.randn(n, v, generator=g, dtype=torch.float64) * 10 ** (trial % 4)
        x[torch.rand(n, v, generator=g) < 0.2] = 0.0
        x[torch.rand(n, v, generator=g) < 0.2] = -0.0
        x[torch.rand(n, v, generator=g) < 0.1] = -math.inf
        x[torch.rand(n, v, generator=g) < 0.1] = 2.5  # ties
        x = x.to(torch.float64 if trial % 2 else torch.float32)
        want = x.sort(dim=1, descending=True).values
        for threads in (1, 2, 8):
            got = sampling._sorted_descending(x, threads)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (x, got, want)


def test_numpy_sorts_where_torchs_threads_would_not_sort_faster():
    """Numpy (a third of torch's time per row, one row after another) for one or two threads, and for rows fewer
    than three of torch's rounds; torch from there (at equal cost: no copy). Told apart by the order of tied zeros'
    signs, which numpy's sort leaves otherwise than torch's on these rows."""
    g = torch.Generator().manual_seed(2)
    zeros = lambda n: torch.where(torch.rand(n, 3000, generator=g) < 0.5, 0.0, -0.0)  # noqa: E731
    for rows, threads, numpy_sorts in ((1, 1, True), (16, 1, True), (16, 2, True), (1, 8, True), (2, 4, True),
                                       (3, 3, False), (4, 4, False), (16, 8, False), (16, 4, False)):
        x = zeros(rows)
        want = x.sort(dim=1, descending=True).values
        got = sampling._sorted_descending(x, threads)
        assert torch.equal(got, want)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)) != numpy_sorts, (rows, threads)


def test_tied_zeros_of_both_signs_at_a_nucleus_edge_keep_the_sorted_rows_tokens(monkeypatch):
    """A flat row (its nucleus reaches past the top scores, so it is sorted whole) whose top-p edge falls among
    zeros of both signs: numpy's sort may order their signs otherwise than torch's, and the thresholds, the kept
    tokens and every draw are still the sorted rows' (``-0.0 == 0.0``, with the same mass)."""
    g = torch.Generator().manual_seed(5)
    for trial in range(12):
        v = 2000
        x = (torch.rand(4, v, generator=g) * 0.01).float()
        x[:, :1000] = torch.where(torch.rand(4, 1000, generator=g) < 0.5, 0.0, -0.0)  # half the row tied at zero
        x[:, 1000:] = -x[:, 1000:] - 0.5
        args = (x, (), 1.0, 0, [0.3, 0.5, 0.52, 0.9][trial % 4], 0.0, 100 + trial, torch.arange(4) * 3, None)
        seen = _count_paths(monkeypatch)
        got = _guided_sample_ref(prepare_sample_args(*args))
        assert seen["fallback"] == 4
        with monkeypatch.context() as m:
            _whole_rows(m)
            want = _guided_sample_ref(prepare_sample_args(*args))
        monkeypatch.undo()
        for name, a, b in zip(got._fields, got, want):
            assert torch.equal(a, b), (trial, name, a, b)


def test_sparse_noise_draws_the_dense_token():
    """The Gumbel-max over each row's kept tokens, with only their noise, picks the dense draw's token, ties in
    ``x`` included (first id among exact ties of ``x + g``), and rows that keep nothing get token 0 either way."""
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        n, v = 9, 700
        x = torch.randint(-2, 2, (n, v), generator=g).float() * (1e6 if trial % 3 == 0 else 1.0)
        kept = torch.rand(n, v, generator=g) < torch.rand(n, 1, generator=g) * 0.1
        kept[trial % n] = False  # a row that keeps nothing
        seed, offset = torch.full((n,), 5 + trial), torch.arange(n) * 7
        dense = sampling._gumbel_argmax(x, kept, seed, offset, torch.arange(v))
        assert sampling._kept_columns(kept) is not None
        assert torch.equal(sampling._gumbel_max(x, kept, None, seed, offset), dense)


def test_a_top_k_set_whose_ties_spill_past_the_top_scores_is_measured_whole(monkeypatch):
    """Top-k 120 and top-p 0.15 on 10 tokens at 2.0 then 600 tied at 0.0: the top-k set holds all 610 (ties are
    kept together), so the nucleus's total is their mass, and its target falls among the ties (tau_p = 0.0). The
    256 top scores alone would give a smaller total and a target among the first ten (tau_p = 2.0)."""
    x = torch.full((1, 1100), -5.0)
    x[0, 100:110] = 2.0
    x[0, 200:800] = 0.0
    x_max, k, p = x.amax(dim=1), torch.tensor([120]), torch.tensor([0.15])
    tau_k, tau_p = sampling._rank_thresholds(x, x_max, k, k > 0, p, torch.full((1,), -math.inf))
    assert tau_k.item() == 0.0 and tau_p.item() == 0.0
    seen = _count_paths(monkeypatch)
    got = _guided_sample_ref(prepare_sample_args(x, (), 1.0, 120, 0.15, 0.0, 3, torch.arange(1), None))
    assert seen["fallback"] == 1
    _whole_rows(monkeypatch)
    want = _guided_sample_ref(prepare_sample_args(x, (), 1.0, 120, 0.15, 0.0, 3, torch.arange(1), None))
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logprob, want.logprob)


def test_mass_int_in_numpy_gives_torchs_bits():
    """Every 37th float32 from -0.0 down to about -70 (where masses reach 0), and the values outside the domain
    a bad row can bring (NaN, +-inf, positives, subnormals)."""
    neg = torch.arange(0x80000000, 0xC28C0000 + 1, 37, dtype=torch.int64)
    d = (neg - (1 << 32)).to(torch.int32).view(torch.float32)
    d = torch.cat([d, torch.tensor([0.0, -0.0, -math.inf, math.nan, math.inf, 1e-45, -1e-45, -1e-38, 3.0, -200.0])])
    want = portable.mass_int(d)
    got = torch.from_numpy(portable.mass_int_numpy(d.numpy()))
    assert torch.equal(got, want), (d[got != want][:5], got[got != want][:5], want[got != want][:5])


@pytest.mark.parametrize("seed", range(3))
def test_the_numpy_draw_gives_the_torch_draw(monkeypatch, seed):
    """The unfiltered draw of small CPU calls (numpy) against the same draw in torch: the same tokens and totals
    for every row that is ok (the others' tokens are dropped), many shapes, granule edges, NaN/inf rows."""
    rng = random.Random(seed)
    for case in range(300):
        n, v = rng.choice([1, 2, 5, 9, 16]), rng.choice([1, 3, 255, 256, 257, 596, 1000, 3000])
        x = torch.randn(n, v, dtype=rng.choice([torch.float32, torch.float64])) * rng.choice([0.1, 1, 30, 1e4])
        for r in range(n):
            k = rng.random()
            if k < 0.1:
                x[r, rng.randrange(v)] = rng.choice([math.nan, math.inf])
            elif k < 0.15:
                x[r] = -math.inf
            elif k < 0.25:
                x[r, : v // 2] = -math.inf
            elif k < 0.35:
                x[r, :3] = x[r].max() + 1  # ties at the top
        x_max = x.amax(dim=1)
        keys = [torch.tensor([rng.randrange(-2 ** 63, 2 ** 63) for _ in range(n)]) for _ in range(2)]
        got = sampling.granule_draw(x, x_max, *keys)
        with monkeypatch.context() as m:
            m.setattr(sampling, "CPU_NUMPY_DRAW", -1)
            want = sampling.granule_draw(x, x_max, *keys)
        ok = x_max.abs() < math.inf
        for a, b in zip(got, want):
            assert torch.equal(a[ok], b[ok]), (seed, case, n, v)


def test_the_numpy_index_draw_gives_the_torch_one_on_exact_hits():
    """Uniforms that land exactly on a running sum (``floor(u * total)`` equal to one: the first index past it is
    drawn), on its neighbours, at 0 and just below 1, and totals near 2**53."""
    cum = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 5], [2 ** 52, 2 ** 52 + 1, 2 ** 53 - 2, 2 ** 53 - 1]])
    for u in [0.0, 0.25, 0.5, 0.5 + 2 ** -50, 0.75, 1 - 2 ** -53, 0.4, 0.6]:
        uu = torch.full((3,), u, dtype=torch.float64)
        want = sampling._index_draw(cum, cum[:, -1], uu)
        got = sampling._index_draw_numpy(cum.numpy(), cum[:, -1].numpy(), uu.numpy())
        assert torch.equal(torch.from_numpy(got), want), (u, got, want)


@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}])
def test_inputs_that_require_grad_draw_as_detached_ones(filters):
    """Logits straight from a model outside ``no_grad`` (a user's own loop): every CPU path draws from them, the
    same tokens as from their detached values."""
    logits = torch.randn(3, 596, generator=torch.Generator().manual_seed(1), requires_grad=True)
    guide = torch.randn(3, 600, generator=torch.Generator().manual_seed(2), requires_grad=True)
    got = _guided_sample_ref(prepare_sample_args(logits, [(guide, 0.5)], 0.7, filters.get("top_k", 0),
                                                 filters.get("top_p", 1.0), filters.get("min_p", 0.0), 4,
                                                 torch.arange(3), None))
    want = _guided_sample_ref(prepare_sample_args(logits.detach(), [(guide.detach(), 0.5)], 0.7,
                                                  filters.get("top_k", 0), filters.get("top_p", 1.0),
                                                  filters.get("min_p", 0.0), 4, torch.arange(3), None))
    assert torch.equal(got.tokens, want.tokens) and got.ok.all()
