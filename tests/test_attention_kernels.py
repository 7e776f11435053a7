"""Paged attention and KV writes: Triton (interpreter on CPU, CUDA on a GPU) against the references,
and the references against dense causal attention."""
import math

import pytest
import torch

from ivg_kernels.attention import (paged_decode_attention, paged_prefill_attention, shared_prefix_decode_attention,
                                   write_kv)
from ivg_kernels.block_manager import BlockManager

from ivg_kernels.reference.attention import _decode_rows as _DECODE_ROWS

from .helpers import DEVICE, assert_close, requires_triton

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _setup(lens, h_kv, d, bs, dtype, num_blocks=None, shuffle=True, seed=0):
    """A block manager with ragged sequences, caches filled through write_kv (reference), and the dense K/V."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_blocks or sum(-(-n // bs) for n in lens) + 3
    bm = BlockManager(num_blocks, bs)
    if shuffle:  # scatter the free list so that tables are not contiguous
        bm._free = torch.randperm(num_blocks, generator=gen).tolist()
    seqs = bm.new_sequences(len(lens))
    slots = bm.append(seqs, lens)
    t = sum(lens)
    k = torch.randn(t, h_kv, d, generator=gen).to(dtype)
    v = torch.randn(t, h_kv, d, generator=gen).to(dtype)
    kc = torch.zeros(num_blocks, bs, h_kv, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    write_kv(kc, vc, k, v, slots, backend="reference")
    return bm, seqs, kc, vc, k, v


def _dense_causal(q, k, v, q_pos, scale, window):
    """Plain attention for one sequence: q [M, H, D] at positions q_pos over k/v [L, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("mhd,lhd->hml", q.double(), k) * scale
    kp = torch.arange(k.shape[0])
    allowed = kp[None, :] <= q_pos[:, None]
    if window:
        allowed &= q_pos[:, None] - kp[None, :] < window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hml,lhd->mhd", s.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
def test_references_match_dense_attention(window):
    lens, h, h_kv, d, bs = [7, 1, 20], 4, 2, 8, 4
    bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, torch.float32)
    scale = d ** -0.5
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    q = torch.randn(sum(lens), h, d)
    cu = torch.tensor([0, 7, 8, 28], dtype=torch.int32)
    out = paged_prefill_attention(q, kc, vc, bt, sl, cu, max_seqlen_q=20, scale=scale, sliding_window=window,
                                  backend="reference")
    dec = paged_decode_attention(q[cu[1:] - 1], kc, vc, bt, sl, scale=scale, sliding_window=window, backend="reference")
    for b, n in enumerate(lens):
        s, e = cu[b].item(), cu[b + 1].item()
        dense = _dense_causal(q[s:e], k[s:e], v[s:e], torch.arange(n), scale, window)
        assert_close(out[s:e], dense, torch.float32, f"prefill seq {b}")
        assert_close(dec[b], dense[-1], torch.float32, f"decode seq {b}")


@pytest.mark.parametrize("budget", [1, 300, None])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("new", [[3, 1, 5, 0, 12], [3, 3, 0, 3, 3]], ids=["padded", "dense"])
def test_prefill_reference_extends_in_groups(monkeypatch, budget, window, new):
    """Extends (the last m of each sequence's tokens as queries, one sequence with none) give dense
    attention however the reference groups the sequences into padded batches, and when every
    sequence of a group has as many queries (no padding: the speculative decoder's verification)."""
    from ivg_kernels.reference import attention as ref

    if budget is not None:
        monkeypatch.setattr(ref, "PREFILL_BATCH_ELEMENTS", budget)
    lens, h, h_kv, d, bs = [7, 3, 20, 9, 12], 4, 2, 8, 4
    bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, torch.float32, seed=3)
    starts = [sum(lens[:b]) for b in range(len(lens))]
    q = torch.randn(sum(new), h, d)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    out = paged_prefill_attention(q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs), cu, max_seqlen_q=max(new),
                                  scale=d ** -0.5, sliding_window=window, backend="reference")
    for b, (n, m) in enumerate(zip(lens, new)):
        s, e = cu[b].item(), cu[b + 1].item()
        if m == 0:
            continue
        kb, vb = k[starts[b]:starts[b] + n], v[starts[b]:starts[b] + n]
        dense = _dense_causal(q[s:e], kb, vb, torch.arange(n - m, n), d ** -0.5, window)
        assert_close(out[s:e], dense, torch.float32, f"extend seq {b}")


