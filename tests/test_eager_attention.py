"""Repeated eager calls of paged_decode_attention (ivg_kernels/_eager.py, attention.DECODE_CALLS): a call of a kind
already checked and launched skips the checks and the planning, and must still attend exactly as the reference
does over its own arguments, raise on bad ones, and keep no argument alive."""
import gc
import weakref

import pytest
import torch

from ivg_kernels import attention
from ivg_kernels.reference.attention import paged_decode_attention_ref

from .helpers import DEVICE, count_checks, holds_tensor, requires_triton

pytestmark = requires_triton

H, H_KV, D, BS, BLOCKS = 4, 2, 16, 4, 24


@pytest.fixture
def counted(monkeypatch):
    return count_checks(monkeypatch, attention, "_check_cache", attention.DECODE_CALLS)


def _case(n=3, seed=0, dtype=torch.float32, width=5):
    """Random caches, a random block table (distinct blocks per row), lengths and queries."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(BLOCKS, BS, H_KV, D, generator=g).to(dtype)
    vc = torch.randn(BLOCKS, BS, H_KV, D, generator=g).to(dtype)
    table = torch.stack([torch.randperm(BLOCKS, generator=g)[:width] for _ in range(n)]).int()
    lens = torch.randint(1, width * BS + 1, (n,), generator=g)
    q = torch.randn(n, H, D, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, kc, vc, table, lens)]


def _close(tri, ref):
    """The Triton path's output equals the reference's within the rounding of its dtype."""
    tol = 2e-5 if ref.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(tri.cpu().float(), ref.float(), rtol=tol, atol=tol)


def _same(args, **kw):
    """The Triton path against the reference, for the same arguments."""
    tri = attention.paged_decode_attention(*args, backend="triton", **kw)
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw.pop("num_splits", None)
    ref = paged_decode_attention_ref(*[t.cpu() for t in args], **kw)
    _close(tri, ref)
    assert ref.abs().sum() > 0
    return tri


CONFIGS = [
    dict(scale=0.25),
    dict(scale=0.25, num_splits=2),  # the reduce kernel too
    dict(scale=0.5, sliding_window=3, softcap=2.0),
    dict(scale=0.25, sinks="sinks", num_splits=3),
]


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_memoised_calls_attend_as_the_reference_does(counted, cfg):
    """The first call of a kind is checked, the next ones of that kind are not (the spy counts one check), and
    every call attends over its own tensors."""
    kw = dict(CONFIGS[cfg])
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.randn(H, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for seed in range(4):
        _same(_case(seed=seed), **kw)
    assert len(counted) == 1, "calls after the first were checked again"


def test_a_call_of_another_kind_is_checked_and_attends_over_its_own_arguments(counted, monkeypatch):
    """Every part of a signature that the launch takes as a constant (scale, window, softcap, splits) or that
    decides the checks, the plan and the backend (shapes, dtypes, strides, sinks) makes a new signature."""
    args = _case()
    base = dict(scale=0.25)
    _same(args, **base)
    sinks = torch.zeros(H, device=DEVICE)
    changes = [dict(scale=0.3), dict(scale=1), dict(sliding_window=2), dict(softcap=3.0), dict(num_splits=2),
               dict(sinks=sinks)]
    for i, change in enumerate(changes):
        _same(args, **{**base, **change})
        assert len(counted) == 2 + i, change
    n = len(counted)
    _same(_case(n=2), **base)  # fewer rows
    _same(_case(width=6), **base)  # a wider table
    _same(_case(dtype=torch.float16), **base)
    q, *rest = args
    wide = torch.cat([q, q], dim=2)[:, :, :D]  # another row stride of q
    _same([wide, *rest], **base)
    assert len(counted) == n + 4
    monkeypatch.setenv("IVG_BACKEND", "reference")
    auto = attention.paged_decode_attention(*args, **base)
    assert len(counted) == n + 5
    torch.testing.assert_close(auto.cpu(), paged_decode_attention_ref(*[t.cpu() for t in args], **base))


def test_the_backend_setting_is_part_of_a_decode_signature(counted, monkeypatch):
    """``backend="auto"`` reads ``IVG_BACKEND``: after it changes, a call like a remembered one is checked and
    attends on the backend now chosen."""
    args, base = _case(), dict(scale=0.25)
    monkeypatch.setenv("IVG_BACKEND", "triton")
    for _ in range(2):
        _close(attention.paged_decode_attention(*args, **base), paged_decode_attention_ref(*[t.cpu() for t in args],
                                                                                            **base))
    assert len(counted) == 1
    monkeypatch.setenv("IVG_BACKEND", "reference")
    attention.paged_decode_attention(*args, **base)
    assert len(counted) == 2


@pytest.mark.parametrize("bad, message", [
    (dict(scale=-1.0), "scale"),
    (dict(scale=True), "scale"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(softcap=float("inf")), "softcap"),
    ("table64", "block_table"),
    ("short lens", "seq_lens"),
    ("q dtype", "q="),
    ("sinks", "sinks"),
])
def test_bad_arguments_after_memoised_calls_still_raise(counted, bad, message):
    args = _case()
    for _ in range(2):
        attention.paged_decode_attention(*args, scale=0.25, backend="triton")
    q, kc, vc, table, lens = args
    kw = dict(scale=0.25)
    if bad == "table64":
        table = table.long()
    elif bad == "short lens":
        lens = lens[:2]
    elif bad == "q dtype":
        q = q.double()
    elif bad == "sinks":
        kw["sinks"] = torch.zeros(H + 1, device=DEVICE)
    else:
        kw.update(bad)
    with pytest.raises(ValueError, match=message):
        attention.paged_decode_attention(q, kc, vc, table, lens, backend="triton", **kw)


def _assert_nothing_kept(refs, remembered):
    """The calls' arguments (``refs``: weak references) are gone, and ``remembered`` holds launches but no tensor."""
    gc.collect()
    assert not any(r() is not None for r in refs)
    table = remembered.table
    assert table and not any(holds_tensor(k) for k in table)
    assert not any(holds_tensor(launch) for launch in table.values())  # (every slot of every launch)


