"""Speculative sampling of the guided distribution: public functions with argument checks and backend
dispatch. The maths is in :mod:`ivg_kernels.reference.speculative`; the fused verification and draft-draw
kernels in :mod:`ivg_kernels._triton.speculative_kernels` (rows without top-k, top-p or min-p, scalar
temperature and weights, at most four guides; other calls use the reference).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from . import _eager
from ._args import _fail, _to_int64, check_scalar_param, prepare_sample_args
from ._backend import resolve_backend
from .reference import speculative as ref
from .reference.dtypes import as_dtype
from .reference.sampling import warped_probs
from .reference.speculative import SpeculativeOutput

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_verification_applies(guides, temperature, top_k, top_p, min_p) -> bool:
    """Whether the fused kernel covers the call: no filter, scalar temperature and weights, <= 4 guides."""
    scalar = lambda x: not isinstance(x, torch.Tensor)  # noqa: E731
    return (len(guides) <= 4 and all(scalar(w) for _, w in guides) and scalar(temperature) and scalar(top_k)
            and scalar(top_p) and scalar(min_p) and top_k == 0 and top_p >= 1.0 and min_p <= 0.0)


def draft_sample(draft_logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed, offset, vocab_size=None,
                 uniforms=None, backend="auto") -> torch.Tensor:
    """Draft tokens ``[R]`` drawn from the draft's warped distribution (temperature and filters as
    :func:`ivg_kernels.guided_sample`) with the draft uniform of the key ``(seed, offset)``; -1 for rows
    with NaN/inf logits. One inverse-CDF draw per row: plain torch, or on CUDA where it applies (no
    filter, a scalar temperature, ``uniforms`` not given) one fused Triton kernel (``backend``: ``"auto"``,
    ``"reference"`` or ``"triton"``), with the same tokens. An eager call of a kind already checked and
    launched on the Triton path launches at once (:mod:`ivg_kernels._eager`)."""
    sig = _draft_signature(draft_logits, temperature, top_k, top_p, min_p, seed, offset, vocab_size, uniforms, backend)
    known = DRAFT_CALLS.get(sig)
    if known is not None:
        r, dev = draft_logits.shape[0], draft_logits.device
        return known(draft_logits, _key_rows(seed, r, dev), _key_rows(offset, r, dev))
    which = resolve_backend(backend, draft_logits, triton_dtypes=_TRITON_DTYPES) if isinstance(
        draft_logits, torch.Tensor) else "reference"  # (the reference names a bad argument)
    if which == "triton" and not (fused_verification_applies([], temperature, top_k, top_p, min_p) and uniforms is None):
        if backend == "triton":
            raise ValueError("backend='triton': the fused draft draw takes no top-k/top-p/min-p, a scalar temperature "
                             "and no precomputed uniforms; use 'reference'")
        which = "reference"
    if which != "triton":
        rows = draft_logits.shape[0] if isinstance(draft_logits, torch.Tensor) and draft_logits.dim() == 2 else None
        if uniforms is not None and rows is not None and (not isinstance(uniforms, torch.Tensor)
                                                          or tuple(uniforms.shape) != (rows, 3)):
            _fail("uniforms", uniforms, f"None or a float64 tensor [{rows}, 3] (spec_uniforms of the keys)")
        return ref.draft_draw_ref(draft_logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  seed=seed, offset=offset, vocab_size=vocab_size, uniforms=uniforms)
    from ._triton.speculative_kernels import draft_launch

    a = prepare_sample_args(draft_logits, [], temperature, top_k, top_p, min_p, seed, offset, vocab_size)
    r, dev = a.num_rows, a.logits.device
    seed_rows, offset_rows = _key_rows(a.seed, r, dev), _key_rows(a.offset, r, dev)
    launch = draft_launch(a.logits, float(a.temperature), seed_rows, offset_rows, a.vocab_size)
    if sig is not None:
        DRAFT_CALLS.put(sig, launch)
    return launch(a.logits, seed_rows, offset_rows)


DRAFT_CALLS = _eager.Calls()  # draft_sample's signatures -> their DraftLaunch


def _key_rows(key, r: int, device) -> torch.Tensor:
    """A key (``seed`` or ``offset``: an int or an integer tensor ``[R]``) as the draft kernel takes it: int64
    ``[R]``, contiguous (an int as ``prepare_sample_args`` reads it, modulo 2**64)."""
    if isinstance(key, torch.Tensor):
        return key.to(torch.int64).contiguous()
    return torch.full((r,), _to_int64(key), dtype=torch.int64, device=device)


def _key_part(key):
    """A key's part of a signature: a tensor's metadata, or ``int`` for any int (every int is a valid key, and its
    value reaches the kernel in a tensor: no specialisation); None for anything else."""
    return _eager.tensor(key) if type(key) is torch.Tensor else (int if type(key) is int else None)


def _draft_signature(draft_logits, temperature, top_k, top_p, min_p, seed, offset, vocab_size, uniforms, backend):
    """What :func:`draft_sample`'s checks, backend choice and launch read of a call (:mod:`ivg_kernels._eager`), or
    None for a call that always takes the full path (uniforms given, arguments of other kinds, a trace)."""
    if (not DRAFT_CALLS.enabled or uniforms is not None or type(draft_logits) is not torch.Tensor
            or type(backend) is not str or _eager.compiling()):
        return None
    num = _eager.number
    sig = (backend, _eager.environment(backend, draft_logits), _eager.tensor(draft_logits),
           num(temperature, float, int), num(top_k, int), num(top_p, float, int), num(min_p, float, int),
           _key_part(seed), _key_part(offset), vocab_size if vocab_size is None or type(vocab_size) is int else None)
    return None if None in sig[:-1] or (vocab_size is not None and sig[-1] is None) else sig


def speculative_verify(logits, guides, draft_logits, draft_tokens, num_draft, *, temperature=1.0, top_k=0, top_p=1.0,
                       min_p=0.0, seed, offset, vocab_size=None, uniforms=None, backend="auto") -> SpeculativeOutput:
    """Accept or reject each row's drafts against the sampler's own distribution and draw its next token.

    Parameters
    ----------
    logits : ``[R, S, V]`` base logits at positions ``0 .. S-1`` (position k follows k drafts)
    guides : ``(tensor [R, S, V_i], weight)`` pairs, as :func:`ivg_kernels.guided_sample`'s
    draft_logits : ``[R, S, V_d]``, the draft's logits at every position (the last one decides the
        final token as if drafted); draft_tokens : int ``[R, S - 1]``; num_draft : int ``[R]`` in ``0 .. S-1``
    temperature, top_k, top_p, min_p, vocab_size : as ``guided_sample``
    seed : int64 ``[R]`` or int; offset : int64 ``[R, S]``, the key of each position's token
    uniforms : optional float64 ``[R, S, 3]`` (:func:`ivg_kernels.reference.speculative.spec_uniforms`)
    backend : ``"auto"`` (the fused Triton kernel on CUDA where it applies), ``"reference"`` or ``"triton"``

    Returns a :class:`~ivg_kernels.reference.speculative.SpeculativeOutput`: kept drafts per row, the new
    tokens, their log-probs under ``p``, and each input's log-prob and raw value at them.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        _fail("logits", logits, "a 3-D tensor [R, S, V]")
    r, s, _ = logits.shape
    if not isinstance(guides, (list, tuple)):
        _fail("guides", type(guides).__name__, f"a list of (tensor [{r}, {s}, V_i], weight) pairs")
    for i, pair in enumerate(guides):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], torch.Tensor) \
                or pair[0].dim() != 3 or tuple(pair[0].shape[:2]) != (r, s):
            _fail(f"guides[{i}]", _kinds(pair), f"a (tensor [{r}, {s}, V_i], weight) pair (logits' rows and positions)")
    if not isinstance(draft_logits, torch.Tensor) or draft_logits.dim() != 3 or tuple(draft_logits.shape[:2]) != (r, s):
        _fail("draft_logits", draft_logits, f"a tensor [{r}, {s}, V_d] (logits' rows and positions)")
    for name, t, shape in (("draft_tokens", draft_tokens, (r, s - 1)), ("num_draft", num_draft, (r,)),
                           ("offset", offset, (r, s))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype.is_floating_point:
            _fail(name, t, f"an integer tensor {list(shape)}")
        if t.device != logits.device:
            _fail(name, t, f"a tensor on {logits.device}")
    if isinstance(seed, torch.Tensor) and (tuple(seed.shape) != (r,) or seed.dtype.is_floating_point):
        _fail("seed", seed, f"an int or an integer tensor [{r}]")
    if not isinstance(seed, torch.Tensor) and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        _fail("seed", seed, f"an int or an integer tensor [{r}]")
    for name, value, integer in (("temperature", temperature, False), ("top_k", top_k, True), ("top_p", top_p, False),
                                 ("min_p", min_p, False)):
        if not isinstance(value, torch.Tensor):  # (a scalar's type and range, before any comparison reads it)
            check_scalar_param(name, value, integer)
    which = resolve_backend(backend, logits, triton_dtypes=_TRITON_DTYPES)
    fits = fused_verification_applies(guides, temperature, top_k, top_p, min_p) and uniforms is None
    if which == "triton" and not fits:
        if backend == "triton":
            raise ValueError("backend='triton': the fused verification takes no top-k/top-p/min-p, scalar "
                             "temperature and weights, at most 4 guides and no precomputed uniforms; use 'reference'")
        which = "reference"
    if which != "triton":
        if num_draft.device.type == "cpu":  # (on a GPU the check would wait for the device: trusted there)
            _check_draft_values(logits, guides, draft_logits, draft_tokens, num_draft, vocab_size, uniforms)
        return ref.speculative_verify_ref(logits, guides, draft_logits, draft_tokens, num_draft, temperature=temperature,
                                          top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, offset=offset,
                                          vocab_size=vocab_size, uniforms=uniforms)
    return _verify_triton(logits, guides, draft_logits, draft_tokens, num_draft, temperature, seed, offset, vocab_size)


def _kinds(pair) -> str:
    """What a guide pair holds, for an error message: its items' kinds and a tensor's shape, never a tensor's values."""
    if not isinstance(pair, (tuple, list)):
        return type(pair).__name__
    items = [f"tensor{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in pair]
    return f"({', '.join(items)})"


def _narrowest(logits, guides, draft_logits) -> int:
    """The vocabulary every input covers: the narrowest of the base's, the guides' and the draft's rows."""
    return min([logits.shape[2], draft_logits.shape[2]] + [g.shape[2] for g, _ in guides])


def _check_draft_values(logits, guides, draft_logits, draft_tokens, num_draft, vocab_size, uniforms) -> None:
    """The values the reference path reads, where they are on the host (elsewhere, and in the fused kernel, they
    are trusted: a check would wait for the device every call): each row's draft count in ``0 .. S-1``, its
    drafts in the vocabulary, and the uniforms' shape."""
    r, s, _ = logits.shape
    nd = as_dtype(num_draft, torch.int64).numpy()  # (numpy: a fraction of torch's cost per operation here)
    wrong = (nd < 0) | (nd > s - 1)
    if wrong.any():
        i = int(wrong.argmax())
        _fail("num_draft", num_draft, f"counts in 0 .. {s - 1} (S - 1); row {i} has {int(nd[i])}")
    v = _narrowest(logits, guides, draft_logits)
    if isinstance(vocab_size, numbers.Integral) and not isinstance(vocab_size, bool) and 1 <= vocab_size <= v:
        v = int(vocab_size)  # (a wrong vocab_size is named by the reference's own check)
    drafts = as_dtype(draft_tokens, torch.int64).numpy()
    wrong = (np.arange(s - 1) < nd[:, None]) & ((drafts < 0) | (drafts >= v))  # where drafted
    if wrong.any():
        i, k = (int(x) for x in np.argwhere(wrong)[0])
        _fail("draft_tokens", draft_tokens, f"token ids in [0, {v}) where drafted; row {i}, draft {k} is "
                                            f"{int(drafts[i, k])}")
    if uniforms is not None and (not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != (r, s, 3)):
        _fail("uniforms", uniforms, f"None or a float64 tensor [{r}, {s}, 3] (spec_uniforms of the keys)")


def _verify_triton(logits, guides, draft_logits, draft_tokens, num_draft, temperature, seed, offset, vocab_size):
    """The fused kernel's accept count and token, then each input's values at the new tokens (a gather)."""
    from ._triton.speculative_kernels import launch_speculative_verify

    r, s, _ = logits.shape
    dev = logits.device
    v = _narrowest(logits, guides, draft_logits) if vocab_size is None else int(vocab_size)
    seed_rows = seed.to(torch.int64) if isinstance(seed, torch.Tensor) else torch.full((r,), int(seed), device=dev)
    n, tok, ok = launch_speculative_verify(
        logits.contiguous(), [g.contiguous() for g, _ in guides], [w for _, w in guides], draft_logits.contiguous(),
        draft_tokens.to(torch.int64).clamp(0, v - 1).contiguous(), num_draft.to(torch.int32).contiguous(),
        float(temperature), seed_rows.contiguous(), offset.to(torch.int64).contiguous(), v)
    pos = torch.arange(s, device=dev)
    tokens = torch.where(pos < n.unsqueeze(1), torch.cat([draft_tokens.to(torch.int64), tok.unsqueeze(1)], 1)
                         if s > 1 else tok.unsqueeze(1), -1)
    tokens[torch.arange(r, device=dev), n.clamp(min=0)] = torch.where(ok, tok, -1)
    live = (pos <= n.unsqueeze(1)) & ok.unsqueeze(1)
    tokens = torch.where(live, tokens, -1)
    idx = tokens.clamp(min=0).unsqueeze(2)
    if temperature == 0:
        logprob = torch.zeros(r, s, dtype=torch.float64, device=dev)
    else:  # the reference's warped p itself (float64 relative to each row's max: ties at a tiny temperature give
        # exactly -log(count))
        flat_guides = [(g.reshape(r * s, -1), float(w)) for g, w in guides]
        p = warped_probs(prepare_sample_args(logits.reshape(r * s, -1), flat_guides, float(temperature), 0, 1.0, 0.0,
                                             0, 0, v)).view(r, s, v)
        logprob = p.gather(2, idx).squeeze(2).log()
    return SpeculativeOutput(n, tokens, torch.where(live, logprob, math.nan),
                             *ref.input_values(logits, guides, v, tokens, live), ok)
