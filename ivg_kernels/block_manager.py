"""Paged KV-cache metadata: which physical block holds which positions of which sequence.

Pure metadata on the CPU, no KV tensors: a KV owner (``ivg_kernels.kv_pool``) runs the copies and
writes the slots this module hands out. Forking shares every block by reference count, so a fork
costs O(blocks) integer work in numpy and no KV traffic; the only KV copy ever asked for is
copy-on-write of a shared, partly filled last block, at most one block per child.

NOTE (invariants, checked by ``check_invariants`` and the hypothesis test):
  * ``ref_count[b]`` equals the number of live sequences whose table holds ``b``;
  * a block is on the free list iff its ref count is 0; free + used == num_blocks;
  * a sequence of length L holds exactly ceil(L / block_size) blocks, none twice;
  * every public method either succeeds or raises before changing any state.
"""
from __future__ import annotations

import numbers
import operator
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch


# Sequences per call from which a batch operation runs as array work; below it, a Python loop over the
# sequences is faster. Appends (and the plans behind them) loop over Python scalars: in a loop of appends
# alone arrays won from about 16 sequences (an append and truncate of 16: 39 us as a loop, 37 as arrays;
# of 32: 64 and 40), but inside a decoder, between forwards, numpy's calls cost several times that: an
# append of one token per row took 0.12-0.14 ms as a loop and 0.20-0.21 ms as arrays at 16 rows (IVG, one
# prompt), 0.18-0.20 and 0.25-0.27 ms at 32, 0.30-0.32 and 0.30-0.33 ms at 64 (2-core CPU, one thread,
# runs taking turns). Releasing blocks loops with several numpy calls per sequence, so arrays win sooner:
# freeing 4 sequences took 59-60 us as a loop and 90-100 us as arrays, 8: 102-112 and 89-94, 16: 199-217
# and 103-118. Both give the same results (tested).
ARRAY_FROM = 64
RELEASE_ARRAY_FROM = 8


class KVCacheExhausted(RuntimeError):
    """Not enough free blocks; the block manager's state is unchanged."""


MAX_COUNT = 2 ** 31 - 1  # children per parent in one fork, tokens per sequence in one append (memory runs out first)


def as_list(name: str, values, expected: str) -> list:
    """``list(values)``, or a ValueError naming the argument where ``values`` cannot be iterated (an int, None, a
    0-d tensor)."""
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{name}={values!r}: expected {expected}") from None


def _same_list(a: list, b: list) -> bool:
    """``a == b`` for id lists, False where an element's ``==`` has no single truth value (a tensor of several ids
    among them; such a list is looked up, and named, the slow way)."""
    try:
        return a == b
    except (RuntimeError, ValueError, TypeError):
        return False