def test_memoised_calls_keep_no_argument_alive(counted):
    refs = []
    for seed in range(3):
        args = _case(seed=seed)
        sinks = torch.zeros(H, device=DEVICE)
        refs += [weakref.ref(t) for t in args] + [weakref.ref(sinks)]
        out = attention.paged_decode_attention(*args, scale=0.25, sinks=sinks, num_splits=2, backend="triton")
        assert out.isfinite().all()
        del args, sinks, out
    _assert_nothing_kept(refs, attention.DECODE_CALLS)
    assert len(counted) == 1


def test_a_changed_module_setting_replans_a_remembered_call(counted, monkeypatch):
    """A remembered launch was planned with the module's settings of the time (the tile rule's threshold): after
    one changes, the next call of that kind is checked and planned again, and takes the new plan."""
    from ivg_kernels._triton import attention_kernels as ak

    args = _case(dtype=torch.float16)
    _same(args, scale=0.25)
    _same(args, scale=0.25)
    assert len(counted) == 1
    monkeypatch.setattr(ak, "_LONG_KEYS", 0)  # 16-bit rows read tiles of 64 keys
    _same(args, scale=0.25)
    assert len(counted) == 2
    (launch,) = [v for v in attention.DECODE_CALLS.table.values() if v.settings[0] == 0]
    assert launch.consts[0]["BLOCK_N"] == 64


@pytest.fixture
def counted_writes(monkeypatch):
    return count_checks(monkeypatch, attention, "_check_cache", attention.WRITE_CALLS)


