"""A whole speculative round as one CUDA graph: the draft model's forwards and draws, every other model's
verifying extend, the fused verification and the round's record, in one replay.

Eagerly a round of ``S`` positions (the pending token and ``S - 1`` drafts) is ``S`` graph replays of the
draft model with an eager draw after each but the last, one extend replay per other model, an eager
verification and the record's operations, each with its own input copies. Here the host appends ``S``
slots per row to every model's cache, sends every model's positions, slots, lengths, block tables and
pending tokens in one host-to-device copy, copies the rows' keys and draft counts in, replays once, and
clones the record ``[n, 3 + 4 S]`` (:func:`round_record`), which ``SpeculativeLoop`` reads as it reads the
eager round's.

It applies to padded rounds (every row drafts ``S - 1``; ``ivg.speculative_loop``) where the fused draw
and verification apply (no top-k, top-p or min-p) and every model's steps can be captured; a graph is
captured per (batch-size bucket, ``S``, each model's block-table width, sampler settings). Inside, draft
``k`` feeds forward ``k + 1`` from the device, as eagerly, and the verifying models other than the base
extend on a second stream beside it (``ivg.cuda_graphs.SIDE_STREAM``). Off CUDA nothing is captured and a replay runs
the same round eagerly over the same buffers (the CPU tests).
"""
from __future__ import annotations

import torch

from ivg_kernels.speculative import draft_sample, fused_verification_applies, speculative_verify

from .cuda_graphs import StaticInputs, WholeGraph, capture, side_by_side, side_stream, static_forward
from .draw import StepDraw
from .search import sampler_guides