@pytest.mark.parametrize("new", [[3, 1, 5, 0, 12], [2, 2, 2, 2, 2]])
def test_prefill_plan_is_made_once_and_reused_by_every_layer(new):
    """A plan made from the tables gives each layer (here: two caches) exactly the output of a call
    that plans for itself; a plan of the wrong type is refused by name."""
    from ivg_kernels.reference.attention import prefill_plan

    lens, h, h_kv, d, bs = [7, 3, 20, 9, 12], 4, 2, 8, 4
    layers = [_setup(lens, h_kv, d, bs, torch.float32, seed=s) for s in (5, 6)]
    bm, seqs = layers[0][0], layers[0][1]
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(new), h, d)
    plan = prefill_plan(bt, sl, cu, bs, 5)
    for _, _, kc, vc, _, _ in layers:
        args = (q, kc, vc, bt, sl, cu)
        kw = dict(max_seqlen_q=max(new), scale=0.3, sliding_window=5, backend="reference")
        assert torch.equal(paged_prefill_attention(*args, **kw, plan=plan), paged_prefill_attention(*args, **kw))
    with pytest.raises(ValueError, match="plan="):
        paged_prefill_attention(q, *layers[0][2:4], bt, sl, cu, max_seqlen_q=max(new), scale=0.3, plan={})


@pytest.mark.parametrize("window", [None, 1, 5, 40])
@pytest.mark.parametrize("lens", [[13] * 3, [5, 13, 5, 13, 0], [0, 0]], ids=["one-length", "mixed", "empty"])
def test_decode_plan_is_made_once_and_reused_by_every_layer(window, lens):
    """A decode plan made from the tables (what ivg.PagedModel makes once per forward) gives each layer
    exactly the output of a call that plans for itself, and None where no row has a key."""
    from ivg_kernels.reference.attention import decode_plan, paged_decode_attention_ref

    h, h_kv, d, bs = 6, 2, 8, 4
    layers = [_setup(lens, h_kv, d, bs, torch.float32, seed=s) for s in (5, 6)]
    bm, seqs = layers[0][0], layers[0][1]
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    plan = decode_plan(bt, sl, bs, window)
    assert (plan is None) == (max(lens) == 0)
    q = torch.randn(len(lens), h, d)
    for _, _, kc, vc, _, _ in layers:
        alone = paged_decode_attention_ref(q, kc, vc, bt, sl, scale=0.3, sliding_window=window)
        if plan is None:
            assert torch.equal(alone, torch.zeros_like(q))
            continue
        planned = paged_decode_attention_ref(q, kc, vc, bt, sl, scale=0.3, sliding_window=window, plan=plan)
        assert torch.equal(planned, alone)
        assert planned.abs().sum() > 0
        public = paged_decode_attention(q, kc, vc, bt, sl, scale=0.3, sliding_window=window, backend="reference",
                                        plan=plan)
        assert torch.equal(public, alone)
    with pytest.raises(ValueError, match="plan="):
        paged_decode_attention(q, *layers[0][2:4], bt, sl, scale=0.3, backend="reference", plan={})


@pytest.mark.parametrize("window", [None, 1, 4, 5, 9, 40])
@pytest.mark.parametrize("lens", [[1] * 3, [4] * 3, [13] * 3, [5] * 4 + [13] * 4 + [0] * 4, [5, 13, 5, 13, 0]],
                         ids=["one-1", "one-4", "one-13", "runs", "mixed"])
