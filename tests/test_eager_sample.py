"""Repeated eager calls of guided_sample (ivg_kernels/_eager_sample.py): a call of a signature already checked
and launched skips the checks and the planning, and must still draw exactly what the reference draws for its
own arguments, raise on bad ones, and keep no argument alive."""
import gc
import weakref

import pytest
import torch

import ivg_kernels
from ivg_kernels import _eager_sample, sampling
from ivg_kernels.reference.sampling import guided_sample_ref

from .helpers import DEVICE, count_checks, holds_tensor, requires_triton

pytestmark = requires_triton

V = 64


@pytest.fixture
def counted(monkeypatch):
    """Counts the full path's argument checks (``prepare_sample_args``) and starts from no remembered call."""
    return count_checks(monkeypatch, sampling, "prepare_sample_args", _eager_sample.CALLS)


def _inputs(n=3, v=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, v, generator=g) * 3).to(dtype).to(DEVICE) for _ in range(3)]


def _same(kw, x, offset):
    """guided_sample on the Triton path against the reference, for the same arguments."""
    tri = ivg_kernels.guided_sample(x[0], [(x[1], 0.5), (x[2], -0.5)], offset=offset, backend="triton", **kw)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref = guided_sample_ref(x[0].cpu(), [(x[1].cpu(), 0.5), (x[2].cpu(), -0.5)], offset=cpu(offset),
                            **{k: cpu(v) for k, v in kw.items()})
    assert torch.equal(tri.tokens.cpu(), ref.tokens), (kw, offset)
    assert torch.equal(tri.ok.cpu(), ref.ok)
    torch.testing.assert_close(tri.logprob.cpu(), ref.logprob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.input_logprobs.cpu(), ref.input_logprobs, rtol=1e-5, atol=1e-5)


CONFIGS = [
    dict(temperature=0.7, seed=5),
    dict(temperature=1, top_k=5, seed=5),
    dict(temperature=0.9, top_p=0.8, seed=2 ** 40),
    dict(temperature=0.0, seed=5),
    dict(temperature=1.3, min_p=0.1, top_k=20, seed=5, vocab_size=V - 7),
    dict(temperature="rows", top_p="rows", seed="rows"),
]


def _kw(cfg, n=3):
    rows = {"temperature": torch.tensor([0.5, 1.0, 2.0][:n]), "top_p": torch.tensor([0.5, 0.9, 1.0][:n]),
            "seed": torch.tensor([3, 4, 5][:n])}
    return {k: (rows[k].to(DEVICE) if v == "rows" else v) for k, v in cfg.items()}


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_memoised_calls_draw_what_the_reference_draws(counted, cfg):
    """The first call of a kind is checked, the next ones of that kind are not (the spy counts one check), and
    every call, with its own offset, draws the reference's tokens for its arguments."""
    x, kw = _inputs(), _kw(CONFIGS[cfg])
    for offset in (2, 3, 5, 6):  # one class of ints for the kernels' specialisation: one signature
        _same(kw, x, offset)
    assert len(counted) == 1, "calls after the first were checked again"
    y = _inputs(seed=1)  # other tensors of the same kind: the same signature, their own values
    _same(kw, y, 7)
    assert len(counted) == 1


def test_a_call_of_another_kind_is_checked_and_draws_for_its_own_arguments(counted, monkeypatch):
    """Every part of a signature that the launch takes as a constant (values of the scalars and weights,
    filters, vocabulary, dtypes, strides) or that decides the checks and the backend makes a new signature."""
    x = _inputs()
    base = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.0, seed=5)
    _same(base, x, 2)
    changes = [dict(temperature=0.8), dict(temperature=1), dict(top_k=6), dict(top_p=0.95), dict(min_p=0.2),
               dict(seed=16), dict(vocab_size=V - 1), dict(seed=torch.tensor([1, 2, 3], device=DEVICE))]
    for i, change in enumerate(changes):
        _same({**base, **change}, x, 2)
        assert len(counted) == 2 + i, change
    n = len(counted)
    weights = ivg_kernels.guided_sample(x[0], [(x[1], 0.25), (x[2], -0.5)], offset=2, backend="triton", **base)
    ref = guided_sample_ref(x[0].cpu(), [(x[1].cpu(), 0.25), (x[2].cpu(), -0.5)], offset=2, **base)
    assert torch.equal(weights.tokens.cpu(), ref.tokens) and len(counted) == n + 1
    half = [t.half() for t in x]
    _same(base, half, 2)
    assert len(counted) == n + 2
    wide = [torch.cat([t, t], dim=1)[:, :V] for t in x]  # another row stride
    _same(base, wide, 2)
    assert len(counted) == n + 3
    monkeypatch.setenv("IVG_BACKEND", "reference")
    auto = ivg_kernels.guided_sample(x[0], [(x[1], 0.5), (x[2], -0.5)], offset=2, **base)
    assert len(counted) == n + 4 and torch.equal(auto.tokens.cpu(), guided_sample_ref(
        x[0].cpu(), [(x[1].cpu(), 0.5), (x[2].cpu(), -0.5)], offset=2, **base).tokens)


