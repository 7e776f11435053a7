"""Shared-prefix decode attention for beam groups: the group structure from the block manager, the
reference against per-beam paged attention for random fork histories, the Triton kernels (interpreter
on CPU) against the reference, and the errors."""
import random

import pytest
import torch

from ivg_kernels import BlockManager, KVCache, paged_decode_attention, shared_prefix_decode_attention

from .helpers import DEVICE, assert_close, requires_triton

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _fork_history(prompts, h_kv, d, bs, dtype, seed, frees=True):
    """Prompts forked into beams, grown and re-forked at random (copy-on-write of partly filled blocks
    included), some beams freed; every slot written with random K/V as it is appended.

    Returns the cache, the live sequences ordered by prompt (a group each), and each one's root."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(1, h_kv, d, num_blocks=600, block_size=bs, dtype=dtype)

    def grow(seqs, counts):
        slots = cache.append(seqs, counts)
        t = sum(counts)
        k, v = (torch.randn(t, h_kv, d, generator=gen).to(dtype) for _ in range(2))
        kc, vc = cache.pool.layer(0)
        kc.view(-1, h_kv, d)[slots] = k
        vc.view(-1, h_kv, d)[slots] = v

    bm = cache.blocks
    roots = bm.new_sequences(len(prompts))
    grow(roots, prompts)
    beams = {r: [r] for r in roots}
    for _ in range(3):  # chunks: fork every beam, grow the children, prune some
        for r in roots:
            kids = bm.fork_many(beams[r], rnd.randint(1, 3))
            bm.free_many(beams[r])
            beams[r] = [k for ks in kids for k in ks]
            grow(beams[r], [rnd.randint(1, 2 * bs) for _ in beams[r]])
            if frees and len(beams[r]) > 2:
                drop = rnd.sample(beams[r], len(beams[r]) // 3)
                bm.free_many(drop)
                beams[r] = [b for b in beams[r] if b not in drop]
    rows = [s for r in roots for s in beams[r]]
    return cache, rows


def _inputs(cache, rows, h, seed):
    bm = cache.blocks
    kc, vc = cache.pool.layer(0)
    d = kc.shape[3]
    q = torch.randn(len(rows), h, d, generator=torch.Generator().manual_seed(seed + 1)).to(kc.dtype)
    starts, shared = bm.shared_prefix_groups(rows)
    return (q, kc, vc, bm.block_table(rows), bm.seq_lens(rows), torch.tensor(starts, dtype=torch.int32),
            torch.tensor(shared, dtype=torch.int32), max(b - a for a, b in zip(starts, starts[1:])))


def test_groups_follow_the_forks():
    bm = BlockManager(64, 4)
    a, b = bm.new_sequences(2)
    bm.append([a, b], [10, 3])  # a: blocks of 4, 4, 2 tokens
    kids_a = bm.fork_many([a], 3)[0]
    kids_b = bm.fork_many([b], 2)[0]
    bm.free_many([a, b])
    bm.append(kids_a, [1, 5, 0])  # the partly filled third block: copied for the first two children
    rows = kids_a + kids_b
    starts, shared = bm.shared_prefix_groups(rows)
    assert starts == [0, 3, 5]
    assert shared == [8, 3]  # a's two full blocks; b's children still share b's partly filled block
    alone = bm.new_sequences(1)
    bm.append(alone, 6)
    assert bm.shared_prefix_groups([kids_a[0], *alone, kids_a[1]]) == ([0, 1, 2, 3], [11, 6, 15])


def test_empty_rows_are_groups_of_their_own():
    """A row that holds no block shares nothing, not even with a neighbour as empty as itself: each is a group
    of one (their first blocks would otherwise compare equal as padding)."""
    bm = BlockManager(16, 4)
    a, b, c, d = bm.new_sequences(4)
    bm.append([c], 5)
    (e,) = bm.fork_many([c], 1)[0]
    assert bm.shared_prefix_groups([a, b, c, e, d]) == ([0, 1, 2, 4, 5], [0, 0, 5, 0])


def test_groups_equal_a_brute_force_over_random_histories():
    for seed in range(6):
        cache, rows = _fork_history([9, 30, 17, 4], 1, 4, 4, torch.float32, seed)
        bm = cache.blocks
        rnd = random.Random(seed)
        rows = rows[:3] + rnd.sample(rows[3:], len(rows) - 3)  # some groups broken up
        starts, shared = bm.shared_prefix_groups(rows)
        want_starts, want_shared = [], []
        for i, s in enumerate(rows):
            blocks = bm.blocks_of(s)
            if i and want_starts and blocks[:1] and blocks[:1] == bm.blocks_of(rows[want_starts[-1]])[:1]:
                continue
            want_starts.append(i)
        want_starts.append(len(rows))
        for a, b in zip(want_starts, want_starts[1:]):
            tables = [bm.blocks_of(s) for s in rows[a:b]]
            n = 0
            while all(len(t) > n and t[n] == tables[0][n] for t in tables):
                n += 1
            want_shared.append(min([n * 4] + [bm.seq_len(s) for s in rows[a:b]]))
        assert (starts, shared) == (want_starts, want_shared), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("h,h_kv,d,bs,window", [(4, 4, 8, 4, None), (6, 2, 16, 8, None), (4, 1, 8, 4, 7),
                                               (2, 2, 8, 16, 40)])
def test_reference_equals_per_beam_attention(dtype, h, h_kv, d, bs, window):
    for seed in range(4):
        cache, rows = _fork_history([23, 5, 40], h_kv, d, bs, dtype, seed)
        q, kc, vc, bt, sl, starts, shared, most = _inputs(cache, rows, h, seed)
        assert int(shared.max()) > 0
        want = paged_decode_attention(q, kc, vc, bt, sl, scale=d ** -0.5, sliding_window=window, backend="reference")
        got = shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, max_group_rows=most, scale=d ** -0.5,
                                             sliding_window=window, backend="reference")
        assert_close(got, want, dtype, f"seed {seed}")


def test_empty_groups_pad_the_structure():
    """Empty groups (padding of fixed-size buffers), anywhere and with any claim, change nothing."""
    cache, rows = _fork_history([23, 5], 2, 8, 4, torch.float64, 2)
    q, kc, vc, bt, sl, starts, shared, most = _inputs(cache, rows, 4, 2)
    want = paged_decode_attention(q, kc, vc, bt, sl, scale=0.3, backend="reference")
    s, t = starts.tolist(), shared.tolist()
    assert len(t) == 2
    padded_starts = torch.tensor([0, 0, s[1], s[1], len(rows), len(rows), len(rows)], dtype=torch.int32)
    padded_shared = torch.tensor([7, t[0], 999, t[1], 0, 5], dtype=torch.int32)
    got = shared_prefix_decode_attention(q, kc, vc, bt, sl, padded_starts, padded_shared, max_group_rows=most,
                                         scale=0.3, backend="reference")
    assert_close(got, want, torch.float64, "padded groups")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_empty_rows_attend_to_nothing(backend):
    """Rows that hold no token (padding rows of a batch: their own groups, sharing 0) get output 0, as per-beam
    attention gives them, beside a group that shares a prefix; not the NaN of a softmax over no key."""
    bm = BlockManager(16, 4)
    root, e1, e2 = bm.new_sequences(3)
    bm.append([root], 6)
    kids = bm.fork_many([root], 2)[0]
    bm.append(kids, [2, 3])
    rows = [e1, *kids, e2]
    gen = torch.Generator().manual_seed(3)
    kc, vc = (torch.randn(16, 4, 2, 8, generator=gen).to(DEVICE) for _ in range(2))
    q = torch.randn(len(rows), 4, 8, generator=gen).to(DEVICE)
    starts, shared = bm.shared_prefix_groups(rows)
    assert starts == [0, 1, 3, 4] and shared == [0, 4, 0]
    bt, sl = bm.block_table(rows).to(DEVICE), bm.seq_lens(rows).to(DEVICE)
    got = shared_prefix_decode_attention(q, kc, vc, bt, sl, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                                         torch.tensor(shared, dtype=torch.int32, device=DEVICE), max_group_rows=2,
                                         scale=0.3, backend=backend)
    want = paged_decode_attention(q, kc, vc, bt, sl, scale=0.3, backend="reference")
    assert (got[[0, 3]] == 0).all() and (want[[0, 3]] == 0).all()
    assert_close(got, want, torch.float32, backend)


def test_a_window_inside_the_shared_part_and_rows_of_their_own():
    """Windows that end inside the shared prefix, exclude it, or take all of it; groups of one row."""
    cache, rows = _fork_history([30, 3], 2, 8, 4, torch.float64, 5)
    q, kc, vc, bt, sl, _, _, _ = _inputs(cache, rows, 4, 5)
    for window in (1, 2, 9, 31, 1000):
        want = paged_decode_attention(q, kc, vc, bt, sl, scale=0.3, sliding_window=window, backend="reference")
        for starts, shared in (_inputs(cache, rows, 4, 5)[5:7], (torch.arange(len(rows) + 1, dtype=torch.int32),
                                                                 torch.zeros(len(rows), dtype=torch.int32))):
            got = shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, max_group_rows=len(rows),
                                                 scale=0.3, sliding_window=window, backend="reference")
            assert_close(got, want, torch.float64, f"window {window}")


TRITON_CASES = [
    # prompts, h, h_kv, d, block_size, window, num_splits
    ([23, 5, 40], 4, 4, 16, 4, None, 0),
    ([50, 9], 6, 2, 16, 8, None, 3),
    ([70], 8, 1, 32, 16, 25, 2),
    ([12, 33], 2, 2, 8, 4, 3, 0),
    # long prompts: 16-bit caches read tiles of 64 keys, in splits of at least 8 * BLOCK_M / 2 keys
    ([2100], 4, 2, 16, 16, None, 0),
    ([2100, 40], 4, 2, 16, 16, 700, 0),
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"case{i}" for i in range(len(TRITON_CASES))])
def test_triton_matches_reference(case, dtype):
    prompts, h, h_kv, d, bs, window, splits = case
    cache, rows = _fork_history(prompts, h_kv, d, bs, dtype, len(prompts) + splits)
    args = [x.to(DEVICE) for x in _inputs(cache, rows, h, 7)[:7]]
    most = _inputs(cache, rows, h, 7)[7]
    want = paged_decode_attention(*args[:5], scale=d ** -0.5, sliding_window=window, backend="reference")
    got = shared_prefix_decode_attention(*args, max_group_rows=most, scale=d ** -0.5, sliding_window=window,
                                         num_splits=splits, backend="triton")
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)
    n = len(rows)  # empty groups padding the structure, as in a captured graph's buffers
    starts = torch.cat([args[5][:1], args[5], torch.tensor([n], dtype=torch.int32, device=DEVICE)])
    shared = torch.cat([torch.tensor([9], dtype=torch.int32, device=DEVICE), args[6],
                        torch.tensor([999], dtype=torch.int32, device=DEVICE)])
    padded = shared_prefix_decode_attention(*args[:5], starts, shared, max_group_rows=most, scale=d ** -0.5,
                                            sliding_window=window, num_splits=splits, backend="triton")
    torch.testing.assert_close(padded.float(), want.float(), atol=ATOL[dtype], rtol=0)


def test_errors_name_the_argument():
    cache, rows = _fork_history([20, 20], 1, 8, 4, torch.float32, 1, frees=False)
    q, kc, vc, bt, sl, starts, shared, most = _inputs(cache, rows, 2, 1)
    call = dict(max_group_rows=most, scale=1.0, backend="reference")
    with pytest.raises(ValueError, match=r"shared_lens\[0\]=.*do not hold"):
        shared_prefix_decode_attention(q, kc, vc, bt, sl, torch.tensor([0, len(rows)], dtype=torch.int32),
                                       shared[:1] + 4, **dict(call, max_group_rows=len(rows)))  # two prompts
    with pytest.raises(ValueError, match=r"shared_lens\[1\]=.*shortest row"):
        shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared + torch.tensor([0, 500], dtype=torch.int32),
                                       **call)
    with pytest.raises(ValueError, match="group_starts=.*non-decreasing offsets"):
        shared_prefix_decode_attention(q, kc, vc, bt, sl, starts.flip(0), shared, **call)
    with pytest.raises(ValueError, match="group_starts=.*3 rows"):
        shared_prefix_decode_attention(q, kc, vc, bt, sl, starts[:2], shared, **call)
    with pytest.raises(ValueError, match="max_group_rows=1: expected at least"):
        shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, **dict(call, max_group_rows=1))
    with pytest.raises(ValueError, match="shared_lens=.*: expected dtype torch.int32 or torch.int64"):
        shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared.float(), **call)


@requires_triton
def test_triton_with_more_groups_than_one_search_tile():
    """The suffix kernel finds each row's group among all the groups' ends (a tile of a power of two >= G):
    37 groups (past the 16 and 32 of the smallest tiles), of one to three rows, some empty, each row holding
    its group's shared blocks and then its own, against per-row attention."""
    gen = torch.Generator().manual_seed(41)
    h, h_kv, d, bs = 4, 2, 16, 4
    sizes = [int(x) for x in torch.randint(0, 4, (37,), generator=gen)]  # 0: an empty group
    n, blocks = sum(sizes), 1
    table, lens, starts, shared = [], [], [0], []
    width = 12
    for size in sizes:
        common = int(torch.randint(0, 5, (), generator=gen))  # shared blocks of the group
        prefix = list(range(blocks, blocks + common))
        blocks += common
        shortest = None
        for _ in range(size):
            own = int(torch.randint(1, width - common, (), generator=gen))
            row = prefix + list(range(blocks, blocks + own))
            blocks += own
            length = (common + own - 1) * bs + int(torch.randint(1, bs + 1, (), generator=gen))
            table.append(row + [0] * (width - len(row)))
            lens.append(length)
            shortest = length if shortest is None else min(shortest, length)
        starts.append(starts[-1] + size)
        shared.append(min(common * bs, shortest) if size else 0)
    kc = torch.randn(blocks, bs, h_kv, d, generator=gen)
    vc = torch.randn(blocks, bs, h_kv, d, generator=gen)
    q = torch.randn(n, h, d, generator=gen)
    args = [x.to(DEVICE) for x in (q, kc, vc, torch.tensor(table, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                                   torch.tensor(starts, dtype=torch.int32), torch.tensor(shared, dtype=torch.int32))]
    want = paged_decode_attention(*args[:5], scale=d ** -0.5, backend="reference")
    got = shared_prefix_decode_attention(*args, max_group_rows=max(sizes), scale=d ** -0.5, backend="triton")
    assert sum(s > 0 for s in shared) > 10 and 0 in sizes, "precondition: shared prefixes and empty groups"
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=0)