def test_decode_reference_with_and_without_a_mask_matches_dense_attention(window, lens):
    """On the CPU the reference attends rows of one length (the beams of a prompt) without a mask, and
    rows of several lengths with one: windows that end inside a block, on a block
    boundary or beyond the sequence, GQA, shuffled blocks, empty rows (output 0)."""
    h, h_kv, d, bs = 6, 2, 8, 4
    bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, torch.float64, seed=len(lens))
    q = torch.randn(len(lens), h, d, dtype=torch.float64)
    dec = paged_decode_attention(q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs), scale=0.3,
                                 sliding_window=window, backend="reference")
    start = 0
    for b, n in enumerate(lens):
        kb, vb = k[start:start + n], v[start:start + n]
        start += n
        want = _dense_causal(q[b:b + 1], kb, vb, torch.tensor([n - 1]), 0.3, window)[0] if n else torch.zeros(h, d)
        assert torch.allclose(dec[b], want.double(), atol=1e-12), f"row {b} (length {n})"


@pytest.mark.parametrize("budget", [1, 1300, 3400])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap,with_sinks", [(None, False), (2.0, True)])
@pytest.mark.parametrize("lens", [[13] * 7, [5, 13, 5, 13, 0, 9, 1]], ids=["one-length", "mixed"])
def test_decode_reference_in_slices_of_rows_is_exact(monkeypatch, one_thread, budget, window, softcap, with_sinks,
                                                     lens):
    """On the CPU the decode reference gathers and attends the rows in slices of at most ``CPU_GATHER_BYTES``
    (one row per call at 1 byte; rows of 13 keys take 1,664 bytes here, rows of 5 keys 640): every slicing gives the output of one
    call bit for bit, and dense attention (GQA, windows, soft-capping, sinks, rows of mixed lengths, an empty
    row)."""
    from ivg_kernels.reference import attention as ref

    h, h_kv, d, bs = 4, 2, 8, 4
    bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, torch.float32, seed=7)
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    q = 3 * torch.randn(len(lens), h, d, generator=torch.Generator().manual_seed(2))
    sinks = torch.linspace(-3, 3, h) if with_sinks else None
    kw = dict(scale=d ** -0.5, sliding_window=window, softcap=softcap, sinks=sinks)
    whole = ref.paged_decode_attention_ref(q, kc, vc, bt, sl, **kw)
    monkeypatch.setattr(ref, "CPU_GATHER_BYTES", budget)
    calls = []
    monkeypatch.setattr(ref, "_decode_rows", lambda q, *a: calls.append(len(q)) or _DECODE_ROWS(q, *a))
    sliced = ref.paged_decode_attention_ref(q, kc, vc, bt, sl, **kw)
    assert len(calls) > 1 and sum(calls) == len(lens), calls  # the rows went in several slices
    assert torch.equal(sliced, whole)
    start = 0
    for b, n in enumerate(lens):
        want = (_dense_capped(q[b:b + 1], k[start:start + n], v[start:start + n], torch.tensor([n - 1]), d ** -0.5,
                              window, softcap, sinks)[0] if n else torch.zeros(h, d))
        start += n
        assert_close(sliced[b], want.float(), torch.float32, f"row {b} (length {n})")


def test_write_kv_skips_negative_slots():
    bm, seqs, kc, vc, k, v = _setup([3], 1, 4, 4, torch.float32)
    before = kc.clone()
    write_kv(kc, vc, torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.tensor([-1, -1]), backend="reference")
    assert torch.equal(kc, before)
    new = torch.arange(8.0).view(2, 1, 4)
    write_kv(kc, vc, new, -new, torch.tensor([-1, 5]), backend="reference")
    after = before.clone()
    after.view(-1, 1, 4)[5] = new[1]
    assert torch.equal(kc, after) and torch.equal(vc.view(-1, 1, 4)[5], -new[1])




