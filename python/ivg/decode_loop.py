"""The state of a decoding run and the units of one step: admit, sample, record, prune, feed.

``IVGDecoder.generate`` drives them (schedule, run, update); this module holds what they change:

* ``Request``: one prompt being decoded: its candidates, its own step count and chunk start;
* ``DecodeLoop``: the live rows (one per unfinished candidate holding a KV sequence), their current
  logits per model, and the KV caches, with one method per unit of a step.

A token reward model that only scores (its sampler weight is 0: ``cbs``, ``ivg``, ``bon``) is not run
every step: its value is the Q of a candidate's last token, needed only when the candidate is ranked
or finishes, so it reads the tokens it has not seen then, in one ragged extend forward for every such
candidate: at a chunk boundary or the length limit before the host reads, from the device's draws, so
one read brings tokens and values (``score_rm_before_read``); for a candidate that finishes by EOS
elsewhere, after the read (``score_lazy_rm``). The value is the same Q the per-step path reads from the
sampler.

The host reads the device only when it must (``DecodeLoop.record``): at a chunk boundary or the length
limit of some prompt, every step when stop strings are set (they are checked on the host), and every
``read_every`` steps when an EOS token may end rows (on the CPU, where the device is the host, every
step). In between, the draws stay on the device and each row reads its new token straight from the
sampler's output (``feed_drawn``); the host replays the steps it has not read in one copy. A row that
drew EOS between reads keeps drawing until the read, and what it drew after EOS is dropped: its random
key depends on nothing else, so the results are those of reading every step.

Where the host reads every step's tokens (the CPU), candidates of a prompt with the same response so far
(twins, ``ivg.twins``) are computed once per step: one row of each set reads its token, the others get its
keys and values in their own KV sequences and its logits; a lazy token RM reads them once as well.

Rows of different prompts share every sampler call and forward, and a prompt that finishes makes
room for the next waiting one (continuous batching; where the host reads every few steps, a search
admits at the active prompts' chunk boundary: ``admit``). A candidate's random key depends only on its
prompt, its index and its prompt's step (``search.row_offset``), so results do not depend on which
prompts were decoded together or when they started.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ivg_kernels._transfer import to_device, to_device_many
from ivg_kernels.block_manager import KVCacheExhausted

from .draw import StepDraw
from .search import OFFSET_STRIDE, Beam, chunk_scores, chunk_scores_many, expand, rank, row_offset
from .twins import Twins, first_of, twin_args

# Steps between host reads when an EOS token may end rows and the device is not the host: a row that
# drew EOS runs on (wasted work) until the next read.
READ_EVERY_ON_DEVICE = 8
# Tokens one forward reads at most when prompts are read (admission), and when a lazy token RM catches up with many
# candidates (best-of-N's whole responses at its length limit), unless one sequence reads more: bounds the
# activations of admitting many long prompts at once (64 prompts of 2,048 tokens: 8 forwards of 16,384 tokens, not
# one of 131,072, whose MLP activations alone would take gigabytes on a large model). Each prompt is read whole, in
# one forward (a model whose rotary frequencies depend on the length a sequence reaches in a forward, as longrope's
# do, rotates a prompt's keys as transformers does reading it at once). Results do not depend on it. On the CPU, 16
# prompts of 2,048 tokens through a 4-layer, 768-wide GPT-2 (one thread) took 69 s in one forward (3.1 GB more peak
# memory), 61 s in forwards of 16,384 tokens (2.0 GB) and 46-55 s in forwards of 4,096 (1.2 GB; of 2,048, no
# faster): the CPU takes CPU_PREFILL_TOKENS.
PREFILL_TOKENS = 16384
CPU_PREFILL_TOKENS = 4096


def prefill_groups(lengths, budget: int) -> list:
    """The lists of ``lengths`` tokens in consecutive groups of at most ``budget`` tokens, each read in one forward
    (a list longer than ``budget`` alone): lists of indices, in order."""
    groups, cur, room = [], [], budget
    for i, n in enumerate(lengths):
        if cur and n > room:
            groups.append(cur)
            cur, room = [], budget
        cur.append(i)
        room -= n
    if cur:
        groups.append(cur)
    return groups


@dataclass
class Request:
    """One prompt: ``cands`` are its current candidates; ``t`` tokens drawn by each so far."""

    index: int
    prompt: object
    ids: dict  # model name -> the prompt's token ids for that model
    seed: int
    cands: list = field(default_factory=list)  # Beam
    t: int = 0
    chunk_start: int = 0
    result: Optional[object] = None  # GenerationResult once every candidate has finished


class DecodeLoop:
    """Live rows of every admitted prompt and the units of a decode step (see the module docstring)."""

    # whether admissions may wait for the active prompts' chunk boundary (``admit``); a loop that reads the
    # device at every step or round gains no read by it
    aligns_admissions = True
    # whether a step may compute one row of each set of twins (ivg.twins): rows that read one token per step
    merges_twins = True

    def __init__(self, decoder, opts, roles, group, paged, stopper, stats):
        m = decoder.models
        self.decoder, self.opts, self.group, self.paged, self.stopper, self.stats = (
            decoder, opts, group, paged, stopper, stats)
        self.names = [r[0] for r in roles]
        guides = tuple((i, g.beta) for i, g in enumerate(m.guides)) if opts.uses_guides else ()
        w_rm = m.token_rm_weight if "tokenrm" in opts.tokenwise else 0.0
        self.lazy_rm = "rm" in self.names and w_rm == 0.0
        self.step_names = [n for n in self.names if not (self.lazy_rm and n == "rm")]  # run every step
        # what every draw of the run depends on besides logits and keys (the settings of the sampler calls)
        self.draw = StepDraw(tuple(self.step_names), guides, "eft" in opts.tokenwise, w_rm, opts.temperature,
                             opts.top_k, opts.top_p, opts.min_p, min(paged[n].vocab_size for n in self.names),
                             decoder.backend)
        self.step_graphs = decoder.step_graphs_for(paged)  # ivg.step_graphs (None where steps run per model)
        self.device = paged["base"].device
        self.search = opts.width * opts.successors > 1
        self.rows: list = []  # (Request, Beam) of every live row, in the order of ``cur``
        self.cur: dict = {}  # model name -> logits [len(rows), V] at each row's last position
        self.active: list = []  # admitted Requests not yet finished
        on_host = self.device.type == "cpu"
        self.read_every = decoder.read_every or (1 if on_host else READ_EVERY_ON_DEVICE)
        # Admissions wait for the active prompts' chunk boundary when the host reads less than every step:
        # the prompts then share one phase, so one read per chunk serves them all (``admit``)
        self.align = (self.aligns_admissions and self.search and self.read_every > 1 and not stopper.stop
                      and opts.chunk_len is not None and opts.chunk_len <= self.read_every)
        self.pending: list = []  # per step not yet read by the host: device [rows, 5] (the rows stay the same)
        self.drawn = None  # the last step's tokens on the device, for feed_drawn
        self._keys = None  # the rows' (seed, offset) on the device for this step; None when the rows changed
        self._slots = None  # the rows' KV sequences, for feed_drawn; None when the rows changed
        self._next = None  # the next step's record [rows, 6], drawn in the replay of a whole step (feed_drawn)
        self._free_later: list = []  # KV sequences pruned or finished at a read, freed once the next forwards are out
        # twin rows (ivg.twins): one of each set is computed, where the host knows every step's tokens before the
        # forwards
        self.twins = (Twins() if self.merges_twins and decoder.merge_twins and self.read_every == 1
                      and self.step_graphs is None and opts.width * opts.successors > 1 else None)

    # -- schedule --------------------------------------------------------------------------------
    def admit(self, waiting, capacity: int) -> None:
        """Prefill waiting prompts (ragged forwards per model: ``read_prompts``) while fewer than ``capacity``
        are active, and fork each into W*K rows sharing its prompt blocks (after a read, before the next draw).

        Where the host reads the device every few steps (``align``), a search admits only when every
        active prompt is at a chunk boundary (or none is active): a prompt admitted mid-chunk would have
        its boundaries at other steps than the others', and each boundary is a read of every row (a
        synchronisation and the host's bookkeeping while the device waits), so prompts admitted as others
        finish would spread the reads over up to every step. Rows freed mid-chunk wait at most
        ``chunk_len - 1 < read_every`` steps. Results do not depend on when a prompt is admitted."""
        self.free_pruned()
        if not waiting or self.pending or self._next is not None or len(self.active) >= capacity:
            return  # (between reads, the usual case: no loop over the active prompts below)
        if self.align and not all(self._at_chunk_boundary(req) for req in self.active):
            return
        new = []
        while waiting and len(self.active) + len(new) < capacity:
            new.append(waiting.popleft())
        roots = self.group.new_sequences(len(new))
        first = self.prefill(roots, new)
        if self.lazy_rm:  # a lazy token RM reads all but the prompt's last token now, the rest when scoring
            self.read_all_but_last("rm", roots, new)
        rm_read = [len(r.ids["rm"]) - 1 if self.lazy_rm else 0 for r in new]
        kids = self.group.fork_many(roots, self.opts.width * self.opts.successors, replace=True)
        pick = []
        for k, req in enumerate(new):
            twin = self.twins.new_class() if self.twins is not None else -1  # its candidates: one class
            req.cands = [Beam(j, slot=kids[k][j], rm_read=rm_read[k], twin=twin) for j in range(len(kids[k]))]
            self.rows += [(req, b) for b in req.cands]
            pick += [k] * len(req.cands)
        self._rows_changed()
        sel = to_device(torch.tensor(pick), self.device)
        for name, logits in first.items():
            rows = logits.index_select(0, sel)
            self.cur[name] = torch.cat([self.cur[name], rows]) if name in self.cur else rows
        self.active += new

    def read_all_but_last(self, name, roots, new) -> None:
        """Model ``name`` reads each new prompt but its last token (ragged forwards; none for prompts of one
        token)."""
        todo = [(s, r.ids[name][:-1]) for s, r in zip(roots, new) if len(r.ids[name]) > 1]
        if todo:
            self.read_prompts(name, [s for s, _ in todo], [t for _, t in todo])

    def prefill(self, roots, new) -> dict:
        """Every model reads the new prompts (ragged forwards); each model's logits after them."""
        return {name: self.read_prompts(name, roots, [r.ids[name] for r in new]) for name in self.step_names}

    def read_prompts(self, name, seqs, lists) -> torch.Tensor:
        """Model ``name`` reads each list of tokens into its sequence, in forwards of at most ``PREFILL_TOKENS``
        tokens (``CPU_PREFILL_TOKENS`` on the CPU) unless one list holds more (one forward, as a rule); its logits
        after each list's last token, ``[len(seqs), V]``."""
        outs = []
        for group in prefill_groups([len(t) for t in lists], self._read_budget()):
            outs.append(self.paged[name]([seqs[i] for i in group], [lists[i] for i in group]))
            self.stats.forwards += 1
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _read_budget(self) -> int:
        """Tokens one forward reads at most when sequences read many (``PREFILL_TOKENS``)."""
        return CPU_PREFILL_TOKENS if self.device.type == "cpu" else PREFILL_TOKENS

    def _rows_changed(self) -> None:
        """Forget what was derived from the rows (their keys and slots): they were added, replaced or forked."""
        self._keys = self._slots = self._next = None

    # -- run: the draw ---------------------------------------------------------------------------
    def sample(self):
        """One fused draw for every live row: base logits plus the weighted guide and token-RM rows. The
        rows' keys go to the device once per set of rows; each step after that adds one step to the
        offsets there (every active prompt advances one step, ``row_offset``), with no host work per row.
        After a whole step replayed from one graph (``feed_drawn``) the draw was made there: its record."""
        self.stats.steps += 1
        seed, offset = self._step_keys()
        self._keys = (seed, offset + OFFSET_STRIDE)  # the next step's, on the device
        if self._next is not None:
            drawn, self._next = self._next, None
            return drawn
        return self.draw.draw(self.cur, seed, offset)

    def _step_keys(self) -> tuple:
        """The rows' ``(seed, offset)`` for this step, on the device."""
        if self._keys is None:
            keys = torch.tensor([[r.seed for r, _ in self.rows], [row_offset(r.t, b.cand) for r, b in self.rows]])
            self._keys = tuple(to_device(keys, self.device))  # one copy
        return self._keys

    # -- update ----------------------------------------------------------------------------------
    def record(self, sample) -> bool:
        """Keep each row's token, log-prob, implicit value (sum of beta * log-ratio), explicit value and
        NaN flag on the device; advance every prompt's step. When the host must see them now
        (:meth:`must_read`), read every step not read yet in one copy and append the tokens, add the
        values and set the finished flags row by row, as if read every step. Returns whether it read."""
        if isinstance(sample, torch.Tensor):  # a whole step's record [rows, 6]: the fed token last
            self.pending.append(sample[:, :5])
            self.drawn = sample[:, 5].long()
        else:
            self.pending.append(self.draw.record(sample))
            self.drawn = sample.tokens.clamp(min=0)  # a flagged row's -1 is reported by the read, not fed
        for req in self.active:  # every active prompt has rows: one without any has finished
            req.t += 1
        if not self.must_read():
            return False
        if self.lazy_rm:
            self.score_rm_before_read()
        self.read()
        return True

    def must_read(self) -> bool:
        """The host needs the drawn tokens now: every step with stop strings or ``read_every`` 1, at a
        chunk boundary or the length limit of some prompt, or after ``read_every`` unread steps when an
        EOS token may have ended rows."""
        if self.read_every <= 1 or self.stopper.stop or any(self._at_boundary(req) for req in self.active):
            return True
        return bool(self.stopper.eos) and len(self.pending) >= self.read_every

    def _at_chunk_boundary(self, req) -> bool:
        """``req`` is at a chunk boundary of a search (known before any read)."""
        chunk = self.opts.chunk_len
        return self.search and chunk is not None and (req.t - req.chunk_start) % chunk == 0

    def _at_boundary(self, req) -> bool:
        """``req`` is at a chunk boundary of a search or at the length limit (known before any read)."""
        return req.t == self.opts.max_new_tokens or self._at_chunk_boundary(req)

    def read(self) -> None:
        """One device-to-host copy of the steps not read yet; each row takes them in order until it
        finishes (EOS, a stop string, or the length limit). Vectorised over rows (the host's work at a
        chunk boundary: 1,024 rows at once with the default 64 prompts); the values add up step by step,
        in the order the per-row loop of a plain decoder adds them."""
        host = torch.stack(self.pending, dim=1).cpu()  # [rows, S, 5]: ok, token, log-prob, implicit, explicit
        self.pending = []
        self.stats.host_reads += 1
        beams = [b for _, b in self.rows]
        n, steps = host.shape[0], host.shape[1]
        ok, tokens = host[..., 0] != 0, host[..., 1].long()
        # each row's response length after each step
        length = torch.tensor([len(b.tokens) for b in beams]).unsqueeze(1) + torch.arange(1, steps + 1)
        ends = length == self.opts.max_new_tokens
        if self.stopper.eos:
            ends |= torch.isin(tokens, torch.tensor(sorted(self.stopper.eos)))
        stop = ~ok | ends
        first = torch.where(stop.any(dim=1), stop.to(torch.uint8).argmax(dim=1), steps)  # the first step that stops
        at = first.clamp(max=steps - 1)
        stopped = first < steps
        bad = stopped & ~ok[torch.arange(n), at]
        finished = (stopped & ~bad).tolist()
        taken = (first + (stopped & ~bad).long()).tolist()  # a finishing step's token is taken, a bad step's not
        drawn = tokens.tolist()
        if self.stopper.stop:  # stop strings: checked token by token on the host (a read every step then)
            for i, b in enumerate(beams):
                for k in range(taken[i]):
                    if self.stopper.finished(b.tokens + drawn[i][:k + 1]):
                        taken[i], finished[i] = k + 1, True
                        break
        take = torch.arange(steps) < torch.tensor(taken).unsqueeze(1)  # [rows, S]
        logprob = torch.tensor([b.logprob for b in beams], dtype=torch.float64)
        implicit = torch.tensor([b.implicit for b in beams], dtype=torch.float64)
        explicit = torch.tensor([b.explicit for b in beams], dtype=torch.float64)
        for k in range(steps):  # one step at a time: the same float64 sums as adding token by token
            m = take[:, k]
            logprob = torch.where(m, logprob + host[:, k, 2], logprob)
            implicit = torch.where(m, implicit + host[:, k, 3], implicit)
            q = host[:, k, 4]  # the token RM's Q: every step when it guides; a lazy one's at its scoring
            explicit = torch.where(m & ~q.isnan(), q, explicit)
        for b, t, k, lp, imp, exp, fin in zip(beams, drawn, taken, logprob.tolist(), implicit.tolist(),
                                              explicit.tolist(), finished):
            if k:
                b.tokens += t[:k]
                b.logprob, b.implicit, b.explicit, b.finished = lp, imp, exp, fin
        self.stats.new_tokens += sum(taken)
        if bad.any():  # (with stop strings the host reads every step: no stop string comes before a bad step)
            rows = bad.nonzero().flatten().tolist()
            raise RuntimeError(f"rows {rows[:8]} had NaN/inf logits or no finite candidate")

    def score_rm_before_read(self) -> None:
        """A lazy token RM scores the rows of the prompts at a chunk boundary or the length limit before
        the host reads the steps, so that one read brings their tokens and values together: each row
        feeds the tokens the RM has not read, those the host knows and then the unread draws straight
        from the device, all but the last, in one ragged forward whose head runs only where a draw is
        predicted; the RM's Q at every unread draw goes into that step's record. Twins (``ivg.twins``) whose RM has
        read as much read the same tokens: one of each set is computed. (Rows that finish by EOS elsewhere are
        scored after the read, by ``score_lazy_rm``.) Rows whose tokens to read exceed ``PREFILL_TOKENS``
        together (best-of-N at its length limit: every candidate's whole response) are scored in groups of rows
        within it, each row whole in one forward."""
        now = {id(req) for req in self.active if self._at_boundary(req)}
        every = [(i, req, b) for i, (req, b) in enumerate(self.rows) if id(req) in now]
        if not every:
            return
        steps = len(self.pending)
        drawn = torch.stack([p[:, 1] for p in self.pending], dim=1).clamp(min=0).long()  # [rows, S] on the device
        reads = [len(req.ids["rm"]) + len(b.tokens) - b.rm_read + steps - 1 for _, req, b in every]
        for group in prefill_groups(reads, self._read_budget()):
            self._score_before_read([every[j] for j in group], steps, drawn)

    def _score_before_read(self, every, steps, drawn) -> None:
        """``score_rm_before_read`` for rows ``every`` (``(row index, request, beam)``) in one forward."""
        # (twins are known where the host reads every step: no draw is read from the device below)
        split = first_of([(b.twin, b.rm_read) for _, _, b in every]) if self.twins is not None and steps == 1 else None
        if split is not None and len(split[0]) == len(every):
            split = None
        rows = every if split is None else [every[i] for i in split[0]]  # the rows computed
        # What the RM reads, gathered from ``src`` = (every row's unread draws [R * steps], the known tokens):
        # row j reads its n_j known tokens the RM has not read (at least one), then its first steps - 1 draws.
        host, unread = [], []
        for _, req, b in rows:
            prompt = req.ids["rm"]
            new = prompt[b.rm_read:] + b.tokens if b.rm_read < len(prompt) else b.tokens[b.rm_read - len(prompt):]
            host += new
            unread.append(len(new))
        n = torch.tensor(unread)
        counts = n + (steps - 1)
        starts = counts.cumsum(0) - counts  # each row's first read token
        row = torch.arange(len(rows)).repeat_interleave(counts)  # the row of each read token
        k = torch.arange(int(counts.sum())) - starts[row]  # its place in its row
        known_at = len(rows) * steps + (n.cumsum(0) - n)[row] + k
        gather = torch.where(k < n[row], known_at, row * steps + k - n[row])
        where = starts.unsqueeze(1) + n.unsqueeze(1) - 1 + torch.arange(steps)  # the output that predicts draw p
        counts = counts.tolist()
        moved = to_device_many(
            [torch.tensor([i for i, _, _ in every]), gather, where.flatten(), torch.tensor(host, dtype=torch.long)]
            + ([] if split is None else [torch.tensor(split[0]), torch.tensor(split[1])]), self.device)
        sel, gather_d, where_d, host_d = moved[:4]
        mine = drawn.index_select(0, sel)  # [every row, S]
        slots, twins = [b.slot for _, _, b in every], None
        counts_all, mine_c = counts, mine
        if split is not None:  # the rows computed read their own draws; the twins theirs (steps == 1)
            slots, twins = twin_args(slots, *split)
            counts_all, mine_c = [counts[j] for j in split[1]], mine.index_select(0, moved[4])
        src = torch.cat([mine_c.flatten(), host_d])
        q = self.paged["rm"](slots, src[gather_d], counts=counts, logits_at=where_d, twins=twins)
        self.stats.forwards += 1
        if split is not None:  # each row's Q at its draw from its first's logits
            q = q.index_select(0, moved[5])
        values = q.gather(1, mine.view(-1, 1)).double().view(len(every), steps)  # Q at each unread draw
        for p, record in enumerate(self.pending):
            record[sel, 4] = values[:, p]
        for (_, req, b), n in zip(every, counts_all):
            b.rm_read += n

    def feed_drawn(self) -> None:
        """Run between reads: every row reads the token it just drew, straight from the device (one
        forward per model; the rows, and so the sampler's inputs, stay in place)."""
        if self._slots is None:
            self._slots = [b.slot for _, b in self.rows]
        self.stats.forwards += len(self.step_names)
        if self.step_graphs is not None:  # the forwards and the next draw in one replay, where a graph applies
            # (timed as the base model's forward)
            self._next = self.paged["base"].timed(self.step_graphs.run, self.draw, self._slots, self.drawn,
                                                  *self._step_keys())
            if self._next is not None:
                self.cur = {}  # not read before the next draw, which the replay made
                return
        split = self._split_twins(self.rows)
        if split is None:
            self.cur = {name: self.paged[name](self._slots, self.drawn) for name in self.step_names}
            return
        first, pick = split  # one row of each set of twins is computed; the others get its keys, values and logits
        slots, twins = twin_args(self._slots, first, pick)
        first_d, sel = to_device_many([torch.tensor(first), torch.tensor(pick)], self.device)
        tokens = self.drawn.index_select(0, first_d)
        self.cur = {name: self.paged[name](slots, tokens, twins=twins).index_select(0, sel)
                    for name in self.step_names}

    def _split_twins(self, rows):
        """``(first, pick)`` of :meth:`ivg.twins.Twins.split` for ``rows``, about to read their last tokens, or None
        where twins are not merged or ``rows`` has none (their classes move on either way)."""
        if self.twins is None:
            return None
        first, pick = self.twins.split([b for _, b in rows])
        self.stats.twin_rows += len(rows) - len(first)
        return None if len(first) == len(rows) else (first, pick)

    # -- schedule: chunk boundaries --------------------------------------------------------------
    def prune(self) -> tuple[dict, list]:
        """Rank the candidates of every prompt at a chunk boundary (or with no unfinished candidate),
        drop the pruned and the finished rows (their blocks are freed by :meth:`free_pruned`), and plan the
        forks. Returns ``(plans, finished)``:
        per prompt at a boundary its ``[(parent, is_child)]`` plan, and the prompts that are done."""
        opts, plans, finished, to_free = self.opts, {}, [], []
        ranked = [req for req in self.active if self._ranks_now(req)]
        if self.lazy_rm:  # the ranked candidates, and those that finished now (their blocks go below)
            self.score_lazy_rm([(req, b) for req in ranked for b in req.cands]
                               + [(req, b) for req, b in self.rows if b.finished])
        # every ranked prompt's candidates scored together (an external scorer: one call per boundary)
        every_score = chunk_scores_many([(req.prompt, req.cands) for req in ranked], opts, self.stopper)
        for req, scores in zip(ranked, every_score):
            alive = [b for b in req.cands if not b.finished]
            order = rank(req.cands, scores, opts.keep)
            if not alive:
                req.result = self.decoder._result(req.prompt, [req.cands[i] for i in order],
                                                  [scores[i] for i in order], opts, self.stopper)
                finished.append(req)
                continue
            kept = [req.cands[i] for i in order[: opts.width]]
            kept_ids = {id(b) for b in kept}
            for b in req.cands:
                if not b.finished and id(b) not in kept_ids:  # pruned
                    to_free.append(b.slot)
                    b.slot = None
            plan = expand(kept, opts.successors)
            req.chunk_start = req.t
            if any(child for _, child in plan):
                plans[id(req)] = plan
                continue
            # Every kept beam has finished: they are the prompt's last candidates, ranked once more.
            req.cands = [par.child(j, slot=None) for j, (par, _) in enumerate(plan)]
            scores = chunk_scores(req.prompt, req.cands, opts, self.stopper)
            order = rank(req.cands, scores, opts.keep)
            req.result = self.decoder._result(req.prompt, [req.cands[i] for i in order], [scores[i] for i in order],
                                              opts, self.stopper)
            finished.append(req)
        for _, b in self.rows:
            if b.finished and b.slot is not None:
                to_free.append(b.slot)
                b.slot = None
        self._free_later += to_free  # freed after the next forwards are launched (free_pruned)
        self.active = [r for r in self.active if r.result is None]
        return plans, finished

    def free_pruned(self) -> None:
        """Free the KV sequences of the rows ``prune`` dropped. ``feed`` calls this after launching the
        continuing rows' forwards: on a GPU the device waits through the host's work between the read
        and that launch, and the frees (a few ms at 1,024 rows) then run beside the forwards."""
        if self._free_later:
            slots, self._free_later = self._free_later, []
            self.group.free_many(slots)

    def _ranks_now(self, req) -> bool:
        """At a chunk boundary of a search, or with no unfinished candidate left."""
        return all(b.finished for b in req.cands) or self._at_chunk_boundary(req)

    def score_lazy_rm(self, pairs) -> None:
        """Bring the lazy token RM up to date for ``(request, beam)`` pairs: each beam holding blocks feeds
        the tokens it has not read up to its second-to-last, and its explicit value becomes Q at its last
        token. One ragged forward for all of them (as a rule: ``read_prompts``); a beam already up to date is left
        as it is."""
        todo = {}
        for req, b in pairs:
            prompt = req.ids["rm"]
            if b.slot is not None and b.rm_read < len(prompt) + len(b.tokens) - 1:  # (the usual case: up to date)
                todo[id(b)] = (b, (prompt + b.tokens)[b.rm_read:-1])
        if not todo:
            return
        beams = [b for b, _ in todo.values()]
        q = self.read_prompts("rm", [b.slot for b in beams], [new for _, new in todo.values()])
        last = to_device(torch.tensor([b.tokens[-1] for b in beams]), q.device)
        values = q.gather(1, last.unsqueeze(1)).squeeze(1).double().tolist()
        self.stats.host_reads += 1
        for (b, new), v in zip(todo.values(), values):
            b.rm_read += len(new)
            b.explicit = v

    # -- run: the forwards -----------------------------------------------------------------------
    def feed(self, plans: dict) -> None:
        """One forward per model over every continuing row's new token; then each kept parent forks
        into its K children, which share its blocks and take its logits. When nothing forks, finishes or
        is pruned, every row reads the token it drew as between reads (``feed_drawn``: the rows, their
        keys and slots stay; on a GPU the step may replay whole)."""
        feed = self.continuing(plans)
        if feed and not plans and len(feed) == len(self.rows):
            self.free_pruned()
            self.feed_drawn()
            return
        self._rows_changed()
        if not feed:
            self.free_pruned()
            self.rows, self.cur = [], {}
            return
        out, twin_of = self._forward_last(feed)
        self.free_pruned()  # beside the forwards just launched
        self.rows, pick = self.fork(feed, plans)
        if twin_of is not None:  # a twin's logits are in the row of its set's first
            pick = [twin_of[i] for i in pick]
        sel = to_device(torch.tensor(pick), self.device)
        self.cur = {name: out[name].index_select(0, sel) for name in self.step_names}

    def _forward_last(self, rows) -> tuple:
        """One forward per model over each row's last token, computed for one row of each set of twins (the
        others get its keys and values); ``(logits per model, None)``, or with twins ``(logits of the rows
        computed, for each of rows its place there)``. Should a pool run short before the pruned rows' blocks are
        freed, the models that read go back, the blocks are freed and every model reads again (the decoder sizes
        its pools so that this does not happen)."""
        slots, twins, pick = [b.slot for _, b in rows], None, None
        split = self._split_twins(rows)
        if split is not None:
            (slots, twins), pick = twin_args(slots, *split), split[1]
            rows = [rows[i] for i in split[0]]
        tokens = [[b.tokens[-1]] for _, b in rows]
        out = {}
        try:
            for name in self.step_names:
                out[name] = self.paged[name](slots, tokens, twins=twins)
        except KVCacheExhausted:
            if not self._free_later:
                raise
            every = slots + (twins[0] if twins is not None else [])
            for name in out:
                self.paged[name].cache.truncate_appended(every, 1)
            self.free_pruned()
            out = {name: self.paged[name](slots, tokens, twins=twins) for name in self.step_names}
        self.stats.forwards += len(self.step_names)
        return out, pick

    def continuing(self, plans: dict) -> list:
        """The rows that go on: unfinished, unpruned, and at a chunk boundary only the kept parents."""
        parents = {id(par) for plan in plans.values() for par, child in plan if child}
        return [(req, b) for req, b in self.rows
                if b.slot is not None and (id(req) not in plans or id(b) in parents)]

    def fork(self, feed: list, plans: dict) -> tuple[list, list]:
        """Each kept parent of ``feed`` (continuing rows) forks into its K children, which share its
        blocks; returns the new rows and, per new row, the index in ``feed`` of the row it continues."""
        by_req: dict = {}  # id(request) -> (request, its fed rows with their index in feed), in feed order
        for i, (req, b) in enumerate(feed):
            entry = by_req.get(id(req))
            if entry is None:
                entry = by_req[id(req)] = (req, [])
            entry[1].append((b, i))
        # each parent once, in the order the requests first appear in feed and then in their plans
        parents = {}
        for req, _ in by_req.values():
            for b, child in plans.get(id(req), ()):
                if child:
                    parents[id(b)] = b
        # each parent's sequence becomes its first child's (no parent is left to free)
        slots = self.group.fork_many([b.slot for b in parents.values()], self.opts.successors, replace=True)
        forks = {key: iter(kids) for key, kids in zip(parents, slots)}  # each parent's children's slots, in order
        rows, pick = [], []
        for req, fed in by_req.values():
            plan = plans.get(id(req))
            if plan is None:
                rows += [(req, b) for b, _ in fed]
                pick += [i for _, i in fed]
                continue
            index = {id(b): i for b, i in fed}
            new = []
            for j, (par, child) in enumerate(plan):
                nb = par.child(j, slot=next(forks[id(par)]) if child else None)
                if child:
                    rows.append((req, nb))
                    pick.append(index[id(par)])
                new.append(nb)
            req.cands = new
        return rows, pick

    def release(self) -> None:
        """Free every sequence still held (after an error) and the models' paged state."""
        self._free_later = []  # (still live: freed below with the rest)
        stats = self.stats
        for pm in self.paged.values():
            pm.release()
        for name, cache in self.group.caches.items():
            stats.bytes_copied[name] = stats.bytes_copied.get(name, 0) + cache.pool.bytes_copied
        self.group.free_all()  # (and the models' sequence ids agree again, should an error have split them)
