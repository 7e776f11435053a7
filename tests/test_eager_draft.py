"""Repeated eager calls of draft_sample (ivg_kernels.speculative.DRAFT_CALLS): a call of a signature already
checked and launched on the Triton path skips the checks, and must still draw exactly what the reference draws for
its own arguments, raise on bad ones, and keep no argument alive."""
import gc
import weakref

import pytest
import torch

import ivg_kernels
from ivg_kernels import speculative
from ivg_kernels.reference.speculative import draft_draw_ref

from .helpers import DEVICE, count_checks, holds_tensor, requires_triton

pytestmark = requires_triton

V = 96


@pytest.fixture
def counted(monkeypatch):
    """Counts the full path's argument checks (``prepare_sample_args``) and starts from no remembered call."""
    return count_checks(monkeypatch, speculative, "prepare_sample_args", speculative.DRAFT_CALLS)


def _logits(r=3, v=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, v, generator=g) * 3).to(dtype).to(DEVICE)


def _same(x, seed, offset, **kw):
    """draft_sample on the Triton path against the reference, for the same arguments."""
    got = ivg_kernels.draft_sample(x, seed=seed, offset=offset, backend="triton", **kw)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    want = draft_draw_ref(x.cpu(), seed=cpu(seed), offset=cpu(offset), **kw)
    assert torch.equal(got.cpu(), want), (kw, seed, offset)


def _keys(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def test_memoised_calls_draw_what_the_reference_draws(counted):
    """The first call of a kind is checked, the next ones of that kind are not, and each call draws the
    reference's tokens for its own logits and keys (int keys, tensor keys, a strided column of offsets)."""
    x = _logits()
    for offset in (2, 3, 2 ** 40, -5):  # every int key is one signature
        _same(x, 7, offset, temperature=0.7)
    assert len(counted) == 1, "calls after the first were checked again"
    offsets = torch.arange(12, dtype=torch.int64, device=DEVICE).view(3, 4)
    for k in range(4):  # the decoder's pattern: one column of a round's [R, S] offsets per draft (columns 0 and 2
        # start on 16 bytes, 1 and 3 do not: two signatures)
        _same(_logits(seed=k), _keys(1, 2, 3), offsets[:, k], temperature=0.7)
    assert len(counted) == 3
    for t in (0.0, 1.3):
        for offset in (4, 5):
            _same(x, 7, offset, temperature=t, vocab_size=V - 5)
    assert len(counted) == 5


def test_a_call_of_another_kind_is_checked_and_draws_for_its_own_arguments(counted, monkeypatch):
    """Every part of a signature the launch takes as a constant or the checks read makes a new signature."""
    x = _logits()
    base = dict(temperature=0.7)
    _same(x, 7, 2, **base)
    changes = [(x, 7, 2, dict(temperature=0.8)), (x, 7, 2, dict(temperature=1)), (x, 7, 2, dict(vocab_size=V - 1)),
               (x, _keys(1, 2, 3), 2, base), (x, 7, _keys(4, 5, 6).int(), base), (x.half(), 7, 2, base),
               (torch.cat([x, x], dim=1)[:, :V], 7, 2, base), (_logits(r=2), 7, 2, base)]
    for i, (logits, seed, offset, kw) in enumerate(changes):
        _same(logits, seed, offset, **kw)
        assert len(counted) == 2 + i, (seed, offset, kw)
    n = len(counted)
    monkeypatch.setenv("IVG_BACKEND", "reference")
    got = ivg_kernels.draft_sample(x, seed=7, offset=2, temperature=0.7)
    assert torch.equal(got.cpu(), draft_draw_ref(x.cpu(), seed=7, offset=2, temperature=0.7))
    assert len(counted) == n  # (the reference path checks in draft_draw_ref, not here)
    assert len(speculative.DRAFT_CALLS.table) == n  # the reference's call remembered nothing


def test_the_backend_setting_is_part_of_a_signature(counted, monkeypatch):
    """``backend="auto"`` reads ``IVG_BACKEND``: after it changes, a call like a remembered one is not launched as
    remembered but draws on the backend now chosen (the reference remembers nothing)."""
    x = _logits()
    monkeypatch.setenv("IVG_BACKEND", "triton")
    want = draft_draw_ref(x.cpu(), seed=7, offset=2, temperature=0.7)
    for _ in range(2):
        assert torch.equal(ivg_kernels.draft_sample(x, seed=7, offset=2, temperature=0.7).cpu(), want)
    assert len(counted) == 1 and len(speculative.DRAFT_CALLS.table) == 1
    from ivg_kernels import _eager

    found, real_get = [], _eager.Calls.get
    monkeypatch.setattr(_eager.Calls, "get", lambda self, sig: found.append(real_get(self, sig)) or found[-1])
    monkeypatch.setenv("IVG_BACKEND", "reference")
    assert torch.equal(ivg_kernels.draft_sample(x, seed=7, offset=2, temperature=0.7).cpu(), want)
    assert found == [None]  # looked up, and nothing remembered for this setting


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=5), "backend='triton'"),
    (dict(top_p=0.5), "backend='triton'"),
    (dict(seed=True), "seed"),
    (dict(offset=2.0), "offset"),
    (dict(vocab_size=V + 1), "vocab_size"),
    (dict(seed="rows"), "seed"),
    (dict(uniforms="given"), "backend='triton'"),
])
def test_bad_arguments_after_memoised_calls_still_raise(counted, bad, message):
    x = _logits()
    good = dict(temperature=0.7, seed=5, offset=2)
    for offset in (2, 3):
        ivg_kernels.draft_sample(x, backend="triton", **{**good, "offset": offset})
    kw = {**good, **bad}
    if bad.get("seed") == "rows":
        kw["seed"] = _keys(1, 2)  # two keys for three rows
    if bad.get("uniforms") == "given":
        kw["uniforms"] = torch.rand(3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ivg_kernels.draft_sample(x, backend="triton", **kw)


def test_memoised_calls_keep_no_argument_alive(counted):
    refs = []
    for offset in (2, 3, 5):
        x, seed = _logits(seed=offset), _keys(1, 2, 3)
        refs += [weakref.ref(x), weakref.ref(seed)]
        out = ivg_kernels.draft_sample(x, temperature=0.7, seed=seed, offset=offset, backend="triton")
        assert (out >= 0).all()
        del x, seed, out
    gc.collect()
    assert len(counted) == 1
    assert not any(r() is not None for r in refs)
    table = speculative.DRAFT_CALLS.table
    assert table and not any(holds_tensor(k) or holds_tensor(v) for k, v in table.items())