@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,h_kv,d", [(4, 4, 16), (6, 2, 24), (8, 1, 64)])
def test_write_kv_triton_matches_reference(dtype, h, h_kv, d):
    gen = torch.Generator().manual_seed(1)
    kc = torch.zeros(9, 4, h_kv, d, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    key = torch.randn(7, h_kv * 2, d, generator=gen).to(dtype).to(DEVICE)[:, ::2]  # strided heads
    value = torch.randn(7, h_kv, d, generator=gen).to(dtype).to(DEVICE)
    slots = torch.tensor([0, 5, 35, -1, 17, 3, 22], device=DEVICE)
    kr, vr = kc.clone(), vc.clone()
    write_kv(kr, vr, key, value, slots, backend="reference")
    write_kv(kc, vc, key, value, slots, backend="triton")
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


DECODE_CASES = [
    # lens, h, h_kv, d, block_size, window, num_splits
    ([1, 7, 33], 4, 4, 16, 4, None, 0),
    ([5, 50, 111], 6, 2, 24, 16, None, 3),
    ([300, 17], 8, 1, 64, 16, None, 0),
    ([64, 100, 9], 4, 2, 32, 8, 16, 0),
    ([257], 2, 2, 8, 32, 100, 4),
    ([0, 50, 111], 4, 2, 16, 16, None, 3),  # an empty row across splits: every split's partial empty, output 0
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_decode_triton_matches_reference(case, dtype):
    lens, h, h_kv, d, bs, window, splits = case
    bm, seqs, kc, vc, _, _ = _setup(lens, h_kv, d, bs, dtype, seed=len(lens))
    q = torch.randn(len(lens), h, d).to(dtype)
    args = [x.to(DEVICE) for x in (q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs))]
    want = paged_decode_attention(*args, scale=d ** -0.5, sliding_window=window, backend="reference")
    got = paged_decode_attention(*args, scale=d ** -0.5, sliding_window=window, num_splits=splits, backend="triton")
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"case{i}" for i in range(len(DECODE_CASES))])
def test_decode_tiles_of_64_keys_match_reference(case, dtype, monkeypatch):
    """16-bit caches read rows of ``_LONG_KEYS`` keys or more in tiles of 64 keys (several blocks, a tile
    crossing a split's and a window's edges): the threshold lowered to 0, every case above takes that path."""
    from ivg_kernels._triton import attention_kernels as ak

    monkeypatch.setattr(ak, "_LONG_KEYS", 0)
    lens, h, h_kv, d, bs, window, splits = case
    bm, seqs, kc, vc, _, _ = _setup(lens, h_kv, d, bs, dtype, seed=len(lens) + 3)
    q = torch.randn(len(lens), h, d).to(dtype)
    args = [x.to(DEVICE) for x in (q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs))]
    assert ak._decode_plan(len(lens), h, d, h_kv, bs, args[3].shape[1], splits, False, False)[4]["BLOCK_N"] == 64
    want = paged_decode_attention(*args, scale=d ** -0.5, sliding_window=window, backend="reference")
    got = paged_decode_attention(*args, scale=d ** -0.5, sliding_window=window, num_splits=splits, backend="triton")
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)


PREFILL_CASES = [
    # lens, new tokens per sequence, h, h_kv, d, block_size, window
    ([9, 1, 40], [9, 1, 40], 4, 2, 16, 4, None),  # prompt prefill
    ([30, 21], [5, 1], 6, 3, 24, 8, None),  # chunks after a cached prefix
    ([70], [33], 2, 1, 64, 16, 20),  # sliding window
    ([17, 18, 19], [3, 17, 1], 8, 8, 8, 16, 4),
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[f"case{i}" for i in range(len(PREFILL_CASES))])
def test_prefill_triton_matches_reference(case, dtype):
    lens, new, h, h_kv, d, bs, window = case
    bm, seqs, kc, vc, _, _ = _setup(lens, h_kv, d, bs, dtype, seed=sum(new))
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(new), h, d).to(dtype)
    args = [x.to(DEVICE) for x in (q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs), cu)]
    want = paged_prefill_attention(*args, max_seqlen_q=max(new), scale=d ** -0.5, sliding_window=window,
                                   backend="reference")
    got = paged_prefill_attention(*args, max_seqlen_q=max(new), scale=d ** -0.5, sliding_window=window,
                                  backend="triton")
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)