def test_a_plan_made_once_serves_every_layer():
    """The decoder plans the groups once per forward (``shared_decode_plan``) and attends every layer with it:
    each layer's output equals per-beam attention over that layer's own keys."""
    from ivg_kernels.reference.attention import shared_decode_plan, shared_prefix_decode_attention_ref

    cache, rows = _fork_history([23, 5, 40], 2, 8, 4, torch.float64, 3)
    q, kc, vc, bt, sl, starts, shared, _ = _inputs(cache, rows, 4, 3)
    for window in (None, 9):
        plan = shared_decode_plan(bt, sl, starts, shared, 4, window)
        for layer in range(3):  # other keys and values in the same slots: the next layer's cache
            gen = torch.Generator().manual_seed(layer)
            k2, v2 = (torch.randn(kc.shape, generator=gen, dtype=torch.float64) for _ in range(2))
            q2 = torch.randn(q.shape, generator=gen, dtype=torch.float64)
            want = paged_decode_attention(q2, k2, v2, bt, sl, scale=0.3, sliding_window=window, backend="reference")
            got = shared_prefix_decode_attention_ref(q2, k2, v2, bt, sl, starts, shared, scale=0.3,
                                                     sliding_window=window, plan=plan)
            assert_close(got, want, torch.float64, f"layer {layer}, window {window}")
    assert shared_decode_plan(bt[:0], sl[:0], torch.zeros(1, dtype=torch.int32), shared[:0], 4) is None