def _write_case(t, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(t, H_KV, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    slots = torch.randperm(BLOCKS * BS, generator=g)[:t].to(DEVICE)
    slots[0] = -1  # skipped
    return key, value, slots


def _write_both(key, value, slots, dtype=torch.float32):
    """write_kv on the Triton path and the reference's write, into fresh caches; both caches compared."""
    caches = [torch.zeros(BLOCKS, BS, H_KV, D, dtype=dtype, device=DEVICE) for _ in range(4)]
    attention.write_kv(caches[0], caches[1], key, value, slots, backend="triton")
    from ivg_kernels.reference.attention import write_kv_ref

    write_kv_ref(caches[2], caches[3], key, value, slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0


def test_the_backend_setting_is_part_of_a_write_signature(counted_writes, monkeypatch):
    key, value, slots = _write_case(6, 0)
    caches = [torch.zeros(BLOCKS, BS, H_KV, D, device=DEVICE) for _ in range(2)]
    monkeypatch.setenv("IVG_BACKEND", "triton")
    for _ in range(2):
        attention.write_kv(*caches, key, value, slots)
    assert len(counted_writes) == 1
    monkeypatch.setenv("IVG_BACKEND", "reference")
    attention.write_kv(*caches, key, value, slots)
    assert len(counted_writes) == 2


def test_memoised_writes_write_what_the_reference_writes(counted_writes):
    for seed in range(4):  # one kind of call: checked once
        _write_both(*_write_case(6, seed))
    assert len(counted_writes) == 1
    _write_both(*_write_case(7, 0))  # another token count, dtype, key stride: each checked once
    _write_both(*_write_case(6, 0, torch.float16), dtype=torch.float16)
    key, value, slots = _write_case(6, 1)
    _write_both(torch.cat([key, key], dim=1)[:, :H_KV], value, slots)
    assert len(counted_writes) == 4


@pytest.mark.parametrize("bad, message", [("slots int32 on two rows", "slot_mapping"), ("value tokens", "value"),
                                          ("key heads", "key"), ("v_cache dtype", "v_cache")])
def test_bad_writes_after_memoised_calls_still_raise(counted_writes, bad, message):
    key, value, slots = _write_case(6, 0)
    kc, vc = (torch.zeros(BLOCKS, BS, H_KV, D, device=DEVICE) for _ in range(2))
    for _ in range(2):
        attention.write_kv(kc, vc, key, value, slots, backend="triton")
    if bad.startswith("slots"):
        slots = slots[:2].int()
    elif bad == "value tokens":
        value = value[:5]
    elif bad == "key heads":
        key = key[:, :1]
    else:
        vc = vc.double()
    with pytest.raises(ValueError, match=message):
        attention.write_kv(kc, vc, key, value, slots, backend="triton")


def test_memoised_writes_keep_no_argument_alive(counted_writes):
    refs = []
    for seed in range(3):
        args = [*(torch.zeros(BLOCKS, BS, H_KV, D, device=DEVICE) for _ in range(2)), *_write_case(6, seed)]
        refs += [weakref.ref(t) for t in args]
        attention.write_kv(*args, backend="triton")
        del args
    _assert_nothing_kept(refs, attention.WRITE_CALLS)
    assert len(counted_writes) == 1


@pytest.fixture
def counted_shared(monkeypatch):
    return count_checks(monkeypatch, attention, "_check_cache", attention.SHARED_CALLS)


def _shared_case(seed, dtype=torch.float32):
    """Three rows in two groups: rows 0 and 1 share their first two blocks (8 tokens), row 2 is alone."""
    q, kc, vc, table, _ = _case(n=3, seed=seed, dtype=dtype)
    table[1, :2] = table[0, :2]
    lens = torch.tensor([13, 17, 9], device=DEVICE)
    starts = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEVICE)
    shared = torch.tensor([8, 4], dtype=torch.int32, device=DEVICE)
    return q, kc, vc, table, lens, starts, shared


def _shared_same(case, **kw):
    """The Triton path against per-row attention of the reference (which the groups must not change)."""
    q, kc, vc, table, lens, starts, shared = case
    tri = attention.shared_prefix_decode_attention(*case, max_group_rows=2, backend="triton", **kw)
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw.pop("num_splits", None)
    ref = paged_decode_attention_ref(*[t.cpu() for t in (q, kc, vc, table, lens)], **kw)
    _close(tri, ref)


def test_memoised_shared_prefix_calls_attend_as_the_reference_does(counted_shared):
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for kw in (dict(scale=0.25), dict(scale=0.25, num_splits=2, sinks=sinks, softcap=3.0)):
        for seed in range(3):
            _shared_same(_shared_case(seed), **kw)
    assert len(counted_shared) == 2, "calls after the first of each kind were checked again"
    _shared_same(_shared_case(0, torch.float16), scale=0.25)  # another dtype: checked
    q, kc, vc, table, lens, starts, shared = _shared_case(1)
    _shared_same((q, kc, vc, table, lens, starts, torch.tensor([4, 4], dtype=torch.int32, device=DEVICE)),
                 scale=0.25)  # other shared lengths, same kind: not checked, and still right
    assert len(counted_shared) == 3
    with pytest.raises(ValueError, match="max_group_rows"):
        attention.shared_prefix_decode_attention(q, kc, vc, table, lens, starts, shared, max_group_rows=-1,
                                                 scale=0.25, backend="triton")


def test_memoised_shared_prefix_calls_keep_no_argument_alive(counted_shared):
    refs = []
    for seed in range(3):
        case = _shared_case(seed)
        refs += [weakref.ref(t) for t in case]
        attention.shared_prefix_decode_attention(*case, max_group_rows=2, scale=0.25, backend="triton")
        del case
    _assert_nothing_kept(refs, attention.SHARED_CALLS)
    assert len(counted_shared) == 1


@pytest.fixture
def counted_prefill(monkeypatch):
    return count_checks(monkeypatch, attention, "_check_cache", attention.PREFILL_CALLS)


def _prefill_case(seed, dtype=torch.float32, news=(3, 1, 5), lens=(9, 4, 17)):
    """Ragged new tokens (``news``) at the end of sequences of ``lens`` tokens: queries, caches, tables, lengths,
    offsets and the longest run."""
    q, kc, vc, table, _ = _case(n=len(news), seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(sum(news), H, D, generator=g).to(dtype).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, kc, vc, table, torch.tensor(lens, device=DEVICE), cu, max(news)


def _prefill_same(case, **kw):
    """The Triton path against the reference, for the same arguments."""
    from ivg_kernels.reference.attention import paged_prefill_attention_ref

    *tensors, most = case
    tri = attention.paged_prefill_attention(*tensors, max_seqlen_q=most, backend="triton", **kw)
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref = paged_prefill_attention_ref(*[t.cpu() for t in tensors], **kw)
    _close(tri, ref)
    assert ref.abs().sum() > 0


def test_memoised_prefills_attend_as_the_reference_does(counted_prefill):
    """Calls of one kind (token count, sequences, longest run, scalars) are checked once and attend over their own
    tensors; another token count, longest run, window, soft-cap or sinks is a new kind, checked once itself."""
    for seed in range(3):
        _prefill_same(_prefill_case(seed), scale=0.25)
    assert len(counted_prefill) == 1
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for seed in range(2):
        _prefill_same(_prefill_case(seed, news=(2, 2, 4), lens=(6, 3, 11)), scale=0.25)  # another token count
        _prefill_same(_prefill_case(seed, news=(4, 1, 4), lens=(9, 4, 17)), scale=0.25)  # the same count, longest 4
        _prefill_same(_prefill_case(seed, news=(2, 2, 5), lens=(6, 3, 11)), scale=0.25)  # the first kind, other runs
        _prefill_same(_prefill_case(seed), scale=0.5)
        _prefill_same(_prefill_case(seed), scale=0.5, sliding_window=3, softcap=2.0, sinks=sinks)
        _prefill_same(_prefill_case(seed, dtype=torch.float16), scale=0.25)
    assert len(counted_prefill) == 6


@pytest.mark.parametrize("bad, message", [("cu int64 rows", "cu_seqlens_q"), ("max_seqlen_q", "max_seqlen_q"),
                                          ("scale", "scale"), ("q heads", "q=")])
def test_bad_prefills_after_memoised_calls_still_raise(counted_prefill, bad, message):
    q, kc, vc, table, lens, cu, most = _prefill_case(0)
    for _ in range(2):
        attention.paged_prefill_attention(q, kc, vc, table, lens, cu, max_seqlen_q=most, scale=0.25, backend="triton")
    kw = dict(max_seqlen_q=most, scale=0.25)
    if bad == "cu int64 rows":
        cu = cu[:3]
    elif bad == "max_seqlen_q":
        kw["max_seqlen_q"] = -1
    elif bad == "scale":
        kw["scale"] = 0.0
    else:
        q = q[:, :3]
    with pytest.raises(ValueError, match=message):
        attention.paged_prefill_attention(q, kc, vc, table, lens, cu, backend="triton", **kw)


def test_memoised_prefills_keep_no_argument_alive(counted_prefill):
    refs = []
    for seed in range(3):
        *tensors, most = _prefill_case(seed)
        sinks = torch.zeros(H, device=DEVICE)
        refs += [weakref.ref(t) for t in tensors] + [weakref.ref(sinks)]
        out = attention.paged_prefill_attention(*tensors, max_seqlen_q=most, scale=0.25, sinks=sinks,
                                                backend="triton")
        assert out.isfinite().all()
        del tensors, sinks, out
    _assert_nothing_kept(refs, attention.PREFILL_CALLS)
    assert len(counted_prefill) == 1