def test_bad_inputs_name_the_argument():
    kc = torch.zeros(4, 4, 2, 8)
    bt = torch.zeros(1, 2, dtype=torch.int32)
    sl = torch.ones(1, dtype=torch.int32)
    q = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="q=.*multiple of num_kv_heads"):
        paged_decode_attention(torch.zeros(1, 3, 8), kc, kc, bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="q=.*head_dim 8"):
        paged_decode_attention(torch.zeros(1, 4, 6), kc, kc, bt, sl, scale=1.0)
    with pytest.raises(ValueError, match=r"block_table=.*: expected dtype torch.int32 \(call .int\(\)\)"):
        paged_decode_attention(q, kc, kc, bt.long(), sl, scale=1.0)
    with pytest.raises(ValueError, match=r"seq_lens=.*1 rows \(one per row of q\)"):
        paged_decode_attention(q, kc, kc, bt, torch.ones(2, dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match=r"block_table=.*: expected a 2-D integer tensor$"):
        paged_prefill_attention(q, kc, kc, bt[0], sl, torch.zeros(2, dtype=torch.int32), max_seqlen_q=1, scale=1.0)
    # a wrong shared_lens is told apart from a wrong group_starts: the offsets are one more than the groups
    with pytest.raises(ValueError, match=r"group_starts=.*with 3 rows \(shared_lens' length 2, plus one\)"):
        shared_prefix_decode_attention(q, kc, kc, bt, sl, torch.tensor([0, 1], dtype=torch.int32),
                                       torch.tensor([0, 0], dtype=torch.int32), max_group_rows=1, scale=1.0)
    with pytest.raises(ValueError, match="scale="):
        paged_decode_attention(q, kc, kc, bt, sl, scale=0.0)
    with pytest.raises(ValueError, match="sliding_window="):
        paged_decode_attention(q, kc, kc, bt, sl, scale=1.0, sliding_window=0)
    # an infinite scale made NaN outputs, and a window past int64 an OverflowError deep in the reference
    with pytest.raises(ValueError, match="scale=inf: expected a finite positive float"):
        paged_decode_attention(q, kc, kc, bt, sl, scale=math.inf)
    with pytest.raises(ValueError, match=r"sliding_window=2147483648: expected None or an int from 1 to 2147483647"):
        paged_decode_attention(q, kc, kc, bt, sl, scale=1.0, sliding_window=2 ** 31)
    with pytest.raises(ValueError, match="sliding_window="):
        paged_decode_attention(q, kc, kc, bt, sl, scale=1.0, sliding_window=2 ** 70)
    assert paged_decode_attention(q, kc, kc, bt, sl, scale=1.0, sliding_window=2 ** 31 - 1).shape == q.shape
    with pytest.raises(ValueError, match="v_cache="):
        paged_decode_attention(q, kc, torch.zeros(4, 4, 2, 4), bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="k_cache="):
        paged_decode_attention(q, torch.zeros(4, 4, 8), kc, bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="q=.*dtype"):
        paged_decode_attention(q.half(), kc, kc, bt, sl, scale=1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q="):
        paged_prefill_attention(q, kc, kc, bt, sl, torch.zeros(5, dtype=torch.int32), max_seqlen_q=1, scale=1.0)
    with pytest.raises(ValueError, match="max_seqlen_q="):
        paged_prefill_attention(q, kc, kc, bt, sl, torch.zeros(2, dtype=torch.int32), max_seqlen_q=-1, scale=1.0)
    with pytest.raises(ValueError, match="key="):
        write_kv(kc, kc.clone(), torch.zeros(2, 3, 8), torch.zeros(2, 2, 8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping="):
        write_kv(kc, kc.clone(), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), torch.zeros(3, dtype=torch.int64))


@requires_triton
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "softcap-sinks"])
def test_eager_calls_launch_directly_and_the_ops_agree(extras):
    """Eager calls of every Triton attention op skip the torch op's dispatch (no ``ivg_kernels::`` event
    in the profiler: one plain launch per kernel), and the registered ops, which torch.compile uses,
    give the same results (with soft-capping and sinks too: the ops' optional arguments)."""
    bm, seqs, kc, vc, _, _ = _setup([5, 9, 14], 2, 16, 4, torch.float32, seed=4)
    q = torch.randn(3, 4, 16)
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    starts, shared = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    key = torch.randn(3, 2, 16)
    slots = torch.tensor([1, 2, 3])
    # (on a GPU machine the kernels need CUDA tensors: the interpreter runs only where there is no GPU)
    kc, vc, q, bt, sl, cu, starts, shared, key, slots = (x.to(DEVICE) for x in (kc, vc, q, bt, sl, cu, starts, shared,
                                                                               key, slots))
    k2, v2 = kc.clone(), vc.clone()
    cap, sinks = (0.5, torch.linspace(-2, 2, 4, device=DEVICE)) if extras else (None, None)
    kw = dict(softcap=cap, sinks=sinks)
    ex = (float(cap or 0.0), sinks)  # the ops' softcap (0.0: none) and sinks
    calls = {
        "paged_decode_attention": (lambda: paged_decode_attention(q, kc, vc, bt, sl, scale=0.25, backend="triton",
                                                                  **kw),
                                   (q, kc, vc, bt, sl, 0.25, 0, 0, *ex)),
        "paged_prefill_attention": (lambda: paged_prefill_attention(q, kc, vc, bt, sl, cu, max_seqlen_q=1, scale=0.25,
                                                                    backend="triton", **kw),
                                    (q, kc, vc, bt, sl, cu, 1, 0.25, 0, *ex)),
        "shared_prefix_decode_attention": (
            lambda: shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, max_group_rows=3, scale=0.25,
                                                   backend="triton", **kw),
            (q, kc, vc, bt, sl, starts, shared, 3, 0.25, 0, 0, *ex)),
        "write_kv": (lambda: write_kv(kc, vc, key, key, slots, backend="triton"), (k2, v2, key, key, slots)),
    }
    unrun = None  # why the registered ops could not run here
    for name, (eager, op_args) in calls.items():
        with torch.profiler.profile() as prof:
            got = eager()
        assert not any("ivg_kernels::" in e.name for e in prof.events()), f"{name}: eager call dispatched the op"
        try:
            want = getattr(torch.ops.ivg_kernels, name)(*op_args)
        except RuntimeError as e:  # torch 2.11's wrap_triton takes no interpreted kernel (2.13's does)
            if DEVICE.type == "cpu" and "wrap_triton only works" in str(e):
                unrun = f"torch {torch.__version__} runs no triton_op in the Triton interpreter (eager calls checked)"
                continue
            raise
        if name == "write_kv":
            assert torch.equal(kc, k2) and torch.equal(vc, v2)
        else:
            assert torch.equal(got, want), name
    if unrun:
        pytest.skip(unrun)