def test_the_logits_alone_or_the_backend_setting_make_a_new_signature(counted, monkeypatch):
    """The logits' own dtype, shape and strides are in a call's signature (not only the guides'), and so is the
    environment that ``backend="auto"`` reads: a call that differs from a remembered one only there is checked and
    launched for itself."""
    x = _inputs()
    base = dict(temperature=0.7, top_k=5, seed=5)
    _same(base, x, 2)
    n = len(counted)
    for i, logits in enumerate([torch.cat([x[0], x[0]], dim=1)[:, :V],  # another row stride
                                torch.cat([x[0], x[0][:, :9]], dim=1),  # wider than the guides (V is theirs)
                                x[0].half()]):
        _same(base, [logits, x[1], x[2]], 2)
        assert len(counted) == n + 1 + i, i
    n = len(counted)
    monkeypatch.setenv("IVG_BACKEND", "triton")
    args = (x[0], [(x[1], 0.5), (x[2], -0.5)])
    want = guided_sample_ref(x[0].cpu(), [(x[1].cpu(), 0.5), (x[2].cpu(), -0.5)], offset=2, **base).tokens
    for _ in range(2):
        assert torch.equal(ivg_kernels.guided_sample(*args, offset=2, **base).tokens.cpu(), want)
    assert len(counted) == n + 1
    monkeypatch.setenv("IVG_BACKEND", "reference")
    assert torch.equal(ivg_kernels.guided_sample(*args, offset=2, **base).tokens.cpu(), want)
    assert len(counted) == n + 2  # checked again: the environment chose another backend


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=5.0), "top_k"),
    (dict(seed=True), "seed"),
    (dict(vocab_size=V + 1), "vocab_size"),
    (dict(guides="rows"), "guides[0][0]"),
    (dict(guides="weight"), "guides[0][1]"),
])
def test_bad_arguments_after_memoised_calls_still_raise(counted, bad, message):
    x = _inputs()
    good = dict(temperature=0.7, top_k=0, top_p=1.0, seed=5, offset=2)
    for offset in (2, 3):
        ivg_kernels.guided_sample(x[0], [(x[1], 0.5)], backend="triton", **{**good, "offset": offset})
    guides = [(x[1], 0.5)]
    if bad.get("guides") == "rows":
        guides = [(x[1][:2], 0.5)]
    elif bad.get("guides") == "weight":
        guides = [(x[1], float("nan"))]
    kw = {**good, **{k: v for k, v in bad.items() if k != "guides"}}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ivg_kernels.guided_sample(x[0], guides, backend="triton", **kw)


def test_memoised_calls_keep_no_argument_alive(counted):
    refs = []
    for offset in (2, 3, 5):
        x = _inputs(seed=offset)
        temperature = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
        refs += [weakref.ref(t) for t in x] + [weakref.ref(temperature)]
        out = ivg_kernels.guided_sample(x[0], [(x[1], 0.5), (x[2], -0.5)], temperature=temperature, seed=1,
                                        offset=offset, backend="triton")
        assert out.ok.all()
        del x, temperature, out
    gc.collect()
    assert len(counted) == 1
    assert not any(r() is not None for r in refs)
    assert _eager_sample.CALLS.table and not any(holds_tensor(k) or holds_tensor(v[1:])
                                                 for k, v in _eager_sample.CALLS.table.items())


def test_a_changed_module_setting_replans_a_remembered_call(counted, monkeypatch):
    """A remembered launch was planned with the sampler's settings of the time (the fallback pool's size,
    stage 1's warps): after one changes, the next call of that kind is checked and planned again."""
    from ivg_kernels._triton import sampling_kernels as sk

    x, kw = _inputs(), dict(temperature=0.7, top_p=0.9, seed=5)
    _same(kw, x, 2)
    _same(kw, x, 3)
    assert len(counted) == 1
    monkeypatch.setattr(sk, "POOL_MAX", 0)
    _same(kw, x, 5)
    assert len(counted) == 2
