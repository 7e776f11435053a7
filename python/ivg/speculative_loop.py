"""Speculative IVG: a small model drafts (``DecodeOptions.draft``: by default the first tuned guide under
EFT guidance, else its reference), every model verifies in one extend forward, and the tokens keep
exactly the guided sampler's distribution (:mod:`ivg_kernels.reference.speculative`).

A round, for every live row that has room before its chunk boundary:

1. **draft**: the draft model reads the row's pending token, then proposes up to ``speculate`` tokens
   from its own warped distribution, reading each (one forward per draft position, batched over rows;
   each draw ``ivg_kernels.draft_sample``, one fused Triton kernel on CUDA where it applies);
2. **verify**: every other model reads the pending token and the drafts in one extend forward, which
   gives its logits at every position (the token RM too when it guides; a token RM that only scores
   stays lazy, as in the plain loop);
3. **accept**: ``ivg_kernels.speculative_verify`` (the fused Triton kernel on CUDA where it applies)
   keeps a prefix of the drafts and draws one more token;
4. **update**: tokens, log-probs, values and finished flags as in a plain step, from the verification
   logits (so values equal those of plain decoding for the same tokens); every model's cache is cut
   back to the tokens kept, and the last new token becomes the row's pending token.

Between rounds every model has read all of a row's tokens but its last one, the pending token
(``prefill`` reads all of a prompt but its last token). A draft never crosses a chunk boundary: a row
drafts at most ``room - 1`` tokens (``room``: tokens left before its chunk ends or before
``max_new_tokens``); rows that reach the boundary wait for the other rows of their prompt, then
``prune`` ranks them exactly as in the plain loop and ``regroup`` forks the kept beams (the children
inherit the pending token, which each reads in its first round).

Where the forwards replay CUDA graphs, a round whose rows may draft unequal numbers is padded: every
row drafts and every model reads as many tokens as the row that drafts most, so the verification is
one fixed-shape extend (:mod:`ivg.cuda_graphs`) instead of a ragged eager one. A row's drafts past its
own ``room - 1`` are never tested (the verification takes each row's own count) and are cut from the
caches with the rejected ones; keys are stateless (a later draw on the same key gets the same numbers
whether or not a discarded draft read them), so the tokens are those of the unpadded round
(``PAD_ROUNDS`` forces either way; the tests compare them). A round stays ragged where padding would
take a row past a model's position limit. A padded round without filters replays as one graph
(:mod:`ivg.round_graphs`: steps 1 to 3 and the record the update reads), where the decoder's
``step_graphs`` is on.
"""
from __future__ import annotations

import torch

from ivg_kernels._transfer import to_device, to_device_many
from ivg_kernels.reference.speculative import spec_uniforms
from ivg_kernels.speculative import draft_sample

from .decode_loop import DecodeLoop
from .models import model_positions
from .planned_steps import PlannedSteps, plans_steps
from .round_graphs import fused_applies, round_record, verify_round
from .search import row_offset

PAD_ROUNDS = None  # pad rounds to equal widths: None where the forwards replay CUDA graphs; True/False force it


