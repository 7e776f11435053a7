"""Paged KV writes and paged attention: public functions with argument checks and backend dispatch.

Cache per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and for V. The maths is
in :mod:`ivg_kernels.reference.attention`; the Triton kernels in
:mod:`ivg_kernels._triton.attention_kernels` (torch ops ``ivg_kernels::write_kv``,
``ivg_kernels::paged_decode_attention``, ``ivg_kernels::paged_prefill_attention``,
``ivg_kernels::shared_prefix_decode_attention``).
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from . import _eager
from ._backend import resolve_backend
from .reference import attention as ref

# the caches' (and so the KV pools') dtypes; float64: reference backend only
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(name, value, expected):
    if isinstance(value, torch.Tensor):
        value = f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    raise ValueError(f"{name}={value!r}: expected {expected}")


def attention_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend the attention ops (and ``write_kv``) run for ``backend`` on tensors like ``tensor``
    (``"reference"`` or ``"triton"``), or the ValueError they would raise."""
    return resolve_backend(backend, tensor, triton_dtypes=_TRITON_DTYPES)


def _check_cache(k_cache, v_cache):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            _fail(name, c, "a 4-D tensor [num_blocks, block_size, num_kv_heads, head_dim]")
        if c.dtype not in CACHE_DTYPES:
            _fail(name, c, "dtype float32, bfloat16, float16 or float64")
        if not c.is_contiguous():
            _fail(name, c, "a contiguous tensor")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        _fail("v_cache", v_cache, f"the shape, dtype and device of k_cache {tuple(k_cache.shape)}")


def _check_rows(name, t, n, device, dtypes=(torch.int32, torch.int64), dim=1, of: str = ""):
    """An integer tensor of ``dim`` dimensions with ``n`` rows (None: any), ``of`` saying where ``n`` comes from."""
    if not isinstance(t, torch.Tensor) or t.dim() != dim or (n is not None and t.shape[0] != n):
        _fail(name, t, f"a {dim}-D integer tensor" + ("" if n is None else f" with {n} rows{of}"))
    if t.dtype not in dtypes:
        _fail(name, t, "dtype " + " or ".join(map(str, dtypes)) + (" (call .int())" if dtypes == (torch.int32,) else ""))
    if t.device != device:
        _fail(name, t, f"a tensor on {device}")


def _check_q(q, k_cache, rank):
    if not isinstance(q, torch.Tensor) or q.dim() != rank:
        _fail("q", q, "a 3-D tensor [N, num_heads, head_dim]" if rank == 3 else "a 3-D tensor")
    if q.dtype != k_cache.dtype:
        _fail("q", q, f"dtype {k_cache.dtype}, like the cache")
    if q.device != k_cache.device:
        _fail("q", q, f"a tensor on {k_cache.device}, like the cache")
    if q.shape[2] != k_cache.shape[3]:
        _fail("q", q, f"head_dim {k_cache.shape[3]}, like the cache")
    if q.shape[1] % k_cache.shape[2] != 0:
        _fail("q", q, f"num_heads a multiple of num_kv_heads {k_cache.shape[2]}")
    if q.stride(2) != 1:
        _fail("q", q, "unit stride along head_dim")


def _check_table_values(block_table, seq_lens, k_cache):
    """The values of a call's tables, on the reference backend where they are on the host (the Triton backend,
    and the reference on a GPU, trust them: a check would read the device every call): every length fits its
    row of the table, and every entry of the table is a block of the cache (the entries past a row's blocks
    too: pad with 0, as ``BlockManager.block_table`` does; the reference gathers whole rows)."""
    lens, (num_blocks, bs) = seq_lens.long().cpu(), k_cache.shape[:2]
    cap = block_table.shape[1] * bs
    wrong = ((lens < 0) | (lens > cap)).nonzero()
    if len(wrong):
        i = int(wrong[0])
        _fail("seq_lens", seq_lens, f"lengths in [0, {cap}] (the table's {block_table.shape[1]} blocks of {bs} "
                                    f"tokens); row {i} holds {int(lens[i])}")
    table = block_table.cpu()
    wrong = ((table < 0) | (table >= num_blocks)).nonzero()
    if len(wrong):
        r, c = (int(x) for x in wrong[0])
        _fail("block_table", block_table, f"block ids in [0, {num_blocks}) (entries past a row's blocks too: pad "
                                          f"with 0); row {r}, column {c} holds {int(table[r, c])}")