@pytest.mark.parametrize("softcap,with_sinks", [(0.5, False), (None, True), (2.0, True)])
@pytest.mark.parametrize("window", [None, 9])
def test_softcap_and_sinks_equal_per_beam_attention(softcap, with_sinks, window):
    """Soft-capping applies to both parts' scores and the sinks once, to the merged softmax: the reference and
    the Triton kernels (several splits of the prefix) equal per-beam attention with the same options."""
    cache, rows = _fork_history([23, 5, 40], 2, 16, 4, torch.float32, 3)
    q, kc, vc, bt, sl, starts, shared, most = _inputs(cache, rows, 4, 3)
    q = 3 * q
    sinks = torch.linspace(-3, 3, 4) if with_sinks else None
    kw = dict(scale=0.25, sliding_window=window, softcap=softcap, sinks=sinks)
    want = paged_decode_attention(q, kc, vc, bt, sl, backend="reference", **kw)
    got = shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, max_group_rows=most, backend="reference",
                                         **kw)
    assert_close(got, want, torch.float32, "reference")
    plain = paged_decode_attention(q, kc, vc, bt, sl, scale=0.25, sliding_window=window, backend="reference")
    assert (want - plain).abs().max() > 0.05, "the cap or the sinks should change these rows"
    from ivg_kernels._backend import triton_available

    if triton_available():
        args = [x.to(DEVICE) for x in (q, kc, vc, bt, sl, starts, shared)]
        kw["sinks"] = None if sinks is None else sinks.to(DEVICE)
        got = shared_prefix_decode_attention(*args, max_group_rows=most, num_splits=3, backend="triton", **kw)
        torch.testing.assert_close(got.float().cpu(), want, atol=ATOL[torch.float32], rtol=0)