class SpeculativeLoop(DecodeLoop):
    """:class:`DecodeLoop` with speculative rounds in place of single-token steps (module docstring)."""

    aligns_admissions = False  # every round reads the device: prompts admitted mid-chunk add no read
    merges_twins = False  # a round's rows read several tokens each (twins are a step's: DecodeLoop)

    def __init__(self, decoder, opts, roles, group, paged, stopper, stats):
        super().__init__(decoder, opts, roles, group, paged, stopper, stats)
        self.gamma = opts.speculate  # drafts per round: fixed, or adapting within [1, speculate]
        self.adapt = opts.speculate_adapt
        self.draft = opts.draft_model  # the model that drafts: tune0 or ref0
        graphs = any(pm.graphs is not None for pm in paged.values())
        self.pad = graphs if PAD_ROUNDS is None else PAD_ROUNDS
        self.limits = {name: model_positions(paged[name].model) for name in self.step_names}  # None: no limit

    # -- schedule --------------------------------------------------------------------------------
    def prefill(self, roots, new) -> dict:
        """Every model reads each new prompt but its last token (which becomes the pending token)."""
        for name in self.step_names:
            self.read_all_but_last(name, roots, new)
        return {}

    def room(self, req, b) -> int:
        """Tokens row ``b`` may still draw before its chunk boundary (or the length limit)."""
        end = self.opts.max_new_tokens
        if self.search and self.opts.chunk_len is not None:
            end = min(end, req.chunk_start + self.opts.chunk_len)
        room = end - len(b.tokens)
        if room < 0:  # a row past its boundary would never reach it, and the loop would wait for it forever
            raise RuntimeError(f"internal error: candidate {b.cand} of prompt {req.index} holds {len(b.tokens)} "
                               f"tokens, past its chunk boundary or max_new_tokens ({end})")
        return room

    def _ranks_now(self, req) -> bool:
        if all(b.finished for b in req.cands):
            return True
        return self.search and all(b.finished or self.room(req, b) == 0 for b in req.cands)

    # -- run -------------------------------------------------------------------------------------
    def round(self) -> None:
        """Draft, verify, accept and update every live row with room (see the module docstring)."""
        rows = [(req, b) for req, b in self.rows if self.room(req, b) > 0]
        if not rows:
            return
        self.stats.steps += 1
        self.stats.gammas.append(self.gamma)
        gam = [min(self.gamma, self.room(req, b) - 1) for req, b in rows]
        width = max(gam) + 1  # positions per row: the pending token's, then one per draft
        drafts_of = [width - 1] * len(rows) if self._padded(rows, width) else gam  # drafted; ``gam`` are tested
        # each row's last token (its prompt's, before it drew any), without joining prompt and response
        pending = {name: [b.tokens[-1] if b.tokens else req.ids[name][-1] for req, b in rows]
                   for name in self.step_names}
        slots = [b.slot for _, b in rows]
        before = {name: self.paged[name].blocks.seq_lens(slots).tolist() for name in self.step_names}
        keys = [(req.seed, len(b.tokens), b.cand, g) for (req, b), g in zip(rows, gam)]
        seed, t0, cand, gam_d = to_device(torch.tensor(keys).T.contiguous(), self.device)  # one copy
        offset = row_offset(t0.unsqueeze(1) + torch.arange(width, device=self.device), cand.unsqueeze(1))  # [R, S]
        try:
            record = None
            if self.step_graphs is not None and all(d == width - 1 for d in drafts_of):  # one replay, where it applies
                record = self.step_graphs.run_round(self.draw, self.draft, slots, width, pending, before, seed, offset,
                                                    gam_d)
            if record is not None:
                self.stats.forwards += width + len(self.step_names) - 1
            else:
                uniforms = spec_uniforms(seed, offset)  # [R, S, 3]: every random number of the round, in one call
                drafts, logits = self._draft(rows, drafts_of, pending, offset, seed, uniforms)
                # a flagged draft (-1) is reported by _update, never read as a token
                self._verify(rows, drafts_of, pending, drafts.clamp(min=0), logits)
                fused = self._fused()
                # the fused kernel draws its own (the same) uniforms
                out = verify_round(self.draw, self.draft, logits, drafts, gam_d, seed, offset, fused, uniforms)
                record = round_record(self.draw, out, drafts, gam_d)
        except BaseException:
            for name in self.step_names:  # nothing half-read: every model back to the round's start
                self.paged[name].blocks.truncate_many(slots, before[name])
            raise
        drafted, accepted = self.stats.drafted, self.stats.accepted
        kept = self._update(rows, gam, record)
        if self.adapt:
            self._adapt(self.stats.drafted - drafted, self.stats.accepted - accepted)
        for name in self.step_names:  # keep the pending token and the kept drafts; the last new token waits
            self.paged[name].blocks.truncate_many(slots, [n + m for n, m in zip(before[name], kept)])

    def _adapt(self, drafted: int, accepted: int) -> None:
        """``speculate_adapt``: one more draft per round after a round that kept every draft, one fewer after
        one that kept fewer than half, within [1, speculate]. Only the speed depends on it: a token is
        decided by the same draft, test and residual whatever the round's length."""
        if drafted and accepted == drafted:
            self.gamma = min(self.gamma + 1, self.opts.speculate)
        elif 2 * accepted < drafted:
            self.gamma = max(self.gamma - 1, 1)

    def _padded(self, rows, width: int) -> bool:
        """Pad this round (module docstring): padding is on and no row would read past a model's positions."""
        if not self.pad:
            return False
        return all(limit is None or len(req.ids[name]) + len(b.tokens) + width - 1 <= limit
                   for name, limit in self.limits.items() for req, b in rows)

    def _draft(self, rows, gam, pending, offset, seed, uniforms):
        """The draft model reads the pending tokens and proposes; returns the drafts ``[R, S-1]`` and its
        logits ``{draft model: [R, S, V]}`` at every position. Nothing is read back: each drafted token
        feeds the next draft forward from the device (a flagged row's -1 as 0; ``_update`` reports it)."""
        r, width, opts = len(rows), max(gam) + 1, self.opts
        fused = self._fused(draft=True)  # the fused draft draw where it applies
        drafts = torch.zeros(r, width - 1, dtype=torch.int64, device=self.device)
        logits = None
        feed = list(range(r))
        pm = self.paged[self.draft]
        # eager forwards: every step's slots and batch planned at once (the same logits as one forward per step)
        steps = PlannedSteps(pm, [b.slot for _, b in rows], [g + 1 for g in gam]) if plans_steps(pm) else None
        tokens = [[t] for t in pending[self.draft]]
        for k in range(width):
            if steps is None:
                out = pm([rows[i][1].slot for i in feed], tokens)
            else:
                out = steps(k, tokens if k else to_device(torch.tensor(pending[self.draft]), self.device))
            self.stats.forwards += 1
            if logits is None:
                logits = out.new_zeros(r, width, out.shape[1])
            logits[self._rows_index(feed, r), k] = out
            feed = [i for i in feed if gam[i] > k]  # rows that draft position k
            if not feed:
                break
            idx = self._rows_index(feed, r)
            d = draft_sample(logits[idx, k], temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                             min_p=opts.min_p, seed=seed[idx], offset=offset[idx, k], vocab_size=self.draw.vocab,
                             uniforms=None if fused else uniforms[idx, k],  # the kernel draws the same uniforms
                             backend=self.decoder.backend if fused else "reference")
            drafts[idx, k] = d
            tokens = d.clamp(min=0)
        return drafts, {self.draft: logits}

    def _fused(self, draft: bool = False) -> bool:
        """The fused Triton kernels run the draft draw (``draft``) or the verification: on CUDA or with
        ``backend="triton"``, for options they cover (no filter; ``ivg.round_graphs.fused_applies``)."""
        backend = self.decoder.backend
        return (backend == "triton" or (backend == "auto" and self.device.type == "cuda")) and fused_applies(
            self.draw, draft)

    def _rows_index(self, feed: list, r: int):
        """An index of rows ``feed`` of ``r``: every row as a slice (no gather, no copy), else a device tensor."""
        return slice(None) if len(feed) == r else to_device(torch.tensor(feed), self.device)

    def _verify(self, rows, gam, pending, drafts, logits) -> None:
        """Every other model reads the pending token and the drafts in one extend forward (the drafts
        straight from the device); adds its logits at every position ``[R, S, V]`` to ``logits``."""
        r, width = len(rows), max(gam) + 1
        counts = [g + 1 for g in gam]
        names = [name for name in self.step_names if name != self.draft]
        full_width = all(c == width for c in counts)  # every row reads all positions: no gather, no scatter
        if full_width:
            firsts = to_device(torch.tensor([pending[name] for name in names]), self.device)
        else:  # each read token's row and position in reading order, and each model's pending tokens: one copy
            where = torch.tensor([[i, j] for i in range(r) for j in range(counts[i])]).T.contiguous()
            (row, pos), firsts = to_device_many([where, torch.tensor([pending[name] for name in names])], self.device)
        for name, first in zip(names, firsts):
            read = torch.cat([first.unsqueeze(1), drafts], dim=1)  # [R, S]
            flat = read.flatten() if full_width else read[row, pos]
            out = self.paged[name]([b.slot for _, b in rows], flat, counts=counts, every_position=True)
            self.stats.forwards += 1
            if full_width:
                logits[name] = out.view(r, width, out.shape[1])
            else:
                full = out.new_zeros(r, width, out.shape[1])
                full[row, pos] = out
                logits[name] = full

    # -- update ----------------------------------------------------------------------------------
    def _update(self, rows, gam, record) -> list:
        """Append each row's new tokens with their log-probs and values, stopping at a finish; returns,
        per row, how many tokens it took. ``record``: the round's ``[R, 3 + 4 S]``
        (``ivg.round_graphs.round_record``), read here: the round's one read of the device."""
        scored = "rm" in self.step_names
        host = record.tolist()
        self.stats.host_reads += 1
        if any(h[2] for h in host):
            raise RuntimeError("the draft model's logits held NaN/inf")
        bad = [i for i, h in enumerate(host) if not h[0]]
        if bad:
            raise RuntimeError(f"rows {bad[:8]} had NaN/inf logits or no finite candidate")
        kept = []
        for (req, b), h, g in zip(rows, host, gam):
            n = int(h[1])
            m = 0
            for tok, logprob, imp, exp in (h[3 + 4 * j: 7 + 4 * j] for j in range(n + 1)):
                b.tokens.append(int(tok))
                b.logprob += logprob
                b.implicit += imp
                if scored:
                    b.explicit = exp
                m += 1
                b.finished = self.stopper.finished(b.tokens) or len(b.tokens) == self.opts.max_new_tokens
                if b.finished:
                    break
            kept.append(m)
            self.stats.drafted += g
            self.stats.accepted += min(n, m)
            self.stats.new_tokens += m
        for req in self.active:
            req.t = max(len(b.tokens) for b in req.cands)
        return kept

    # -- schedule: after a chunk boundary --------------------------------------------------------
    def regroup(self, plans: dict) -> None:
        """Drop finished and pruned rows; each kept parent forks into its K children (no forward: the
        children read the pending token in their first round)."""
        self.free_pruned()
        self.rows, _ = self.fork(self.continuing(plans), plans)