MAX_WINDOW = 2 ** 31 - 1  # lengths are int32: a window this wide already holds every key


def _check_scale_window(scale, sliding_window):
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
        _fail("scale", scale, "a finite positive float")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral)
        or not 1 <= sliding_window <= MAX_WINDOW
    ):
        _fail("sliding_window", sliding_window, f"None or an int from 1 to {MAX_WINDOW} (2**31 - 1)")
    return float(scale), int(sliding_window or 0)


def _check_softcap_sinks(softcap, sinks, q):
    """``softcap`` as a float (0.0: none) and ``sinks`` checked (None or [num_heads] on q's device)."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not 0 < softcap < float("inf")):
        _fail("softcap", softcap, "None or a positive finite float (attention logit soft-capping)")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
            _fail("sinks", sinks, f"None or a 1-D tensor of one logit per query head ({q.shape[1]})")
        if not sinks.is_floating_point() or sinks.device != q.device:
            _fail("sinks", sinks, f"a floating-point tensor on {q.device}, like q")
    return float(softcap or 0.0), sinks


def _triton(name, *args):
    """Run a Triton attention op. Eager calls go to its launcher, one plain launch per kernel (the torch
    op's dispatch costs far more than the kernels at small shapes); under torch.compile, the torch op
    (``triton_op``), which compiles into the graph. CUDA-graph capture records either."""
    if torch.compiler.is_compiling():
        from ._triton import attention_kernels  # noqa: F401 - registers the ops

        return getattr(torch.ops.ivg_kernels, name)(*args)
    return getattr(_triton_kernels(), f"launch_{name}")(*args)


@functools.cache
def _triton_kernels():
    """The Triton kernels' module, imported on first use by eager calls (an import statement per call costs
    about a microsecond)."""
    from ._triton import attention_kernels  # also registers the ops

    return attention_kernels


def write_kv(k_cache, v_cache, key, value, slot_mapping, *, backend="auto") -> None:
    """Store new keys/values in their slots.

    Parameters
    ----------
    k_cache, v_cache : ``[num_blocks, block_size, num_kv_heads, head_dim]``
    key, value : ``[T, num_kv_heads, head_dim]`` (any strides with unit stride on head_dim)
    slot_mapping : int ``[T]``; slot ``block * block_size + offset``; negative slots are skipped
    """
    sig = _write_signature(k_cache, v_cache, key, value, slot_mapping, backend)
    known = WRITE_CALLS.get(sig)
    if known is not None:  # a kind of call already checked and launched (ivg_kernels/_eager.py)
        return known(k_cache, v_cache, key, value, slot_mapping)
    _check_cache(k_cache, v_cache)
    shape = (k_cache.shape[2], k_cache.shape[3])
    for name, x in (("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != shape:
            _fail(name, x, f"a tensor [T, {shape[0]}, {shape[1]}]")
        if x.device != k_cache.device or x.stride(2) != 1:
            _fail(name, x, f"a tensor on {k_cache.device} with unit stride on head_dim")
    if value.shape[0] != key.shape[0]:
        _fail("value", value, f"{key.shape[0]} tokens, like key")
    _check_rows("slot_mapping", slot_mapping, key.shape[0], k_cache.device, of=" (one per row of key)")
    which = attention_backend(backend, k_cache)
    if which == "reference" and k_cache.device.type == "cpu":  # (the values, on the host; trusted on a GPU)
        slots = slot_mapping.long().cpu()
        slots = slots[slots >= 0]
        most = k_cache.shape[0] * k_cache.shape[1]
        if len(slots) and int(slots.max()) >= most:
            _fail("slot_mapping", slot_mapping, f"slots below {most} (the cache's blocks x block_size), or < 0 "
                                                f"to skip; got {int(slots.max())}")
        if len(torch.unique(slots)) != len(slots):
            _fail("slot_mapping", slot_mapping, "each slot once (two tokens written to one slot)")
    if which == "triton" and sig is not None:
        known = _triton_kernels().write_launch(k_cache, v_cache, key, value, slot_mapping)
        WRITE_CALLS.put(sig, known)
        return known(k_cache, v_cache, key, value, slot_mapping)
    run_write_kv(which, k_cache, v_cache, key, value, slot_mapping)


WRITE_CALLS = _eager.Calls()  # write_kv's signatures -> their WriteLaunch


def _write_signature(k_cache, v_cache, key, value, slot_mapping, backend):
    """What :func:`write_kv`'s checks, backend choice and launch read of a call (:mod:`ivg_kernels._eager`), or
    None for a call that always takes the full path."""
    if not WRITE_CALLS.enabled or type(k_cache) is not torch.Tensor or type(backend) is not str or _eager.compiling():
        return None
    sig = (backend, _eager.environment(backend, k_cache), _eager.tensor(k_cache), _eager.tensor(v_cache),
           _eager.tensor(key), _eager.tensor(value), _eager.tensor(slot_mapping))
    return None if None in sig else sig


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale, sliding_window=None,
                           num_splits=0, backend="auto", plan=None, softcap=None, sinks=None) -> torch.Tensor:
    """Attention of one new token per row over its paged history (the token itself included).

    Parameters
    ----------
    q : ``[N, num_heads, head_dim]``, the cache's dtype; ``num_heads`` a multiple of ``num_kv_heads``
    k_cache, v_cache : ``[num_blocks, block_size, num_kv_heads, head_dim]``
    block_table : int32 ``[N, max_blocks]``, block ids of the cache (pad a row past its blocks with 0)
    seq_lens : int ``[N]``, tokens in the cache per row (the query sits at ``seq_lens - 1``), at most
        ``max_blocks * block_size``. The reference backend on the CPU checks these values; on a GPU they
        are trusted (no device read), and out-of-range ones read outside the cache there
    scale : float, usually ``head_dim ** -0.5``
    sliding_window : int, optional; keys with ``q_pos - k_pos < sliding_window`` only
    num_splits : int, splits of the KV length (0 chooses from the shapes)
    softcap : float, optional; each scaled score ``s`` becomes ``softcap * tanh(s / softcap)`` (Gemma 2)
    sinks : ``[num_heads]``, optional; one logit per query head added to the softmax's denominator, with no
        value (gpt-oss's attention sinks). Both as transformers' eager attention computes them
    plan : optional, for the reference backend: ``ivg_kernels.reference.attention.decode_plan`` of these
        ``block_table``, ``seq_lens``, the cache's block size and ``sliding_window``, made once and passed
        to every layer of a forward (the gather indices and mask depend on the tables only; None, as
        ``decode_plan`` gives where no row has a key, plans per call). A plan of other tables gives wrong
        results; other backends ignore it

    Returns
    -------
    ``[N, num_heads, head_dim]`` in q's dtype
    """
    sig = _decode_signature(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, num_splits, backend,
                            plan, softcap, sinks)
    known = DECODE_CALLS.get(sig)
    if known is not None:  # a kind of call already checked and launched (ivg_kernels/_eager.py)
        return known(q, k_cache, v_cache, block_table, seq_lens, sinks)
    _check_cache(k_cache, v_cache)
    _check_q(q, k_cache, 3)
    _check_rows("block_table", block_table, q.shape[0], q.device, dtypes=(torch.int32,), dim=2,
                of=" (one per row of q)")
    _check_rows("seq_lens", seq_lens, q.shape[0], q.device, of=" (one per row of q)")
    scale, _ = _check_scale_window(scale, sliding_window)
    softcap, sinks = _check_softcap_sinks(softcap, sinks, q)
    if plan is not None and not isinstance(plan, ref.DecodePlan):
        _fail("plan", plan, "None or an ivg_kernels.reference.attention.DecodePlan")
    which = attention_backend(backend, q)
    if which == "reference" and q.device.type == "cpu":  # (on a GPU: trusted, no device read)
        _check_table_values(block_table, seq_lens, k_cache)
    if which == "triton" and sig is not None:
        known = _triton_kernels().decode_launch(q, k_cache, v_cache, block_table, seq_lens, scale,
                                                int(sliding_window or 0), int(num_splits), softcap, sinks)
        DECODE_CALLS.put(sig, known)
        return known(q, k_cache, v_cache, block_table, seq_lens, sinks)
    return run_decode(which, q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, int(num_splits),
                      plan=plan, softcap=softcap, sinks=sinks)


DECODE_CALLS = _eager.Calls()  # paged_decode_attention's signatures -> their DecodeLaunch


def _decode_signature(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, num_splits, backend, plan,
                      softcap, sinks, calls=DECODE_CALLS):
    """What :func:`paged_decode_attention`'s checks, backend choice and launch plan read of a call
    (:mod:`ivg_kernels._eager`), or None for a call that always takes the full path (a plan, arguments of other
    kinds, a ``torch.compile`` trace, ``calls`` turned off)."""
    if (not calls.enabled or plan is not None or type(q) is not torch.Tensor or type(backend) is not str
            or _eager.compiling()):
        return None
    num = _eager.number
    sig = (backend, _eager.environment(backend, q), _eager.tensor(q), _eager.tensor(k_cache),
           _eager.tensor(v_cache), _eager.tensor(block_table), _eager.tensor(seq_lens), _eager.optional_tensor(sinks),
           num(scale, float, int), num(sliding_window, int, type(None)), num(num_splits, int),
           num(softcap, float, int, type(None)))
    return None if None in sig else sig


def shared_prefix_decode_attention(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, *,
                                   max_group_rows, scale, sliding_window=None, num_splits=0,
                                   backend="auto", softcap=None, sinks=None) -> torch.Tensor:
    """:func:`paged_decode_attention` for beams that share the blocks of a prefix, reading it once per group.

    Rows ``group_starts[g]:group_starts[g+1]`` form group ``g`` (consecutive, covering every row; a group
    may be empty, so fixed-size buffers can be padded for CUDA graphs); each of them holds its first ``shared_lens[g]`` tokens in the same blocks (identical leading
    ``block_table`` entries): the beams of one prompt, forked by reference. The shared tokens are read
    once for the whole group, each row's later tokens once for that row, and the two attentions are
    merged exactly by their log-sum-exp, so the result equals ``paged_decode_attention`` up to float
    rounding. ``BlockManager.shared_prefix_groups(seq_ids)`` gives ``group_starts`` and ``shared_lens``.

    Parameters
    ----------
    q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, softcap, sinks : as
        :func:`paged_decode_attention`
    group_starts : int ``[G + 1]``, row offsets of the groups, from 0 to N
    shared_lens : int ``[G]``, shared tokens per group, at most its shortest row
    max_group_rows : int, at least the largest group's row count (a host int: no synchronisation)
    num_splits : int, splits of the shared prefix (0 chooses from the shapes)

    The reference backend checks the group structure and raises ``ValueError`` if a row does not hold
    the claimed tokens in its group's blocks; the Triton backend trusts it (no device read), and a wrong
    claim gives a wrong result there.
    """
    sig = _shared_signature(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, max_group_rows,
                            scale, sliding_window, num_splits, backend, softcap, sinks)
    known = SHARED_CALLS.get(sig)
    if known is not None:  # a kind of call already checked and launched (ivg_kernels/_eager.py)
        return known(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, sinks)
    _check_cache(k_cache, v_cache)
    _check_q(q, k_cache, 3)
    n = q.shape[0]
    _check_rows("block_table", block_table, n, q.device, dtypes=(torch.int32,), dim=2, of=" (one per row of q)")
    _check_rows("seq_lens", seq_lens, n, q.device, of=" (one per row of q)")
    g = shared_lens.shape[0] if isinstance(shared_lens, torch.Tensor) and shared_lens.dim() == 1 else None
    _check_rows("shared_lens", shared_lens, g, q.device)
    _check_rows("group_starts", group_starts, None if g is None else g + 1, q.device,
                of=f" (shared_lens' length {g}, plus one)")
    if isinstance(max_group_rows, bool) or not isinstance(max_group_rows, numbers.Integral) or max_group_rows < 0:
        _fail("max_group_rows", max_group_rows, "a non-negative int")
    scale, _ = _check_scale_window(scale, sliding_window)
    softcap, sinks = _check_softcap_sinks(softcap, sinks, q)
    which = attention_backend(backend, q)
    if which == "reference":
        if q.device.type == "cpu":  # (on a GPU: trusted, no device read)
            _check_table_values(block_table, seq_lens, k_cache)
        starts = group_starts.tolist()
        most = max((b - a for a, b in zip(starts, starts[1:])), default=0)
        if most > max_group_rows:
            _fail("max_group_rows", max_group_rows, f"at least {most}, the largest group")
    if which == "triton" and sig is not None:
        known = _triton_kernels().shared_launch(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens,
                                                int(max_group_rows), scale, int(sliding_window or 0), int(num_splits),
                                                softcap, sinks)
        SHARED_CALLS.put(sig, known)
        return known(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, sinks)
    return run_shared_decode(which, q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens,
                             int(max_group_rows), scale, sliding_window, int(num_splits), softcap=softcap,
                             sinks=sinks)


SHARED_CALLS = _eager.Calls()  # shared_prefix_decode_attention's signatures -> their SharedLaunch


def _shared_signature(q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens, max_group_rows, scale,
                      sliding_window, num_splits, backend, softcap, sinks):
    """What :func:`shared_prefix_decode_attention`'s checks, backend choice and launch plan read of a call, as
    :func:`_decode_signature`."""
    sig = (_decode_signature(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, num_splits, backend,
                             None, softcap, sinks, SHARED_CALLS),
           _eager.tensor(group_starts), _eager.tensor(shared_lens), _eager.number(max_group_rows, int))
    return None if None in sig else sig


def paged_prefill_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q, scale,
                            sliding_window=None, backend="auto", plan=None, softcap=None, sinks=None) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens over their cached prefix and themselves.

    Sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``: its last tokens, already written
    to the cache, so its total length is ``seq_lens[b]``. Serves prompt prefill and multi-token chunks.

    Parameters
    ----------
    q : ``[T, num_heads, head_dim]``
    block_table : int32 ``[B, max_blocks]``; seq_lens : int ``[B]``; cu_seqlens_q : int ``[B + 1]``
    max_seqlen_q : int, the longest query run (a host int, so no synchronisation is needed)
    softcap : float, optional; each scaled score ``s`` becomes ``softcap * tanh(s / softcap)`` (Gemma 2)
    sinks : ``[num_heads]``, optional; one logit per query head added to the softmax's denominator, with no
        value (gpt-oss's attention sinks). Both as transformers' eager attention computes them
    plan : optional, for the reference backend: ``ivg_kernels.reference.attention.prefill_plan`` of these
        ``block_table``, ``seq_lens``, ``cu_seqlens_q``, the cache's block size and ``sliding_window``,
        made once and passed to every layer of a forward (the masks and gather indices depend on the
        tables only). A plan of other tables gives wrong results; other backends ignore it
    """
    sig = _prefill_signature(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
                             sliding_window, backend, plan, softcap, sinks)
    known = PREFILL_CALLS.get(sig)
    if known is not None:  # a kind of call already checked and launched (ivg_kernels/_eager.py)
        return known(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, sinks)
    _check_cache(k_cache, v_cache)
    _check_q(q, k_cache, 3)
    b = block_table.shape[0] if isinstance(block_table, torch.Tensor) and block_table.dim() == 2 else None
    _check_rows("block_table", block_table, b, q.device, dtypes=(torch.int32,), dim=2)
    _check_rows("seq_lens", seq_lens, b, q.device, of=" (one per row of block_table)")
    _check_rows("cu_seqlens_q", cu_seqlens_q, b + 1, q.device, of=" (one more than block_table's rows)")
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, numbers.Integral) or max_seqlen_q < 0:
        _fail("max_seqlen_q", max_seqlen_q, "a non-negative int")
    scale, _ = _check_scale_window(scale, sliding_window)
    softcap, sinks = _check_softcap_sinks(softcap, sinks, q)
    if plan is not None and not isinstance(plan, ref.PrefillPlan):
        _fail("plan", plan, "None or an ivg_kernels.reference.attention.PrefillPlan")
    which = attention_backend(backend, q)
    if which == "reference" and q.device.type == "cpu":  # (on a GPU: trusted, no device read)
        _check_table_values(block_table, seq_lens, k_cache)
        cu, lens = cu_seqlens_q.long().cpu(), seq_lens.long().cpu()
        runs = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or bool((runs < 0).any()):
            _fail("cu_seqlens_q", cu_seqlens_q, f"non-decreasing offsets from 0 to the {q.shape[0]} query rows")
        wrong = (runs > lens).nonzero()
        if len(wrong):
            b = int(wrong[0])
            _fail("cu_seqlens_q", cu_seqlens_q, f"at most seq_lens[b] new tokens per sequence; sequence {b} has "
                                                f"{int(runs[b])} of {int(lens[b])}")
        if len(runs) and int(runs.max()) > max_seqlen_q:
            _fail("max_seqlen_q", max_seqlen_q, f"at least {int(runs.max())}, the longest query run")
    if which == "triton" and sig is not None:
        known = _triton_kernels().prefill_launch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                                 int(max_seqlen_q), scale, int(sliding_window or 0), softcap, sinks)
        PREFILL_CALLS.put(sig, known)
        return known(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, sinks)
    return run_prefill(which, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, int(max_seqlen_q), scale,
                       sliding_window, plan, softcap=softcap, sinks=sinks)