def round_record(draw: StepDraw, out, drafts: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """A round's record, float64 ``[R, 3 + 4 S]``: per row ok, drafts kept, a flagged draft among those
    tested; then per position token, log-prob, implicit value, explicit value (``out``: the verification's
    ``SpeculativeOutput``; ``drafts`` ``[R, S - 1]``; ``num_draft`` ``[R]``: the drafts each row tests)."""
    implicit, explicit = draw.values(out.input_logprobs, out.input_logits)
    per_token = torch.stack([out.tokens.double(), out.logprob.double(), implicit, explicit], dim=2)  # [R, S, 4]
    tested = torch.arange(drafts.shape[1], device=drafts.device) < num_draft.unsqueeze(1)
    flags = torch.stack([out.ok.double(), out.num_accepted.double(), ((drafts < 0) & tested).any(dim=1).double()],
                        dim=1)
    return torch.cat([flags, per_token.flatten(1)], dim=1)


def fused_applies(draw: StepDraw, draft: bool = False) -> bool:
    """Whether the fused verification (or, ``draft``, the fused draft draw, which takes no guides) takes this
    run's settings: no filter, at most four guides (``ivg_kernels.speculative.fused_verification_applies``)."""
    pairs = [] if draft else sampler_guides({name: None for name in draw.names}, draw.guides, draw.eft, draw.w_rm)
    return fused_verification_applies(pairs, draw.temperature, draw.top_k, draw.top_p, draw.min_p)


def verify_round(draw: StepDraw, draft: str, logits: dict, drafts, num_draft, seed, offset, fused: bool = True,
                 uniforms=None):
    """The verification of a round: ``logits`` model name -> ``[R, S, V]``; the fused kernel (``fused``),
    or the reference with the round's ``uniforms``."""
    return speculative_verify(
        logits["base"], sampler_guides(logits, draw.guides, draw.eft, draw.w_rm), logits[draft], drafts.clamp(min=0),
        num_draft, temperature=draw.temperature, top_k=draw.top_k, top_p=draw.top_p, min_p=draw.min_p, seed=seed,
        offset=offset, vocab_size=draw.vocab, backend=draw.backend if fused else "reference",
        uniforms=None if fused else uniforms)


class _RoundGraph(WholeGraph):
    """The static buffers of one round shape, the round over them, and (on CUDA) its capture."""

    def __init__(self, draw: StepDraw, draft: str, paged: dict, rows: int, s: int, widths: tuple, pool):
        names = draw.names
        dev = paged[names[0]].device
        lay = self.inputs = StaticInputs()
        lay.add(torch.long, "pending", (len(names), rows), 0)
        lay.add(torch.long, "seed", (rows,), 0)
        lay.add(torch.long, "offset", (rows, s), 0)
        lay.add(torch.long, "num_draft", (rows,), 0)
        for name, w in zip(names, widths):
            if name == draft:  # S forwards of one token per row (forward k: position k, length k + 1)
                lay.add(torch.long, f"{name}.pos", (s, rows), 0)
                lay.add(torch.long, f"{name}.slots", (s, rows), -1)
                lay.add(torch.int32, f"{name}.lens", (s, rows), 1)
            else:  # one extend of S tokens per row
                lay.add(torch.long, f"{name}.pos", (rows * s,), 0)
                lay.add(torch.long, f"{name}.slots", (rows * s,), -1)
                lay.add(torch.int32, f"{name}.lens", (rows,), s)
            lay.add(torch.int32, f"{name}.table", (rows, w), 0)
        v = self.v = lay.views(dev)
        ids = {name: torch.zeros(s if name == draft else 1, 1, rows * (1 if name == draft else s), dtype=torch.long,
                                 device=dev) for name in names}
        one = (torch.arange(rows + 1, dtype=torch.int32, device=dev), torch.arange(rows, device=dev))
        ext = (torch.arange(0, rows * s + 1, s, dtype=torch.int32, device=dev), torch.arange(rows * s, device=dev))
        self._batches, fwd = [], {}
        for name in names:
            pm, table = paged[name], v[f"{name}.table"]
            if name == draft:
                fwd[name] = []
                for k in range(s):
                    run, batch = static_forward(pm, ids[name][k], v[f"{name}.pos"][k].unsqueeze(0),
                                                v[f"{name}.slots"][k], table, v[f"{name}.lens"][k], *one)
                    fwd[name].append(run)
                    self._batches.append(batch)
            else:
                fwd[name], batch = static_forward(pm, ids[name][0], v[f"{name}.pos"].unsqueeze(0), v[f"{name}.slots"],
                                                  table, v[f"{name}.lens"], *ext, q=s)
                self._batches.append(batch)
        where = {name: i for i, name in enumerate(names)}
        side = side_stream(dev, len(names) - 2)  # the verifying models other than the base, beside it (CUDA)

        def run_round():
            seed, offset, nd = v["seed"], v["offset"], v["num_draft"]
            tok, drafts, logits_d = v["pending"][where[draft]], [], []
            for k in range(s):
                ids[draft][k][0].copy_(tok)
                logits_d.append(fwd[draft][k]())
                if k < s - 1:
                    d = draft_sample(logits_d[-1], temperature=draw.temperature, top_k=draw.top_k, top_p=draw.top_p,
                                     min_p=draw.min_p, seed=seed, offset=offset[:, k], vocab_size=draw.vocab,
                                     backend=draw.backend)
                    drafts.append(d)
                    tok = d.clamp(min=0)
            drafts = torch.stack(drafts, dim=1) if drafts else torch.zeros(rows, 0, dtype=torch.long, device=dev)
            safe = drafts.clamp(min=0)
            for name in names:
                if name != draft:
                    read = ids[name][0].view(rows, s)
                    read[:, 0].copy_(v["pending"][where[name]])
                    read[:, 1:].copy_(safe)
            # the base's extend, and the other verifying models' beside it on a second stream (CUDA)
            extends = {name: fwd[name] for name in names[1:] if name != draft}
            logits = side_by_side(dev, (names[0], fwd[names[0]]), extends, side)
            logits = {name: x.view(rows, s, -1) for name, x in logits.items()}
            logits[draft] = torch.stack(logits_d, dim=1)
            out = verify_round(draw, draft, logits, drafts, nd, seed, offset)
            return round_record(draw, out, drafts, nd)

        self._run = run_round
        self.graph, self.out = capture(run_round, dev, pool)