def int_index(x):
    """``x`` as an int (an int, a NumPy integer, an integer tensor's element), or None (a bool, a float, anything
    else): a sequence id, a block id or a layer index given in any integer type."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _positive_int(name, value, most=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or (most and value > most):
        raise ValueError(f"{name}={value!r}: expected a positive int" + (f" up to {most}" if most else ""))
    return int(value)


def prefix_groups(tables: np.ndarray, lens: np.ndarray, block_size: int) -> tuple[list[int], list[int]]:
    """:meth:`BlockManager.shared_prefix_groups` from the rows' block tables ``[N, W]`` (0-padded) and
    lengths ``[N]`` (a row of length n holds ``ceil(n / block_size)`` blocks)."""
    n = len(lens)
    if n == 0:
        return [0], []
    lens = lens.astype(np.int64)
    nb = -(-lens // block_size)
    first = np.where(nb > 0, tables[:, 0] if tables.shape[1] else 0, -1 - np.arange(n))  # empty: shares nothing
    starts = np.flatnonzero(np.concatenate([[True], first[1:] != first[:-1]]))
    head = starts[np.cumsum(np.isin(np.arange(n), starts)) - 1]  # each row's group's first row
    same = (tables == tables[head]) & (np.arange(tables.shape[1]) < np.minimum(nb, nb[head])[:, None])
    common = np.cumprod(same, axis=1).sum(axis=1)  # leading blocks each row shares with its head
    tokens = np.minimum(np.minimum.reduceat(common, starts) * block_size, np.minimum.reduceat(lens, starts))
    return starts.tolist() + [n], tokens.tolist()


class BlockManager:
    """Allocate, fork, grow and free paged sequences.

    Parameters
    ----------
    num_blocks : int
        Physical blocks in the pool.
    block_size : int
        Token slots per block. Slot ``s`` is position ``s % block_size`` of block ``s // block_size``.

    A batch operation on ``ARRAY_FROM`` or more sequences (``RELEASE_ARRAY_FROM`` for releasing blocks) is
    array work over them, not Python work per sequence: a decoder appends to, forks and frees hundreds of
    beams per step. Each live sequence owns a row of ``_tab`` (its block ids, then zeros), ``_nb`` and
    ``_len``; a freed sequence's row is reused. The results are those of handling the sequences one after
    another in the order given (which blocks they get, which copies they queue, the order of the free list).
    """

    def __init__(self, num_blocks: int, block_size: int):
        self._num_blocks = _positive_int("num_blocks", num_blocks, MAX_COUNT)  # (block ids are int32)
        self._block_size = _positive_int("block_size", block_size, MAX_COUNT)
        self._ref = np.zeros(self._num_blocks, dtype=np.int32)
        self._free: list[int] = list(range(self._num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._row: dict[int, int] = {}  # live sequence id -> its row, in creation order
        self._spare_rows: list[int] = []  # rows of no live sequence; pop() hands out low rows first
        self._tab = np.zeros((0, 4), dtype=np.int32)  # [rows, block capacity]: block ids, then zeros
        self._nb = np.zeros(0, dtype=np.int64)  # blocks held, per row
        self._len = np.zeros(0, dtype=np.int64)  # tokens held, per row
        self._next_id = 0
        self._copies: list[tuple[int, int]] = []
        self.blocks_copied = 0  # copy-on-write copies handed out, ever
        self._memo = None  # (ids, rows) of the last _rows look-up; dropped when a sequence is freed

    # ------------------------------------------------------------------ sizes
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free)

    @property
    def live_sequences(self) -> list[int]:
        return list(self._row)

    @property
    def next_id(self) -> int:
        """The id the next new sequence gets (ids are handed out in order and never reused)."""
        return self._next_id

    def skip_ids(self, next_id: int) -> None:
        """Hand out ids from ``next_id`` on (an int no lower than :attr:`next_id`): the managers of models
        whose sequences are named alike realign after an operation that changed some of them and failed
        before the rest (``KVCacheGroup.free_all``)."""
        if isinstance(next_id, bool) or not isinstance(next_id, numbers.Integral) or next_id < self._next_id:
            raise ValueError(f"next_id={next_id!r}: expected an int >= {self._next_id}, the next id now")
        self._next_id = int(next_id)

    def seq_len(self, seq_id: int) -> int:
        return self._len.item(self._row[self._check_seq(seq_id)])

    # ------------------------------------------------------------- lifecycle
    def new_sequence(self) -> int:
        """A new empty sequence (no blocks until the first append)."""
        return self.new_sequences(1)[0]

    def new_sequences(self, n: int) -> list[int]:
        n = _positive_int("n", n)
        rows = self._take_rows(n)
        self._nb[rows] = 0
        self._len[rows] = 0
        return self._name(rows)

    def fork(self, seq_id: int, n: int) -> list[int]:
        """``n`` children sharing every block of ``seq_id``; the parent stays alive until freed."""
        return self.fork_many([seq_id], n)[0]

    def fork_many(self, seq_ids: Sequence[int], n: Union[int, Sequence[int]], *,
                  replace: bool = False) -> list[list[int]]:
        """Fork each parent into ``n`` (or ``n[i]``) children in one call; returns the children per parent.

        ``replace=True``: the parents are replaced by their children, as this call and then ``free_many``
        of the parents would (the same blocks, reference counts and free list) with less work: a parent's
        first child keeps its sequence, so its id is the first of its children, and a parent forked into
        no child is freed (a beam search's chunk boundary)."""
        ids, rows = self._rows(seq_ids)
        if isinstance(n, numbers.Integral) and not isinstance(n, bool):  # one count for every parent: checked once
            if not 0 <= n <= MAX_COUNT:
                raise ValueError(f"n={n!r}: expected counts from 0 to {MAX_COUNT}")
            counts = [int(n)] * len(rows)
        else:
            counts = as_list("n", n, "an int or one count per parent")
            if len(counts) != len(rows):
                raise ValueError(f"n={n!r}: expected an int or one count per parent ({len(rows)})")
            for c in counts:
                if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= MAX_COUNT:
                    raise ValueError(f"n={n!r}: expected counts from 0 to {MAX_COUNT}")
        if replace:
            _no_repeats(ids)
        elif not any(counts):
            return [[] for _ in counts]
        cnt = np.array(counts, dtype=np.int64)
        more = np.maximum(cnt - 1, 0) if replace else cnt  # new sequences per parent
        nb = self._nb[rows]
        if more.any():
            held = np.arange(self._tab.shape[1]) < nb[:, None]
            blocks = self._tab[rows][held]
            if blocks.size:  # each new child holds its parent's blocks (siblings' parents share some)
                ub, added, _ = _block_sums(blocks, np.repeat(more, nb))
                self._ref[ub] += added.astype(self._ref.dtype)
        kids = self._take_rows(int(more.sum()))
        src = np.repeat(rows, more)
        self._tab[kids] = self._tab[src]
        self._nb[kids] = self._nb[src]
        self._len[kids] = self._len[src]
        new = self._name(kids)
        ends = np.cumsum(more).tolist()
        if not replace:
            return [new[e - c: e] for c, e in zip(counts, ends)]
        gone = np.flatnonzero(cnt == 0)
        if gone.size:  # parents with no child: freed
            self._drop([ids[i] for i in gone.tolist()], rows[gone])
        return [[s] + new[e - m: e] if c else [] for s, c, m, e in zip(ids, counts, more.tolist(), ends)]

    def free(self, seq_id: int) -> None:
        self.free_many([seq_id])

    def free_many(self, seq_ids: Iterable[int]) -> None:
        ids, rows = self._rows(seq_ids)
        _no_repeats(ids)
        self._drop(ids, rows)

    def _drop(self, ids: list, rows: np.ndarray) -> None:
        """End live sequences ``ids`` (rows ``rows``): their blocks released in the order given, their rows
        spare, the remembered look-up forgotten."""
        self._release(rows, np.zeros(len(rows), dtype=np.int64))
        self._memo = None
        for s in ids:
            del self._row[s]
        self._spare_rows.extend(rows[::-1].tolist())

    # ----------------------------------------------------------------- growth
    def blocks_needed(self, seq_ids: Sequence[int], num_tokens: Union[int, Sequence[int]]) -> int:
        """Free blocks that ``append(seq_ids, num_tokens)`` would take (copies included); changes nothing."""
        return self._plan(seq_ids, num_tokens)[-1]

    def _plan(self, seq_ids, num_tokens):
        """``(rows, counts, plan, needed)``: the sequences' rows and new tokens (one int for all), the plan
        of :meth:`_plan_each` or :meth:`_plan_arrays`, and the free blocks it takes."""
        ids, rows = self._rows(seq_ids)
        _no_repeats(ids)
        if isinstance(num_tokens, numbers.Integral) and not isinstance(num_tokens, bool):
            cnt = int(num_tokens)
            bad = cnt < 0
        else:
            values = None if isinstance(num_tokens, (bool, str, numbers.Number)) else as_list("num_tokens", num_tokens,
                                                                                                "an int or a sequence of ints")
            if values is None or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c > MAX_COUNT
                                     for c in values):
                raise ValueError(f"num_tokens={num_tokens!r}: expected an int or a sequence of ints up to {MAX_COUNT}")
            counts = [int(c) for c in values]
            if len(counts) != len(rows):
                raise ValueError(f"num_tokens: expected an int or {len(rows)} counts, got {len(counts)}")
            if counts and counts.count(counts[0]) == len(counts):  # one count for all: as if given as an int
                cnt = counts[0]
                bad = cnt < 0
            else:
                cnt = np.array(counts, dtype=np.int64)
                bad = cnt.size and cnt.min() < 0
        if bad:
            raise ValueError(f"num_tokens={num_tokens!r}: expected counts >= 0")
        plan, needed = (self._plan_each if len(rows) < ARRAY_FROM else self._plan_arrays)(rows, cnt)
        return rows, cnt, plan, needed

    def _plan_each(self, rows, cnt):
        """Sequence by sequence: ``[(row, count, copies, grow, length, blocks)]`` and the blocks taken."""
        bs, plan, needed, released = self._block_size, [], 0, {}
        counts = [cnt] * len(rows) if isinstance(cnt, int) else cnt.tolist()
        for r, c in zip(rows.tolist(), counts):
            length, nb = self._len.item(r), self._nb.item(r)
            cow = False
            if c > 0 and length % bs != 0:
                last = self._tab.item(r, nb - 1)
                # Earlier sequences in this call may already have copied away from the same block.
                cow = self._ref.item(last) - released.get(last, 0) > 1
                if cow:
                    released[last] = released.get(last, 0) + 1
            grow = -(-(length + c) // bs) - nb
            plan.append((r, c, cow, grow, length, nb))
            needed += grow + cow
        return plan, needed

    def _plan_arrays(self, rows, cnt):
        """All sequences at once: ``(cow, grow, length, nb, start)`` arrays (``cow`` None: no sequence copies;
        ``start``: each sequence's first block among those the append takes)."""
        bs = self._block_size
        length, nb = self._len[rows], self._nb[rows]
        grow = (length + cnt + (bs - 1)) // bs - nb
        part = np.flatnonzero((length % bs != 0) & (cnt > 0))  # writers into a partly filled last block
        cow = None
        if part.size:
            last = self._tab[rows[part], nb[part] - 1]
            shared = self._ref[last] > 1
            if shared.any():
                part, last = part[shared], last[shared]
                # Of r holders of a block, the first r - 1 that write to it (in call order) copy it away
                # and the last keeps it: a sequence's rank among this call's writers of its block decides.
                order = np.argsort(last, kind="stable")
                first = np.flatnonzero(np.r_[True, last[order][1:] != last[order][:-1]])
                rank = np.empty(part.size, dtype=np.int64)
                rank[order] = np.arange(part.size) - np.repeat(first, np.diff(np.r_[first, part.size]))
                cow = np.zeros(len(rows), dtype=bool)
                cow[part] = rank < self._ref[last] - 1
        pops = grow if cow is None else grow + cow
        return (cow, grow, length, nb, np.cumsum(pops) - pops), int(pops.sum())

    def append(self, seq_ids: Sequence[int], num_tokens: Union[int, Sequence[int]], *, copy=None) -> torch.Tensor:
        """Reserve slots for new tokens; returns int64 ``slot_mapping`` (all of seq 0's, then seq 1's, ...).

        A shared, partly filled last block is first replaced by a fresh copy: the ``(src, dst)`` block
        copies go to ``copy`` (a function, called before anything changes: if it raises, nothing has) or
        are queued for :meth:`take_copies`. Raises :class:`KVCacheExhausted` with nothing changed when the
        pool is short.
        """
        rows, cnt, plan, needed = self._plan(seq_ids, num_tokens)
        if needed > len(self._free):
            raise KVCacheExhausted(
                f"KV cache exhausted: {needed} blocks needed, {len(self._free)} free of {self._num_blocks} "
                f"(block_size {self._block_size}); free finished sequences or allocate more blocks"
            )
        each = isinstance(plan, list)
        # The blocks in the order pop() would hand them out: each sequence its copy's, then its new ones.
        taken = self._free[len(self._free) - needed:][::-1] if needed else []
        if each:
            copies = pairs = self._copies_each(plan, taken)
        else:
            taken = np.array(taken, dtype=np.int32)
            copies = self._copies_arrays(rows, *plan, taken)  # (src, dst) arrays, once for the copy and the tables
            pairs = [] if copies is None else list(zip(copies[0].tolist(), copies[1].tolist()))
        if pairs and copy is not None:
            copy(pairs)
        if needed:
            del self._free[len(self._free) - needed:]
        if copy is None:
            self._copies += pairs
        self.blocks_copied += len(pairs)
        if each:
            return self._append_each(plan, taken, copies)
        return self._append_arrays(rows, cnt, *plan, taken, copies)

    def _copies_each(self, plan, taken) -> list:
        """The ``(src, dst)`` copy-on-write copies of a plan, in order."""
        out, i = [], 0
        for r, _, cow, grow, _, nb in plan:
            if cow:
                out.append((self._tab.item(r, nb - 1), taken[i]))
            i += cow + grow
        return out

    def _copies_arrays(self, rows, cow, grow, length, nb, start, taken):
        """The copy-on-write copies as ``(src, dst)`` arrays (None when there are none)."""
        if cow is None:
            return None
        c = np.flatnonzero(cow)
        return self._tab[rows[c], nb[c] - 1], taken[start[c]]

    def _append_each(self, plan, taken, copies) -> torch.Tensor:
        bs, slots, i, pairs = self._block_size, [], 0, iter(copies)
        for r, c, cow, grow, length, nb in plan:
            if cow:
                src, dst = next(pairs)
                i += 1
                self._ref[src] -= 1
                self._ref[dst] = 1
                self._tab[r, nb - 1] = dst
            if grow:
                self._widen(nb + grow)
                new = taken[i: i + grow]
                i += grow
                self._tab[r, nb: nb + grow] = new
                self._ref[new] = 1
                self._nb[r] = nb + grow
            table = self._tab[r]
            slots += [table.item(p // bs) * bs + p % bs for p in range(length, length + c)]
            self._len[r] = length + c
        return torch.tensor(slots, dtype=torch.int64)

    def _append_arrays(self, rows, cnt, cow, grow, length, nb, start, taken, copies) -> torch.Tensor:
        bs = self._block_size
        if cow is not None:
            c = np.flatnonzero(cow)
            src, dst = copies
            np.subtract.at(self._ref, src, 1)
            self._ref[dst] = 1
            self._tab[rows[c], nb[c] - 1] = dst
            start = start + cow
        g = np.flatnonzero(grow)
        if g.size:
            self._widen(int((nb[g] + grow[g]).max()))
            k = _ranges(grow[g])
            new = taken[np.repeat(start[g], grow[g]) + k]
            self._tab[np.repeat(rows[g], grow[g]), np.repeat(nb[g], grow[g]) + k] = new
            self._ref[new] = 1
            self._nb[rows[g]] = nb[g] + grow[g]
        if isinstance(cnt, int) and cnt == 1:  # a decode step
            block, at = np.divmod(length, bs)
            slots = self._tab[rows, block].astype(np.int64) * bs + at
        else:
            counts = np.full(len(rows), cnt) if isinstance(cnt, int) else cnt
            p = np.repeat(length, counts) + _ranges(counts)
            slots = self._tab[np.repeat(rows, counts), p // bs].astype(np.int64) * bs + p % bs
        self._len[rows] = length + cnt
        return torch.from_numpy(slots)

    def truncate_many(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        """Shorten sequences to ``lengths`` (undoing appends), releasing blocks no longer needed."""
        ids, rows = self._rows(seq_ids)
        _no_repeats(ids)
        lengths = as_list("lengths", lengths, "one length per sequence")
        if len(lengths) != len(ids):
            raise ValueError(f"lengths: expected {len(ids)} lengths, got {len(lengths)}")
        whole = set(map(type, lengths)) <= {int}
        n = np.array(lengths if whole else [0] * len(ids), dtype=np.int64)
        if not whole or ((n < 0) | (n > self._len[rows])).any():
            for s, m, row in zip(ids, lengths, rows.tolist()):  # name the first bad length
                if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= m <= self._len[row]:
                    raise ValueError(f"lengths: {m!r} for sequence {s}: expected 0 <= length <= {self._len[row]}")
            n = np.array([int(m) for m in lengths], dtype=np.int64)  # numpy integers: valid
        keep = -(-n // self._block_size)
        self._release(rows, keep)
        self._nb[rows] = keep
        self._len[rows] = n

    def take_copies(self) -> list[tuple[int, int]]:
        """The ``(src_block, dst_block)`` copies queued since the last call; run them before writing slots."""
        out, self._copies = self._copies, []
        return out

    # ------------------------------------------------------------------ views
    def block_table(self, seq_ids: Sequence[int], *, width: int | None = None) -> torch.Tensor:
        """int32 ``[len(seq_ids), max_blocks]`` (``width`` columns if given), padded with 0."""
        if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral)):
            raise ValueError(f"width={width!r}: expected None or an int")
        return self._table(self._rows(seq_ids)[1], width)

    def tables(self, seq_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_table(seq_ids), seq_lens(seq_ids))``, the sequences looked up once (a forward needs both)."""
        rows = self._rows(seq_ids)[1]
        return self._table(rows, None), torch.from_numpy(self._len[rows].astype(np.int32))

    def _table(self, rows: np.ndarray, width: int | None) -> torch.Tensor:
        nb = self._nb[rows]
        most = max(nb.tolist(), default=0)
        width = most if width is None else width
        if width < most:
            raise ValueError(f"width={width}: expected at least {most}, the longest table")
        if width <= self._tab.shape[1]:
            return torch.from_numpy(self._tab[rows, :width])  # entries past a sequence's blocks are 0
        out = np.zeros((len(rows), width), dtype=np.int32)
        out[:, : self._tab.shape[1]] = self._tab[rows]
        return torch.from_numpy(out)

    def shared_prefix_groups(self, seq_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """The structure ``shared_prefix_decode_attention`` takes for rows ``seq_ids``: ``(group_starts,
        shared_lens)``. A group is a run of consecutive sequences whose first block is the same physical
        block (beams forked from one prompt); ``shared_lens[g]`` is how many leading tokens every member
        holds in the same blocks (whole shared blocks, the last possibly partly filled, cut at the
        shortest member). A sequence sharing nothing with its neighbours is a group of its own."""
        table, lens = self.tables(seq_ids)
        return prefix_groups(table.numpy(), lens.numpy(), self._block_size)

    def seq_lens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 ``[len(seq_ids)]``."""
        return torch.from_numpy(self._len[self._rows(seq_ids)[1]].astype(np.int32))

    def blocks_of(self, seq_id: int) -> list[int]:
        row = self._row[self._check_seq(seq_id)]
        return self._tab[row, : self._nb[row]].tolist()

    def ref_count(self, block: int) -> int:
        """How many sequences hold physical block ``block`` (0 for a free one)."""
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or not 0 <= block < self._num_blocks:
            raise ValueError(f"block={block!r}: expected a block id from 0 to {self._num_blocks - 1}")
        return int(self._ref[block])

    # ----------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests and debugging)."""
        counts = np.zeros(self._num_blocks, dtype=np.int64)
        rows = list(self._row.values())
        assert len(set(rows)) == len(rows) and not set(rows) & set(self._spare_rows), "a row is used twice"
        for s, row in self._row.items():
            nb, length = int(self._nb[row]), int(self._len[row])
            blocks = self._tab[row, :nb]
            assert nb == -(-length // self._block_size), f"seq {s}: {nb} blocks for length {length}"
            assert len(set(blocks.tolist())) == nb, f"seq {s}: a block appears twice"
            assert not self._tab[row, nb:].any(), f"seq {s}: its table holds ids past its {nb} blocks"
            counts[blocks] += 1
        assert np.array_equal(counts, self._ref), "ref counts differ from the tables"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert free == set(np.flatnonzero(self._ref == 0).tolist()), "free list differs from ref counts == 0"
        assert len(self._free) + int((self._ref > 0).sum()) == self._num_blocks

    def _check_seq(self, seq_id, name: str = "seq_id") -> int:
        if type(seq_id) is int and seq_id in self._row:  # the fast path of the decode loop
            return seq_id
        sid = int_index(seq_id)  # any integer: a NumPy one, or a torch tensor's element (no dict key for its value)
        if sid is None or sid not in self._row:
            raise ValueError(f"{name}: {seq_id!r} is not a live sequence")
        return sid

    # ------------------------------------------------------------------ rows
    def _rows(self, seq_ids, name: str = "seq_ids") -> tuple[list[int], np.ndarray]:
        """The ids (as ints) and rows of live sequences ``seq_ids``; a ValueError naming the first that is not.

        The last list looked up is remembered until a sequence is freed: a decode loop passes the same rows
        step after step (append, then tables, in every model), and comparing two lists costs about a
        fiftieth of looking 1,024 ids up."""
        ids = seq_ids if type(seq_ids) is list else as_list(name, seq_ids, "a sequence of sequence ids")
        memo = self._memo
        if memo is not None and _same_list(memo[0], ids) and set(map(type, ids)) <= _INT:  # (True == 1: types checked)
            return memo[0], memo[1]
        row = self._row
        try:
            rows = [row[s] for s in ids]
        except (KeyError, TypeError):
            rows = None
        if rows is None or not set(map(type, ids)) <= _INT:  # bools, numpy integers, ...
            ids = [self._check_seq(s, name) for s in ids]
            rows = [row[s] for s in ids]
        found = np.array(rows, dtype=np.intp)
        found.flags.writeable = False  # shared with the memo
        self._memo = (list(ids), found)  # a copy: the caller may change its list
        return ids, found

    def _take_rows(self, n: int) -> np.ndarray:
        """``n`` rows of no live sequence (tables all zeros), growing the arrays when short."""
        short = n - len(self._spare_rows)
        if short > 0:
            old = len(self._nb)
            cap = max(2 * old, old + short, 16)
            tab = np.zeros((cap, self._tab.shape[1]), dtype=np.int32)
            tab[:old] = self._tab
            self._tab = tab
            self._nb = np.concatenate([self._nb, np.zeros(cap - old, dtype=np.int64)])
            self._len = np.concatenate([self._len, np.zeros(cap - old, dtype=np.int64)])
            self._spare_rows.extend(range(cap - 1, old - 1, -1))
        if n == 0:
            return np.zeros(0, dtype=np.intp)
        rows = self._spare_rows[len(self._spare_rows) - n:][::-1]
        del self._spare_rows[len(self._spare_rows) - n:]
        return np.array(rows, dtype=np.intp)

    def _name(self, rows: np.ndarray) -> list[int]:
        """New sequence ids for ``rows``, registered in order."""
        ids = list(range(self._next_id, self._next_id + len(rows)))
        self._next_id += len(rows)
        self._row.update(zip(ids, rows.tolist()))
        return ids

    def _widen(self, cols: int) -> None:
        """Room for ``cols`` blocks per row."""
        w = self._tab.shape[1]
        if cols > w:
            tab = np.zeros((self._tab.shape[0], max(2 * w, cols)), dtype=np.int32)
            tab[:, :w] = self._tab
            self._tab = tab

    def _release(self, rows: np.ndarray, keep: np.ndarray) -> None:
        """Drop the blocks of ``rows`` past their first ``keep`` ones: ref counts down, and the blocks no
        sequence holds any more onto the free list, in the order of dropping row by row (each row's
        from last to first), so that the next ones handed out are the ones dropped last."""
        if len(rows) < RELEASE_ARRAY_FROM:
            for r, k in zip(rows.tolist(), keep.tolist()):
                nb = self._nb.item(r)
                if k < nb:
                    dropped = self._tab[r, k:nb].copy()
                    self._tab[r, k:nb] = 0
                    self._ref[dropped] -= 1
                    self._free.extend(dropped[self._ref[dropped] == 0][::-1].tolist())
            return
        nb = self._nb[rows]
        if (keep >= nb).all():
            return
        w = self._tab.shape[1]
        col = np.arange(w - 1, -1, -1)  # each row's blocks from last to first
        at, back = np.nonzero((col >= keep[:, None]) & (col < nb[:, None]))
        at, col = rows[at], col[back]
        blocks = self._tab[at, col]
        self._tab[at, col] = 0
        ub, dropped, last = _block_sums(blocks)
        self._ref[ub] -= dropped.astype(self._ref.dtype)
        gone = self._ref[ub] == 0
        if gone.any():  # a block shared by several dropping rows is released by the last of them
            self._free.extend(blocks[np.sort(last[gone])].tolist())


_INT = {int}


def _block_sums(blocks: np.ndarray, weights: Optional[np.ndarray] = None):
    """``(ids, sums, last)`` for a non-empty array of block ids: each distinct id (ascending), the sum of its
    ``weights`` (default: how often it occurs) and the position of its last occurrence in ``blocks``. One
    stable sort: ``np.add.at``/``np.subtract.at`` cost about four times as much at a chunk boundary's
    thousands of blocks."""
    order = np.argsort(blocks, kind="stable")
    ordered = blocks[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])  # the last of each run of one id
    if weights is None:
        sums = np.diff(ends, prepend=-1)
    else:
        sums = np.add.reduceat(weights[order], np.r_[0, ends[:-1] + 1])
    return ordered[ends], sums, order[ends]


def _no_repeats(ids: list) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"seq_ids={ids!r}: expected no repeats")


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``[0, .., counts[0] - 1, 0, .., counts[1] - 1, ...]``."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