PREFILL_CALLS = _eager.Calls()  # paged_prefill_attention's signatures -> their PrefillLaunch


def _prefill_signature(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale, sliding_window,
                       backend, plan, softcap, sinks):
    """What :func:`paged_prefill_attention`'s checks, backend choice and launch read of a call, as
    :func:`_decode_signature` (the tables' and ``q``'s shapes among it: a call with another number of tokens or
    sequences is a new kind)."""
    sig = (_decode_signature(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, 0, backend, plan,
                             softcap, sinks, PREFILL_CALLS),
           _eager.tensor(cu_seqlens_q), _eager.number(max_seqlen_q, int))
    return None if None in sig else sig


# The ops after their checks, on a backend already resolved (``attention_backend``): what the public
# functions above run, and what a caller that builds these arguments itself calls on every layer
# (``ivg.paged_model``: one forward's tables are checked once by construction, not per layer).
def run_write_kv(which, k_cache, v_cache, key, value, slot_mapping) -> None:
    if which == "reference":
        ref.write_kv_ref(k_cache, v_cache, key, value, slot_mapping)
    else:
        _triton("write_kv", k_cache, v_cache, key, value, slot_mapping)


# ``softcap``: a float, 0.0 for none; ``sinks``: a [num_heads] tensor or None.
def run_decode(which, q, k_cache, v_cache, block_table, seq_lens, scale: float, sliding_window, num_splits=0,
               plan=None, softcap=0.0, sinks=None):
    if which == "reference":
        return ref.paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale=scale,
                                              sliding_window=sliding_window, plan=plan, softcap=softcap or None,
                                              sinks=sinks)
    return _triton("paged_decode_attention", q, k_cache, v_cache, block_table, seq_lens, scale,
                   int(sliding_window or 0), num_splits, softcap, sinks)


def run_shared_decode(which, q, k_cache, v_cache, block_table, seq_lens, group_starts, shared_lens,
                      max_group_rows: int, scale: float, sliding_window, num_splits=0, plan=None, softcap=0.0,
                      sinks=None):
    if which == "reference":
        return ref.shared_prefix_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, group_starts,
                                                      shared_lens, scale=scale, sliding_window=sliding_window,
                                                      plan=plan, softcap=softcap or None, sinks=sinks)
    return _triton("shared_prefix_decode_attention", q, k_cache, v_cache, block_table, seq_lens, group_starts,
                   shared_lens, max_group_rows, scale, int(sliding_window or 0), num_splits, softcap, sinks)


def run_prefill(which, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q: int, scale: float,
                sliding_window, plan=None, softcap=0.0, sinks=None):
    if which == "reference":
        return ref.paged_prefill_attention_ref(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                               scale=scale, sliding_window=sliding_window, plan=plan,
                                               softcap=softcap or None, sinks=sinks)
    return _triton("paged_prefill_attention", q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                   max_seqlen_q, scale, int(sliding_window or 0), softcap, sinks)
