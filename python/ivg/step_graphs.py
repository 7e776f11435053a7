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
        self.inputs.add(torch.long, "tokens", (rows,), 0)
        self.inputs.add(torch.long, "seed", (rows,), 0)
        self.inputs.add(torch.long, "offset", (rows,), 0)
        for name, w in zip(names, widths):
            self.inputs.add(torch.long, f"{name}.pos", (rows,), 0)
            self.inputs.add(torch.long, f"{name}.slots", (rows,), -1)  # padding rows write nothing
            self.inputs.add(torch.int32, f"{name}.lens", (rows,), 1)
            self.inputs.add(torch.int32, f"{name}.table", (rows, w), 0)
        v = self.v = self.inputs.views(dev)
        one = (torch.arange(rows + 1, dtype=torch.int32, device=dev), torch.arange(rows, device=dev))
        forwards, self._batches = [], []
        for name in names:
            run, batch = static_forward(paged[name], v["tokens"].unsqueeze(0), v[f"{name}.pos"].unsqueeze(0),
                                        v[f"{name}.slots"], v[f"{name}.table"], v[f"{name}.lens"], *one)
            forwards.append(run)
            self._batches.append(batch)

        side = side_stream(dev, len(names) - 1)  # the guides and token RM beside the base (CUDA)

        def logits() -> dict:  # the base first in names (IVGModels.roles)
            return side_by_side(dev, (names[0], forwards[0]), dict(zip(names[1:], forwards[1:])), side)

        def step():
            s = draw.draw(logits(), v["seed"], v["offset"])
            return torch.cat([draw.record(s), s.tokens.clamp(min=0).double().unsqueeze(1)], dim=1)  # [rows, 6]

        self._run = step
        self.graph, self.out = capture(step, dev, pool)


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

        def step(append):
            inputs = {}
            for name in draw.names:
                table, lens, slots = append(name)
                inputs.update({f"{name}.pos": lens.long() - 1, f"{name}.slots": slots, f"{name}.lens": lens,
                               f"{name}.table": table})
            widths = tuple(width_for(inputs[f"{name}.table"].shape[1]) for name in draw.names)
            g = self._get(("step", draw, rows, widths), lambda: _StepGraph(draw, self.paged, rows, widths, self._pool),
                          f"step (batch {rows}, widths {widths})")
            return None if g is None else (g, inputs, dict(tokens=drawn, seed=seed, offset=offset), len(draw.names))

        return self._attempt(seq_ids, 1, step)

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

        def round_(append):
            inputs = {"pending": torch.tensor([pending[name] for name in draw.names])}
            for name in draw.names:
                table, lens, slots = append(name)
                pos = torch.tensor(before[name]).unsqueeze(1) + torch.arange(s)  # [n, s]
                if name == draft:  # per forward k: [s, n]
                    inputs.update({f"{name}.pos": pos.T, f"{name}.slots": slots.view(n, s).T,
                                   f"{name}.lens": (pos + 1).T})
                else:
                    inputs.update({f"{name}.pos": pos.flatten(), f"{name}.slots": slots, f"{name}.lens": lens})
                inputs[f"{name}.table"] = table
            widths = tuple(width_for(inputs[f"{name}.table"].shape[1]) for name in draw.names)
            g = self._get(("round", draw, draft, rows, s, widths),
                          lambda: _RoundGraph(draw, draft, self.paged, rows, s, widths, self._pool),
                          f"round (batch {rows}, {s} positions, widths {widths})")
            if g is None:
                return None
            return g, inputs, dict(seed=seed, offset=offset, num_draft=num_draft), s + len(draw.names) - 1

        return self._attempt(seq_ids, s, round_)

    def _attempt(self, seq_ids, count, plan):
        """Append ``count`` slots per sequence in every model (copy-on-write copies first), then replay what
        ``plan(append)`` returns: ``append(name)`` makes the appends of model ``name`` and gives its
        ``(block table, lengths, host slot mapping)``; ``plan`` returns ``(graph, host inputs, device inputs,
        forwards)``, or None where no graph applies. Returns the replay's record, or None with every append
        undone; on an error the appends are undone and the error raised."""
        appended = []

        def append(name):
            pm = self.paged[name]
            pm.attach()  # transformers' forward attends through the paged cache (a no-op when on)
            slots = pm.cache.blocks.append(seq_ids, count, copy=pm.cache.pool.copy_blocks)
            appended.append(pm.cache)
            return (*pm.cache.blocks.tables(seq_ids), slots)

        out = None
        try:
            planned = plan(append)
            if planned is not None:
                g, host, device, forwards = planned
                out = g.replay(len(seq_ids), host, device)
                self._count(forwards)
            return out
        finally:
            if out is None:  # no graph, or an error
                for cache in appended:
                    cache.truncate_appended(seq_ids, count)

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
