"""A whole decode step as one CUDA graph: every model's forward over the tokens the rows drew, then the
fused draw of the next tokens and the step's record, in one replay.

Between host reads the decode loop runs ``feed_drawn`` (every row reads the token it drew) and then
``sample`` (the next draw). Eagerly that is a graph replay per model (:mod:`ivg.cuda_graphs`), each
with its own input copies and output clone, and an eager sampler call between them; here the host
appends one slot per row to every model's cache, sends every model's positions, slots, lengths and
block tables in one host-to-device copy, copies the drawn tokens and the rows' keys into the graph's
buffers, replays once, and clones the record (ok, token, log-prob, implicit and explicit values, and
the token clamped for the next step's input) ``[n, 6]``. Inside the graph the small models' forwards run on
a second stream beside the base model's (``ivg.cuda_graphs.SIDE_STREAM``), joined before the draw.

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

from .cuda_graphs import (MAX_EXTEND_TOKENS, StaticInputs, WholeGraph, bucket_for, capture, graphable, side_by_side,
                          side_stream, static_forward, width_for)
from .draw import StepDraw
from .round_graphs import _RoundGraph, fused_applies



class _StepGraph(WholeGraph):
    """The static buffers of one step, the step over them, and (on CUDA) its capture."""

    def __init__(self, draw: StepDraw, paged: dict, rows: int, widths: tuple, pool):
        names = draw.names
        dev = paged[names[0]].device
        self.inputs = StaticInputs()
        self.inputs.add(torch.long, "tokens", (1, rows), 0)
        self.inputs.add(torch.long, "keys", (2, rows), 0)  # seed, offset
        for name, w in zip(names, widths):
            self.inputs.add(torch.long, f"{name}.pos", (rows,), 0)
            self.inputs.add(torch.long, f"{name}.slots", (rows,), -1)  # padding rows write nothing
            self.inputs.add(torch.int32, f"{name}.lens", (rows,), 1)
            self.inputs.add(torch.int32, f"{name}.table", (rows, w), 0)
        v = self.v = self.inputs.views(dev)
        one = (torch.arange(rows + 1, dtype=torch.int32, device=dev), torch.arange(rows, device=dev))
        forwards, self._batches = [], []
        for name in names:
            run, batch = static_forward(paged[name], v["tokens"], v[f"{name}.pos"].unsqueeze(0), v[f"{name}.slots"],
                                        v[f"{name}.table"], v[f"{name}.lens"], *one)
            forwards.append(run)
            self._batches.append(batch)

        side = side_stream(dev, len(names) - 1)  # the guides and token RM beside the base (CUDA)

        def logits() -> dict:  # the base first in names (IVGModels.roles)
            return side_by_side(dev, (names[0], forwards[0]), dict(zip(names[1:], forwards[1:])), side)

        def step():
            s = draw.draw(logits(), v["keys"][0], v["keys"][1])
            return torch.cat([draw.record(s), s.tokens.clamp(min=0).double().unsqueeze(1)], dim=1)  # [rows, 6]

        self._run = step
        self.graph, self.out = capture(step, dev, pool)

    def replay(self, drawn, seed, offset, inputs: dict) -> torch.Tensor:
        """The step's record ``[n, 6]`` for ``n`` rows: ``drawn`` their tokens, ``seed``/``offset`` their keys
        (device ``[n]``), ``inputs`` per model's view name (``base.pos``, ``.slots``, ``.lens``, ``.table``)
        host tensors of the real rows."""
        n = len(drawn)
        self.inputs.send(inputs)
        self.v["tokens"][0, :n].copy_(drawn)
        self.v["keys"][0, :n].copy_(seed)
        self.v["keys"][1, :n].copy_(offset)
        return self._replay(n)


class StepGraphs:
    """The whole-step graphs of one set of paged models (decode steps, and speculative rounds:
    :mod:`ivg.round_graphs`), each captured on first use of its key."""

    def __init__(self, paged: dict):
        self.paged = paged
        self._graphs: dict = {}
        self._failed: set = set()
        self._pool = None
        self.steps = 0  # steps (and speculative rounds) replayed
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
        appended, inputs = [], {}
        try:
            for name in draw.names:
                cache, slots = self._append(name, seq_ids, 1, appended)
                table, lens = cache.blocks.tables(seq_ids)
                inputs.update({f"{name}.pos": lens.long() - 1, f"{name}.slots": slots, f"{name}.lens": lens,
                               f"{name}.table": table})
            key = ("step", draw, rows, tuple(width_for(inputs[f"{name}.table"].shape[1]) for name in draw.names))
            g = self._get(key, lambda: _StepGraph(draw, self.paged, rows, key[3], self._pool),
                          f"step (batch {rows}, widths {key[3]})")
            if g is None:
                raise _NoGraph
            out = g.replay(drawn, seed, offset, inputs)
            self._count(len(draw.names))
            return out
        except BaseException as e:
            for cache in appended:
                cache.truncate_appended(seq_ids, 1)
            if isinstance(e, _NoGraph):
                return None
            raise

    def run_round(self, draw: StepDraw, draft: str, seq_ids: list, s: int, pending: dict, before: dict, seed, offset,
                  num_draft) -> torch.Tensor | None:
        """A speculative round of ``s`` positions per row (every row drafting ``s - 1``) as one replay
        (:mod:`ivg.round_graphs`): ``pending`` and ``before`` per model the rows' pending tokens and lengths
        (host lists); ``seed`` ``[n]``, ``offset`` ``[n, s]``, ``num_draft`` ``[n]`` on the device. Returns
        the round's record ``[n, 3 + 4 s]``, or None where no graph applies (nothing changed then). Every
        model's sequences grow by ``s`` (the caller cuts them back to what it keeps); on an error they are
        back to their lengths before the call."""
        rows, n = bucket_for(len(seq_ids)), len(seq_ids)
        if (rows is None or rows * s > MAX_EXTEND_TOKENS or not self.applies(draw.names)
                or draw.backend not in ("auto", "triton") or not fused_applies(draw)):
            return None
        appended, inputs = [], {"pending": torch.tensor([pending[name] for name in draw.names])}
        try:
            for name in draw.names:
                cache, slots = self._append(name, seq_ids, s, appended)
                table, lens = cache.blocks.tables(seq_ids)
                pos = torch.tensor(before[name]).unsqueeze(1) + torch.arange(s)  # [n, s]
                if name == draft:  # per forward k: [s, n]
                    inputs.update({f"{name}.pos": pos.T, f"{name}.slots": slots.view(n, s).T,
                                   f"{name}.lens": (pos + 1).T})
                else:
                    inputs.update({f"{name}.pos": pos.flatten(), f"{name}.slots": slots, f"{name}.lens": lens})
                inputs[f"{name}.table"] = table
            widths = tuple(width_for(inputs[f"{name}.table"].shape[1]) for name in draw.names)
            key = ("round", draw, draft, rows, s, widths)
            g = self._get(key, lambda: _RoundGraph(draw, draft, self.paged, rows, s, widths, self._pool),
                          f"round (batch {rows}, {s} positions, widths {widths})")
            if g is None:
                raise _NoGraph
            out = g.replay(inputs, seed, offset, num_draft, n)
            self._count(s + len(draw.names) - 1)
            return out
        except BaseException as e:
            for cache in appended:
                cache.truncate_appended(seq_ids, s)
            if isinstance(e, _NoGraph):
                return None
            raise

    def _append(self, name, seq_ids, count, appended):
        """``(cache, host slot mapping)``: ``count`` slots per sequence in model ``name``'s cache, copy-on-write
        copies first; the cache joins ``appended`` (what an error undoes)."""
        pm = self.paged[name]
        pm.attach()  # transformers' forward attends through the paged cache (a no-op when on)
        slots = pm.cache.blocks.append(seq_ids, count, copy=pm.cache.pool.copy_blocks)
        appended.append(pm.cache)
        return pm.cache, slots

    def _count(self, forwards: int) -> None:
        self.steps += 1
        self.forwards += forwards

    def _get(self, key, make, what: str):
        """The graph of ``key``, captured by ``make()`` on first use; None where its capture failed (warned
        once)."""
        if key in self._failed:
            return None
        g = self._graphs.get(key)
        if g is None:
            if self._pool is None and self.paged["base"].device.type == "cuda":
                self._pool = torch.cuda.graph_pool_handle()
            try:
                g = make()
            except Exception as e:  # noqa: BLE001 - a failed capture runs that key per model instead
                warnings.warn(f"CUDA graph capture of a whole {what} failed ({type(e).__name__}: {e}); "
                              "those run per model", stacklevel=4)
                self._failed.add(key)
                return None
            self._graphs[key] = g
            self.captures += 1
        return g


class _NoGraph(Exception):
    """No graph for this key (its capture failed): the step or round runs per model."""
