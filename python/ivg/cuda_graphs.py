"""CUDA graphs of fixed-shape forwards: one captured forward per (batch-size bucket, block-table width,
beam-group rows, tokens per row).

A decode step (one new token per sequence) of a small guide model is a few hundred short kernels;
eagerly, the host's launch gaps dominate it. :class:`DecodeGraphs` captures the whole forward of a
:class:`~ivg.paged_model.PagedModel` once per bucket and replays it:

* inputs live in static device buffers (token ids, positions, slots, block table, lengths), filled
  with one host-to-device copy each before the replay; nothing in the replay synchronises;
* the batch is padded to the next bucket (1, 2, 4, ..., 1024) with rows whose slots are -1 (nothing
  written) and whose length is their own new tokens, and their logits are dropped;
* the block table's width is padded to a power of two, so the attention's grid is fixed per graph;
* with shared-prefix attention (``PagedModel(shared_prefix=True)``) the beam groups are inputs too:
  ``rows`` group slots (the real groups, then each padding row alone, then empty groups) and a
  maximum group size rounded up to a power of two, which is part of the graph's key;
* besides decode steps, extends that feed every row the same number ``q`` > 1 of new tokens and keep
  the logits at every position (the verifying forward of a speculative round: the pending token and
  the drafts) are captured per ``q`` too, while the bucket holds at most ``MAX_EXTEND_TOKENS`` tokens;
* graphs share one memory pool; a bucket whose capture fails is remembered and runs eagerly;
* on CUDA the reference attention backend is never captured (it reads sequence lengths on the host):
  its forwards run eagerly.

The kernels replayed are the eager ones, so a replay computes what the eager forward computes for
the padded batch.

This module also holds what the whole-step graphs (:mod:`ivg.step_graphs`, :mod:`ivg.round_graphs`)
are built from: ``static_forward`` (a forward over static buffers), ``capture``, ``StaticInputs`` (named
static buffers filled by one host-to-device copy), ``WholeGraph`` (replay or, off CUDA, run) and
``side_by_side`` (the small models on a second stream).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from ivg_kernels.attention import attention_backend
from ivg_kernels._transfer import to_device

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # 1024: 64 prompts x W*K = 16 rows (the default)
# Extends (q > 1 tokens per row) are captured while rows * q stays within this: the latency regime speculation
# serves (a graph keeps its logits, [rows * q, V], in the pool); larger extends run eagerly.
MAX_EXTEND_TOKENS = 1024


def bucket_for(n: int) -> int | None:
    """The smallest bucket holding ``n`` rows, or None above the largest."""
    for b in BUCKETS:
        if n <= b:
            return b
    return None


def _power_of_two(n: int, least: int) -> int:
    """The smallest power of two >= ``n`` and >= ``least`` (a power of two)."""
    p = least
    while p < n:
        p *= 2
    return p


def width_for(blocks: int) -> int:
    """Block-table width of the graph for sequences of up to ``blocks`` blocks: a power of two >= 4."""
    return _power_of_two(blocks, 4)


def groups_for(most: int) -> int:
    """Rows per group a graph with beam groups is captured for: a power of two >= ``most`` (and >= 2)."""
    return _power_of_two(most, 2)


def padded_groups(starts: list, shared: list, n: int, rows: int) -> tuple[list, list]:
    """``(group_starts [rows + 1], shared_lens [rows])`` for a graph of ``rows`` rows: the ``n`` real rows'
    groups, then each padding row as a group of its own sharing nothing, then empty groups."""
    starts = list(starts) + list(range(n + 1, rows + 1))
    starts += [rows] * (rows + 1 - len(starts))
    return starts, list(shared) + [0] * (rows - len(shared))


def static_forward(pm, input_ids, positions, slots, block_table, seq_lens, cu, keep, q: int = 1, groups=None):
    """``(run, batch)``: a forward of ``pm`` over static buffers (``input_ids`` and ``positions`` ``[1, T]``,
    ``slots [T]``, ``block_table [B, width]``, ``seq_lens [B]``, ``cu [B + 1]``, ``q`` new tokens per row,
    ``keep``: the positions whose logits it returns; ``groups``: beam-group buffers ``(group_starts, shared_lens, most)`` or None), and the
    :class:`~ivg.paged_attention.PagedBatch` it reads (off CUDA, clear its ``plans`` before each run: the
    reference attention's masks are made from the tables of that run). The buffers must live as long as
    the graph that replays ``run``."""
    from .paged_attention import PagedBatch

    batch = PagedBatch(cache=pm.cache, slot_mapping=slots, block_table=block_table, seq_lens=seq_lens,
                       cu_seqlens_q=cu, max_seqlen_q=q, is_decode=q == 1,
                       backend=attention_backend(pm.backend, pm.cache.pool.kv), groups=groups)

    def run():
        # longrope: each row's frequencies by its own length (a padding row's is its q new tokens: short)
        rope = contextlib.nullcontext() if pm.row_rope is None else pm.row_rope.rows(
            seq_lens.view(-1, 1).expand(-1, q).reshape(-1))
        with rope:
            return pm.model_forward(input_ids, positions, keep, batch)  # (its layer check: at the capture)

    return run, batch


def capture(run, device, pool):
    """``(graph, output)``: ``run`` captured as a CUDA graph on ``device`` after two warm-up runs on a side
    stream (Triton kernels compile, the allocator settles), and the output tensors the replays overwrite;
    off CUDA ``(None, None)``: nothing is captured."""
    if device.type != "cuda":
        return None, None
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


def graphable(pm) -> bool:
    """Whether ``pm``'s forwards can be captured: it has graphs (``cuda_graphs``), and on CUDA its attention is
    not the plain-torch reference (which reads sequence lengths on the host, which no capture can hold)."""
    if pm.graphs is None:
        return False
    return pm.device.type != "cuda" or attention_backend(pm.backend, pm.cache.pool.kv) != "reference"


class _Captured:
    """One graph: the static input buffers, the forward over them, and (on CUDA) its capture. ``most``:
    0 for per-row attention, else the most rows per beam group (shared-prefix attention over group
    buffers of ``rows`` slots); ``q``: new tokens per row (1: a decode step; more: an extend whose logits
    at every position are kept). Off CUDA nothing is captured and ``replay`` runs the same forward over
    the same buffers eagerly (the CPU tests of the padding)."""

    def __init__(self, pm, rows: int, width: int, most: int, q: int, pool):
        dev = pm.device
        self.rows, self.width, self.most, self.q = rows, width, most, q
        self.input_ids = torch.zeros(1, rows * q, dtype=torch.long, device=dev)
        self.positions = torch.arange(q, device=dev).repeat(rows).unsqueeze(0)  # [1, rows * q]
        self.slots = torch.full((rows * q,), -1, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(rows, width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.full((rows,), q, dtype=torch.int32, device=dev)  # each row: its new tokens alone
        # every row a group of its own sharing nothing: valid before the first replay fills them
        self.group_starts = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        self.shared_lens = torch.zeros(rows, dtype=torch.int32, device=dev)
        cu = torch.arange(0, rows * q + 1, q, dtype=torch.int32, device=dev)
        keep = torch.arange(rows * q, device=dev)  # a decode step's last tokens, an extend's every position
        self._run, self._batch = static_forward(
            pm, self.input_ids, self.positions, self.slots, self.block_table, self.seq_lens, cu, keep, q,
            (self.group_starts, self.shared_lens, most) if most else None)
        self.graph, self.logits = capture(self._run, dev, pool)

    def replay(self, tokens, positions, slots, block_table, seq_lens, groups=None) -> torch.Tensor:
        """The logits ``[n * q, V]`` of the ``n`` rows' new tokens (row by row); ``groups``: the rows'
        ``(group_starts, shared_lens)`` host lists (graphs with ``most`` > 0)."""
        n, dev, rows, q = len(seq_lens), self.input_ids.device, self.rows, self.q
        t = n * q
        # one host tensor of the step's inputs: each token's position (a padding row's: 0 .. q - 1), then
        # per row: seq_len | group start | shared len | block table
        pos = torch.arange(q).repeat(rows)
        pos[:t] = positions
        meta = torch.zeros(rows + 1, 3 + self.width, dtype=torch.long)
        meta[:, 0] = q
        meta[:n, 0] = seq_lens
        if self.most:
            starts, shared = padded_groups(*groups, n, rows)
            meta[:, 1] = torch.tensor(starts)
            meta[:rows, 2] = torch.tensor(shared)
        meta[:n, 3:3 + block_table.shape[1]] = block_table
        both = to_device(torch.cat([pos, meta.flatten()]), dev)  # one asynchronous copy
        meta = both[rows * q:].view(rows + 1, 3 + self.width)
        self.input_ids[0].zero_()  # padding rows read token 0 and write nothing (slot -1)
        self.input_ids[0, :t].copy_(to_device(tokens, dev))  # host ids, or the sampler's tokens on the device
        self.positions[0].copy_(both[:rows * q])
        self.seq_lens.copy_(meta[:rows, 0])
        if self.most:
            self.group_starts.copy_(meta[:, 1])
            self.shared_lens.copy_(meta[:rows, 2])
        self.block_table.copy_(meta[:rows, 3:])
        self.slots.fill_(-1)
        self.slots[:t].copy_(slots)
        if self.graph is None:
            self._batch.plans.clear()  # the reference's masks are made from the tables of this replay
            self.logits = self._run()
        else:
            self.graph.replay()
        return self.logits[:t].clone()  # the next replay overwrites the graph's output


class DecodeGraphs:
    """Captured forwards of one PagedModel, created on first use of each (bucket, width, group rows, tokens
    per row). Off CUDA (tests) the forwards over the static buffers run eagerly instead."""

    def __init__(self, pm):
        self.pm = pm
        self._graphs: dict[tuple[int, int, int], _Captured] = {}
        self._failed: set[tuple[int, int, int]] = set()
        self._pool = None
        self.replays = 0
        self.captures = 0

    def run(self, tokens, positions, slots, block_table, seq_lens, groups=None, q: int = 1):
        """Logits ``[B * q, V]`` of one forward of ``q`` new tokens per row (1: a decode step; more: an
        extend, logits at every position) through a graph, or None where no graph applies.

        ``tokens``: int64 ``[B * q]`` (row by row) on the host or the device; ``positions``: CPU int64
        ``[B * q]``; ``slots``: the slot mapping on the device; ``block_table``, ``seq_lens``: the block
        manager's CPU int32 tables ``[B, ...]``; ``groups`` (decode steps only): None for per-row attention,
        or the rows' beam groups as host lists ``(group_starts, shared_lens, max_group_rows)`` for
        shared-prefix attention."""
        rows = bucket_for(len(seq_lens))
        if rows is None or (q > 1 and (groups is not None or rows * q > MAX_EXTEND_TOKENS)):
            return None
        if not graphable(self.pm):
            return None  # the plain-torch attention reads lengths on the host, which no capture can hold
        key = (rows, width_for(block_table.shape[1]), groups_for(groups[2]) if groups is not None else 0, q)
        if key in self._failed:
            return None
        g = self._graphs.get(key)
        if g is None:
            if self._pool is None and self.pm.device.type == "cuda":
                self._pool = torch.cuda.graph_pool_handle()
            try:
                g = _Captured(self.pm, *key, self._pool)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager for this bucket
                warnings.warn(f"CUDA graph capture failed for batch {rows}, width {key[1]}, group rows {key[2]}, "
                              f"{q} tokens per row "
                              f"({type(e).__name__}: {e}); that bucket runs eagerly", stacklevel=3)
                self._failed.add(key)
                return None
            self._graphs[key] = g
            self.captures += 1
        self.replays += 1
        return g.replay(tokens, positions, slots, block_table, seq_lens,
                        None if groups is None else groups[:2])


class StaticInputs:
    """Named static input buffers of a graph over several forwards (:mod:`ivg.step_graphs`,
    :mod:`ivg.round_graphs`): views of one int64 and one int32 device buffer, each with the value its
    padding rows hold, filled from host tensors by one host-to-device copy and a copy per dtype."""

    def __init__(self):
        self.specs = {torch.long: [], torch.int32: []}  # (name, shape, padding value)

    def add(self, dtype, name: str, shape: tuple, pad: int) -> None:
        self.specs[dtype].append((name, shape, pad))

    def views(self, device) -> dict:
        """The buffers, allocated, padded, by name (call once, after every ``add``)."""
        self.flat, views, self._where, pads = {}, {}, {}, []
        at_host = 0
        for dtype, specs in self.specs.items():
            self.flat[dtype] = buf = torch.empty(sum(math.prod(shape) for _, shape, _ in specs), dtype=dtype,
                                                 device=device)
            at = 0
            for name, shape, pad in specs:
                size = math.prod(shape)
                views[name] = buf[at:at + size].view(shape).fill_(pad)
                self._where[name] = (at_host + at, shape)
                pads.append(np.full(size, pad, dtype=np.int64))
                at += size
            at_host += at
        self._pads = np.concatenate(pads)  # every buffer's padding, laid out as send's host array
        return views

    def send(self, values: dict) -> None:
        """Every buffer from the host: ``values`` by name fill each buffer's leading corner (the real rows
        first), the rest holds its padding value."""
        host = self._pads.copy()  # filled in numpy: a slice assignment there costs a tenth of torch's
        for name, value in values.items():
            at, shape = self._where[name]
            host[at:at + math.prod(shape)].reshape(shape)[tuple(slice(0, k) for k in value.shape)] = value.numpy()
        both = to_device(torch.from_numpy(host), self.flat[torch.long].device)  # one asynchronous copy
        n64 = self.flat[torch.long].numel()
        self.flat[torch.long].copy_(both[:n64])
        self.flat[torch.int32].copy_(both[n64:])


class WholeGraph:
    """Base of a graph over several forwards: ``inputs`` its :class:`StaticInputs` and ``v`` their views,
    ``_run`` the body (every model's forward over its static buffers, then what reads their logits),
    ``_batches`` the forwards' PagedBatches, and ``graph``/``out`` from :func:`capture` (off CUDA ``graph`` is
    None and a replay runs ``_run`` eagerly)."""

    def replay(self, n: int, host: dict, device: dict) -> torch.Tensor:
        """The first ``n`` rows of the output, cloned (the next replay overwrites the graph's output), after
        filling the buffers: ``host`` tensors of the real rows by view name (one copy; the rest padded),
        ``device`` tensors into their views' first ``n`` rows."""
        self.inputs.send(host)
        for name, x in device.items():
            self.v[name][:n].copy_(x)
        if self.graph is None:
            for batch in self._batches:
                batch.plans.clear()  # the reference's masks are made from the tables of this run
            self.out = self._run()
        else:
            self.graph.replay()
        return self.out[:n].clone()


# Inside a step's or a round's graph (ivg.step_graphs, ivg.round_graphs) on CUDA, the small models' forwards run
# on a second stream beside the base model's: at a few rows their short kernels would otherwise follow the base's.
SIDE_STREAM = True


def side_stream(device, models: int):
    """A second CUDA stream for a graph over ``models`` forwards beside the base's, or None (off CUDA, with
    ``SIDE_STREAM`` off, or with nothing to run beside the base)."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" and SIDE_STREAM and models > 0 else None


def side_by_side(device, first, others: dict, side) -> dict:
    """``{name: fn()}`` for ``first`` (a ``(name, fn)`` pair, on the current stream) and ``others`` (on the
    CUDA stream ``side``, beside it, joined back before returning); with ``side`` None one after another.
    Inside a capture the two streams become parallel branches of the graph. The side stream is joined back also
    when a forward raises (a model whose forward cannot be captured, say): a capture left with an unjoined branch
    cannot end, and then leaves its memory pool recording, so that every later capture fails."""
    if side is None:
        return {first[0]: first[1](), **{name: fn() for name, fn in others.items()}}
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            out = {name: fn() for name, fn in others.items()}
        out[first[0]] = first[1]()
    finally:
        main.wait_stream(side)
    if not torch.cuda.is_current_stream_capturing():  # eager (warm-up) runs: keep them until main is done
        for x in out.values():
            x.record_stream(main)
    return out