def test_table_values_are_checked_on_the_reference_backend():
    """Lengths past a row's table, block ids outside the cache, slots outside it or written twice, and query
    runs longer than their sequence: named (on the host; the Triton backend trusts them, as documented)."""
    kc = torch.zeros(4, 4, 2, 8)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    sl = torch.tensor([5, 7], dtype=torch.int32)
    q = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"seq_lens=.*lengths in \[0, 8\] .*row 1 holds 9"):
        paged_decode_attention(q, kc, kc, bt, torch.tensor([5, 9], dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match=r"seq_lens=.*row 0 holds -1"):
        paged_decode_attention(q, kc, kc, bt, torch.tensor([-1, 7], dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match=r"block_table=.*block ids in \[0, 4\).*row 1, column 1 holds 9"):
        paged_decode_attention(q, kc, kc, torch.tensor([[0, 1], [2, 9]], dtype=torch.int32), sl, scale=1.0)
    with pytest.raises(ValueError, match=r"block_table=.*pad with 0\); row 0, column 1 holds -5"):  # (past row 0's)
        paged_decode_attention(q, kc, kc, torch.tensor([[0, -5], [2, 3]], dtype=torch.int32),
                               torch.tensor([4, 7], dtype=torch.int32), scale=1.0)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q=.*sequence 0 has 3 of 2"):
        paged_prefill_attention(torch.zeros(5, 4, 8), kc, kc, bt, torch.tensor([2, 7], dtype=torch.int32),
                                torch.tensor([0, 3, 5], dtype=torch.int32), max_seqlen_q=3, scale=1.0)
    with pytest.raises(ValueError, match=r"cu_seqlens_q=.*from 0 to the 3 query rows"):
        paged_prefill_attention(torch.zeros(3, 4, 8), kc, kc, bt, sl, torch.tensor([0, 2, 1], dtype=torch.int32),
                                max_seqlen_q=2, scale=1.0)
    with pytest.raises(ValueError, match=r"max_seqlen_q=1: expected at least 2"):
        paged_prefill_attention(torch.zeros(3, 4, 8), kc, kc, bt, sl, cu, max_seqlen_q=1, scale=1.0)
    kv = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match=r"slot_mapping=.*slots below 16 .*got 16"):
        write_kv(kc, kc.clone(), kv, kv, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match=r"slot_mapping=.*each slot once"):
        write_kv(kc, kc.clone(), kv, kv, torch.tensor([3, 3]))
    write_kv(kc, kc.clone(), kv, kv, torch.tensor([-1, -1]))  # negative slots are skipped, any number of them


# Logit soft-capping (Gemma 2) and attention sinks (gpt-oss): every op, both backends.
def _dense_capped(q, k, v, q_pos, scale, window, softcap, sinks):
    """:func:`_dense_causal` with soft-capping and sinks as transformers' eager attention forms them: the scores
    capped to ``softcap * tanh(s / softcap)``, then one more column per head holding its sink logit, the softmax
    over all of them, and the sink's column dropped."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("mhd,lhd->hml", q.double(), k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    kp = torch.arange(k.shape[0])
    allowed = kp[None, :] <= q_pos[:, None]
    if window:
        allowed &= q_pos[:, None] - kp[None, :] < window
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(-1, 1, 1).expand(-1, s.shape[1], 1)], dim=-1)
    return torch.einsum("hml,lhd->mhd", s.softmax(-1)[..., :k.shape[0]], v)


CAPS = [(None, False), (0.5, False), (None, True), (2.0, True)]  # (softcap, sinks)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap,with_sinks", CAPS)
def test_softcap_and_sinks_references_match_dense_attention(window, softcap, with_sinks):
    """Scores large enough that a cap of 0.5 or 2 bites, sinks spread over [-3, 3]: prefill and decode as
    transformers' eager attention computes them (float64)."""
    lens, h, h_kv, d, bs = [7, 1, 20], 4, 2, 8, 4
    bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, torch.float64)
    scale = d ** -0.5
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    q = 3 * torch.randn(sum(lens), h, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sinks = torch.linspace(-3, 3, h, dtype=torch.float64) if with_sinks else None
    cu = torch.tensor([0, 7, 8, 28], dtype=torch.int32)
    kw = dict(scale=scale, sliding_window=window, softcap=softcap, sinks=sinks, backend="reference")
    out = paged_prefill_attention(q, kc, vc, bt, sl, cu, max_seqlen_q=20, **kw)
    dec = paged_decode_attention(q[cu[1:] - 1], kc, vc, bt, sl, **kw)
    plain = paged_decode_attention(q[cu[1:] - 1], kc, vc, bt, sl, scale=scale, sliding_window=window,
                                   backend="reference")
    if softcap is not None or with_sinks:
        assert (dec - plain).abs().max() > 0.05, "the cap or the sinks should change these rows"
    for b, n in enumerate(lens):
        s, e = cu[b].item(), cu[b + 1].item()
        dense = _dense_capped(q[s:e], k[s:e], v[s:e], torch.arange(n), scale, window, softcap, sinks)
        assert_close(out[s:e], dense, torch.float64, f"prefill seq {b}")
        assert_close(dec[b], dense[-1], torch.float64, f"decode seq {b}")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,with_sinks", CAPS[1:])
@pytest.mark.parametrize("case", [0, 2, 3, 4], ids=lambda i: f"case{i}")
def test_softcap_and_sinks_triton_match_reference(case, softcap, with_sinks, dtype):
    """Decode (one split, and several merged by the reduce kernel, with windows) and prefill: the Triton kernels
    with soft-capping and sinks (in the model's dtype, as a model's parameter is) against the reference."""
    lens, h, h_kv, d, bs, window, splits = DECODE_CASES[case]
    bm, seqs, kc, vc, _, _ = _setup(lens, h_kv, d, bs, dtype, seed=len(lens) + 5)
    q = (3 * torch.randn(len(lens), h, d)).to(dtype)
    sinks = torch.linspace(-3, 3, h).to(dtype).to(DEVICE) if with_sinks else None
    args = [x.to(DEVICE) for x in (q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs))]
    kw = dict(scale=d ** -0.5, sliding_window=window, softcap=softcap, sinks=sinks)
    for n_splits in {splits, 3}:
        want = paged_decode_attention(*args, backend="reference", **kw)
        got = paged_decode_attention(*args, num_splits=n_splits, backend="triton", **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)
    new = [min(n, 3) for n in lens]
    cu = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    qp = (3 * torch.randn(sum(new), h, d)).to(dtype).to(DEVICE)
    want = paged_prefill_attention(qp, *args[1:], cu, max_seqlen_q=3, backend="reference", **kw)
    got = paged_prefill_attention(qp, *args[1:], cu, max_seqlen_q=3, backend="triton", **kw)
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)


