"""A speculative round's draft forwards, planned at once: one-token forwards of the same rows of one
:class:`ivg.PagedModel`, step after step, each step's token fed from the one before.

:meth:`PagedModel.forward` plans every forward on its own: it appends a slot per row to the cache, looks the
block tables up, and builds the positions, lengths and query offsets of the batch. A round's draft model
runs up to ``speculate + 1`` one-token forwards of the same rows in a row, whose slots and tables are known
before the first: :class:`PlannedSteps` appends every step's slot in one call, looks the tables up once, and
makes each step's batch beforehand, exactly as ``forward`` would make it for that step (the same block table,
cut to the blocks the step's lengths hold with zeros past each row's own, the same lengths, positions and
beam groups), so each step computes what ``forward`` computes, bit for bit
(``tests/test_planned_steps.py``). On the CPU a one-token forward of the demo's 2-layer guide took about
0.4 ms, of which ``forward``'s planning about 0.1.

Between steps the cache holds every step's slots: a step attends only to its own lengths, and a slot is
written by its own step before any later step reads it. An error while planning leaves the cache as it was;
after an error in a step the caller cuts it back (:meth:`ivg.speculative_loop.SpeculativeLoop.round` cuts every
model back to the round's start). Where the forwards replay CUDA graphs, :mod:`ivg.round_graphs` plans a
round's steps in its static buffers instead.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ivg_kernels.attention import attention_backend
from ivg_kernels._transfer import to_device_many

from .paged_attention import PagedBatch
from .paged_model import PagedModel


PLAN = True  # False: every draft forward through PagedModel.forward (the tests compare the two)


def plans_steps(pm: PagedModel) -> bool:
    """Whether :class:`PlannedSteps` takes ``pm``'s draft forwards: eager forwards (no CUDA graphs, which plan
    their own), and RoPE the same for every row (no longrope rows on both sides of the switch)."""
    return PLAN and pm.graphs is None and pm.row_rope is None


class PlannedSteps:
    """Row ``i`` of ``seq_ids`` reads ``counts[i]`` tokens, one per step: step ``k`` runs the rows with
    ``counts[i] > k`` (:meth:`rows`). Appends every step's slot on construction (an error there leaves the cache
    as it was; after a step's error the caller cuts it back)."""

    __slots__ = ("pm", "batches", "done")

    def __init__(self, pm: PagedModel, seq_ids: Sequence[int], counts: Sequence[int]):
        seq_ids, counts = list(seq_ids), [int(c) for c in counts]
        if not seq_ids:
            raise ValueError("seq_ids: expected at least one sequence")
        if len(counts) != len(seq_ids) or min(counts) < 1:
            raise ValueError(f"counts: expected {len(seq_ids)} counts >= 1, got {counts}")
        self.pm, self.done = pm, 0
        slots = pm.cache.append(seq_ids, counts)  # every step's, row by row
        try:
            self.batches = self._plan(seq_ids, counts, slots)
        except BaseException:  # (nothing appended stays behind)
            pm.cache.truncate_appended(seq_ids, counts)
            raise

    def _plan(self, seq_ids, counts, slots) -> list:
        """Per step: ``(its rows, or None for every row; the positions it reads at; its PagedBatch)``."""
        pm = self.pm
        table, lens = pm.blocks.tables(seq_ids)  # the lengths after the last step
        pm.check_positions(seq_ids, lens)
        n = np.asarray(counts, dtype=np.int64)
        first = np.cumsum(n) - n  # each row's first slot in ``slots``
        before = lens.numpy().astype(np.int64) - n  # each row's length before the first step
        live = n > np.arange(int(n.max()))[:, None]  # [steps, rows]: who runs each step
        step, row = np.nonzero(live)  # (step, row) of every row's every step, step by step
        per = live.sum(axis=1).tolist()  # rows per step
        step_lens = before[row] + step + 1  # each row's length at each step
        # each step's table as forward would look it up: as wide as its rows' most blocks, zero past each row's own
        held = -(-step_lens // pm.blocks.block_size)
        table = table.numpy()
        tables = np.where(np.arange(table.shape[1]) < held[:, None], table[row], 0).astype(np.int32)
        lens_all = torch.from_numpy(step_lens.astype(np.int32))
        tables_h = torch.from_numpy(tables)
        lens_d, pos_d, cu_d, where_d, tables_d = to_device_many(  # (one copy to a GPU for every step)
            [lens_all, torch.from_numpy(step_lens - 1), torch.arange(max(per) + 1, dtype=torch.int32),
             torch.from_numpy(first[row] + step), tables_h], pm.device)
        # (split_with_sizes: Tensor.split's Python wrapper costs more than the split)
        slot_steps = slots.index_select(0, where_d).split_with_sizes(per)
        lens_h, lens_steps, pos_steps = (x.split_with_sizes(per) for x in (lens_all, lens_d, pos_d))
        backend = attention_backend(pm.backend, pm.cache.pool.kv)
        batches, at = [], 0
        for k, m in enumerate(per):
            width = int(held[at: at + m].max())
            # (a row alone shares no block with another: no groups, as forward finds)
            groups = (pm._group_lists(tables_h[at: at + m, :width], lens_h[k]) if pm.shared_prefix and m > 1
                      else None)
            batch = PagedBatch(cache=pm.cache, slot_mapping=slot_steps[k], block_table=tables_d[at: at + m, :width],
                               seq_lens=lens_steps[k], cu_seqlens_q=cu_d[:m + 1], max_seqlen_q=1, is_decode=True,
                               backend=backend, groups=None if groups is None else pm._groups_on_device(groups))
            batches.append((None if m == len(n) else row[at: at + m].tolist(), pos_steps[k], batch))
            at += m
        return batches

    def rows(self, k: int) -> list | None:
        """The rows step ``k`` runs, as places in ``seq_ids`` (None: every row)."""
        return self.batches[k][0]

    @torch.inference_mode()
    def __call__(self, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Step ``k``: its rows read ``ids`` (int64 ``[rows]`` on the model's device); their logits ``[rows, V]``.
        Steps run in order, each once (a step reads the keys and values the steps before it wrote)."""
        if k != self.done or k >= len(self.batches):
            raise ValueError(f"k={k}: expected step {self.done} of {len(self.batches)} (steps run in order, each once)")
        _, pos, batch = self.batches[k]
        if ids.shape != pos.shape:
            raise ValueError(f"ids: expected {pos.shape[0]} tokens (the rows of step {k}), got {list(ids.shape)}")
        self.done += 1
        return self.pm.timed(self.pm._run, ids, pos, None, batch)
