"""A whole decode step as one CUDA graph: every model's forward over the tokens the rows drew, then the
fused draw of the next tokens and the step's record, in one replay.

Between host reads the decode loop runs ``feed_drawn`` (every row reads the token it drew) and then
``sample`` (the next draw). Eagerly that is a graph replay per model (:mod:`ivg.cuda_graphs`), each
with its own input copies and output clone, and an eager sampler call between them; here the host
appends one slot per row to every model's cache, sends every model's positions, slots, lengths and
block tables in one host-to-device copy, copies the drawn tokens and the rows' keys into the graph's
buffers, replays once, and clones the record (ok, token, log-prob, implicit and explicit values, and
the token clamped for the next step's input) ``[n, 6]``.

A graph is captured per (batch-size bucket, each model's block-table width) and kept with the
decoder's paged models from call to call; the sampler's settings (:class:`ivg.draw.StepDraw`) are part
of the key. The padded rows are those of :mod:`ivg.cuda_graphs` (slot -1: nothing written; length 1;
token 0; key 0), and the fused sampler is batch-invariant, so a replay draws what the eager step
draws. It applies where every model's steps can be captured (``ivg.cuda_graphs.graphable``) and no
model attends over beam groups (those steps stay per model). Off CUDA nothing is captured and a replay
runs the same step eagerly over the same buffers (the CPU tests of the buffers and padding).
"""
from __future__ import annotations

import warnings

import torch

from ivg_kernels._transfer import to_device

from .cuda_graphs import bucket_for, capture, graphable, static_forward, width_for
from .draw import StepDraw


class _StepGraph:
    """The static buffers of one step, the step over them, and (on CUDA) its capture."""

    def __init__(self, draw: StepDraw, paged: dict, rows: int, widths: tuple, pool):
        names = draw.names
        dev = paged[names[0]].device
        self.rows, self.widths = rows, widths
        # every model's inputs in two buffers: int64 (positions | slots) and int32 (lengths | block table)
        self.in64 = torch.zeros(len(names), 2, rows, dtype=torch.long, device=dev)
        self.in64[:, 1] = -1  # padding rows write nothing
        self.in32 = torch.ones(sum(rows * (1 + w) for w in widths), dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(1, rows, dtype=torch.long, device=dev)
        self.keys = torch.zeros(2, rows, dtype=torch.long, device=dev)  # seed, offset
        cu = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        keep = torch.arange(rows, device=dev)
        forwards, self._batches, at = [], [], 0
        for k, (name, w) in enumerate(zip(names, widths)):
            lens = self.in32[at:at + rows]
            table = self.in32[at + rows:at + rows * (1 + w)].view(rows, w)
            table.zero_()
            at += rows * (1 + w)
            run, batch = static_forward(paged[name], self.tokens, self.in64[k, 0].unsqueeze(0), self.in64[k, 1],
                                        table, lens, cu, keep)
            forwards.append(run)
            self._batches.append(batch)

        def step():
            s = draw.draw({name: run() for name, run in zip(names, forwards)}, self.keys[0], self.keys[1])
            return torch.cat([draw.record(s), s.tokens.clamp(min=0).double().unsqueeze(1)], dim=1)  # [rows, 6]

        self._step = step
        self.graph, self.out = capture(step, dev, pool)

    def replay(self, drawn, seed, offset, inputs: list) -> torch.Tensor:
        """The step's record ``[n, 6]`` for ``n`` rows: ``drawn`` their tokens, ``seed``/``offset`` their keys
        (device ``[n]``), ``inputs`` per model ``(positions, slots, seq_lens, block_table)`` host tensors."""
        n, rows = len(drawn), self.rows
        h64 = torch.zeros(len(inputs), 2, rows, dtype=torch.long)
        h64[:, 1] = -1
        h32 = []
        for k, ((positions, slots, lens, table), w) in enumerate(zip(inputs, self.widths)):
            h64[k, 0, :n] = positions
            h64[k, 1, :n] = slots
            lens_p = torch.ones(rows, dtype=torch.long)
            lens_p[:n] = lens
            table_p = torch.zeros(rows, w, dtype=torch.long)
            table_p[:n, :table.shape[1]] = table
            h32 += [lens_p, table_p.flatten()]
        both = to_device(torch.cat([h64.flatten(), *h32]), self.tokens.device)  # one asynchronous copy
        self.in64.view(-1).copy_(both[:h64.numel()])
        self.in32.copy_(both[h64.numel():])
        self.tokens[0, :n].copy_(drawn)
        self.keys[0, :n].copy_(seed)
        self.keys[1, :n].copy_(offset)
        if self.graph is None:
            for batch in self._batches:
                batch.plans.clear()  # the reference's masks are made from the tables of this run
            self.out = self._step()
        else:
            self.graph.replay()
        return self.out[:n].clone()  # the next replay overwrites the graph's output


class StepGraphs:
    """The step graphs of one set of paged models, created on first use of each key."""

    def __init__(self, paged: dict):
        self.paged = paged
        self._graphs: dict = {}
        self._failed: set = set()
        self._pool = None
        self.steps = 0  # steps replayed
        self.forwards = 0  # model forwards in them
        self.captures = 0

    def applies(self, names) -> bool:
        """Every model of ``names`` can replay its steps, and none attends over beam groups."""
        return all(graphable(self.paged[n]) and self.paged[n].shared_prefix is False for n in names)

    def run(self, draw: StepDraw, seq_ids: list, drawn, seed, offset) -> torch.Tensor | None:
        """Every model reads ``drawn`` (device int64 ``[n]``) into the sequences ``seq_ids``; then the next
        draw for every row, with keys ``seed``/``offset``. Returns the record ``[n, 6]`` (see the module
        docstring), or None where no graph applies (nothing changed then). On an error every model's
        sequences are back to their lengths before the call."""
        rows = bucket_for(len(seq_ids))
        if rows is None or not self.applies(draw.names):
            return None
        appended, inputs = [], []
        try:
            for name in draw.names:
                self.paged[name].attach()  # transformers' forward attends through the paged cache (a no-op when on)
                cache = self.paged[name].cache
                slots = cache.blocks.append(seq_ids, 1, copy=cache.pool.copy_blocks)  # copy-on-write first
                appended.append(cache)
                table, lens = cache.blocks.tables(seq_ids)
                inputs.append((lens.long() - 1, slots, lens, table))
            key = (draw, rows, tuple(width_for(t.shape[1]) for _, _, _, t in inputs))
            g = None if key in self._failed else self._graphs.get(key)
            if g is None and key not in self._failed:
                g = self._capture(draw, rows, key)
            if g is None:
                raise _NoGraph
            out = g.replay(drawn, seed, offset, inputs)
            self.steps += 1
            self.forwards += len(draw.names)
            return out
        except BaseException as e:
            for cache in appended:
                cache.truncate_appended(seq_ids, 1)
            if isinstance(e, _NoGraph):
                return None
            raise

    def _capture(self, draw, rows, key):
        if self._pool is None and self.paged[draw.names[0]].device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        try:
            g = _StepGraph(draw, self.paged, rows, key[2], self._pool)
        except Exception as e:  # noqa: BLE001 - a failed capture runs that key's steps per model instead
            warnings.warn(f"CUDA graph capture of a whole step failed for batch {rows}, widths {key[2]} "
                          f"({type(e).__name__}: {e}); those steps replay per model", stacklevel=4)
            self._failed.add(key)
            return None
        self._graphs[key] = g
        self.captures += 1
        return g


class _NoGraph(Exception):
    """No step graph for this key (its capture failed): the step runs per model."""