def test_softcap_and_sinks_errors_name_the_argument():
    kc = torch.zeros(4, 4, 2, 8)
    bt = torch.zeros(1, 2, dtype=torch.int32)
    sl = torch.ones(1, dtype=torch.int32)
    q = torch.zeros(1, 4, 8)
    for bad in (0.0, -1.0, float("inf"), True, "30"):
        with pytest.raises(ValueError, match="softcap=.*positive finite float"):
            paged_decode_attention(q, kc, kc, bt, sl, scale=1.0, softcap=bad)
    for bad in (torch.zeros(3), torch.zeros(1, 4), [0.0] * 4):
        with pytest.raises(ValueError, match=r"sinks=.*one logit per query head \(4\)"):
            paged_decode_attention(q, kc, kc, bt, sl, scale=1.0, sinks=bad)
    with pytest.raises(ValueError, match="sinks=.*floating-point"):
        paged_prefill_attention(q, kc, kc, bt, sl, torch.tensor([0, 1], dtype=torch.int32), max_seqlen_q=1, scale=1.0,
                                sinks=torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_references_give_a_row_the_same_bits_in_any_batch(one_thread, dtype):
    """A call pads its rows to the longest one's keys, and torch's CPU attention sums a row's keys in an order that
    depends on that padded length. The references compute 16-bit inputs in float64
    (``reference.attention.accumulation_dtype``), so a row's 16-bit output is the same bits alone as in a batch of
    rows of other lengths, in decode and prefill: which the decoder's batch invariance needs in 16 bits (in float32
    about 1 row in 140 of this test's differed once rounded to bfloat16, and tokens with it)."""
    from ivg_kernels.reference.attention import paged_decode_attention_ref, paged_prefill_attention_ref

    h, h_kv, d, bs = 8, 4, 32, 8
    lens = [1, 37, 5, 64, 23, 8, 50, 17, 3, 44, 29, 12, 61, 2, 33, 19]
    bm, seqs, kc, vc, _, _ = _setup(lens, h_kv, d, bs, dtype, seed=11)
    gen = torch.Generator().manual_seed(5)
    for trial in range(12):
        q = (3 * torch.randn(len(lens), h, d, generator=gen)).to(dtype)
        bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
        batch = paged_decode_attention_ref(q, kc, vc, bt, sl, scale=d ** -0.5)
        for b in range(len(lens)):
            alone = paged_decode_attention_ref(q[b:b + 1], kc, vc, bt[b:b + 1], sl[b:b + 1], scale=d ** -0.5)
            assert torch.equal(alone[0], batch[b]), f"decode, trial {trial}, row {b} (length {lens[b]})"
    new = [1, 6, 3, 9, 2, 7, 4, 5, 1, 8, 3, 6, 2, 9, 5, 4]  # each sequence's last tokens as an extend's queries
    cu = torch.tensor([0] + new).cumsum(0).to(torch.int32)
    q = (3 * torch.randn(int(cu[-1]), h, d, generator=gen)).to(dtype)
    bt, sl = bm.block_table(seqs), bm.seq_lens(seqs)
    batch = paged_prefill_attention_ref(q, kc, vc, bt, sl, cu, scale=d ** -0.5)
    for b in range(len(lens)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        alone = paged_prefill_attention_ref(q[rows], kc, vc, bt[b:b + 1], sl[b:b + 1],
                                            torch.tensor([0, new[b]], dtype=torch.int32), scale=d ** -0.5)
        assert torch.equal(alone, batch[rows]), f"prefill, sequence {b} (length {lens[b]})"
