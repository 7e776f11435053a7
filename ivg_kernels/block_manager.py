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
from typing import Iterable, Sequence, Union

import numpy as np
import torch


class KVCacheExhausted(RuntimeError):
    """Not enough free blocks; the block manager's state is unchanged."""


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
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
    """

    def __init__(self, num_blocks: int, block_size: int):
        self._num_blocks = _positive_int("num_blocks", num_blocks)
        self._block_size = _positive_int("block_size", block_size)
        self._ref = np.zeros(self._num_blocks, dtype=np.int32)
        self._free: list[int] = list(range(self._num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[int, np.ndarray] = {}  # seq -> int32 array with spare capacity
        self._nblocks: dict[int, int] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0
        self._copies: list[tuple[int, int]] = []
        self.blocks_copied = 0  # copy-on-write copies handed out, ever

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
        return list(self._lens)

    def seq_len(self, seq_id: int) -> int:
        return self._lens[self._check_seq(seq_id)]

    # ------------------------------------------------------------- lifecycle
    def new_sequence(self) -> int:
        """A new empty sequence (no blocks until the first append)."""
        return self.new_sequences(1)[0]

    def new_sequences(self, n: int) -> list[int]:
        n = _positive_int("n", n)
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for s in ids:
            self._tables[s] = np.empty(4, dtype=np.int32)
            self._nblocks[s] = 0
            self._lens[s] = 0
        return ids

    def fork(self, seq_id: int, n: int) -> list[int]:
        """``n`` children sharing every block of ``seq_id``; the parent stays alive until freed."""
        return self.fork_many([seq_id], n)[0]

    def fork_many(self, seq_ids: Sequence[int], n: Union[int, Sequence[int]]) -> list[list[int]]:
        """Fork each parent into ``n`` (or ``n[i]``) children in one call; returns the children per parent."""
        seq_ids = [self._check_seq(s, "seq_ids") for s in seq_ids]
        counts = [n] * len(seq_ids) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else list(n)
        if len(counts) != len(seq_ids):
            raise ValueError(f"n={n!r}: expected an int or one count per parent ({len(seq_ids)})")
        for c in counts:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                raise ValueError(f"n={n!r}: expected counts >= 0")
        out = []
        for parent, c in zip(seq_ids, counts):
            nb = self._nblocks[parent]
            table = self._tables[parent]
            self._ref[table[:nb]] += c
            kids = list(range(self._next_id, self._next_id + c))
            self._next_id += c
            for kid in kids:
                self._tables[kid] = table.copy()
                self._nblocks[kid] = nb
                self._lens[kid] = self._lens[parent]
            out.append(kids)
        return out

    def free(self, seq_id: int) -> None:
        self.free_many([seq_id])

    def free_many(self, seq_ids: Iterable[int]) -> None:
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids={seq_ids!r}: expected no repeats")
        for s in seq_ids:
            self._check_seq(s, "seq_ids")
        for s in seq_ids:
            blocks = self._tables.pop(s)[: self._nblocks.pop(s)]
            del self._lens[s]
            self._ref[blocks] -= 1
            released = blocks[self._ref[blocks] == 0]
            self._free.extend(released[::-1].tolist())

    # ----------------------------------------------------------------- growth
    def blocks_needed(self, seq_ids: Sequence[int], num_tokens: Union[int, Sequence[int]]) -> int:
        """Free blocks that ``append(seq_ids, num_tokens)`` would take (copies included); changes nothing."""
        return self._plan(seq_ids, num_tokens)[1]

    def _plan(self, seq_ids, num_tokens):
        seq_ids = [self._check_seq(s, "seq_ids") for s in seq_ids]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids={seq_ids!r}: expected no repeats")
        if isinstance(num_tokens, numbers.Integral) and not isinstance(num_tokens, bool):
            counts = [int(num_tokens)] * len(seq_ids)
        else:
            counts = [int(c) for c in num_tokens]
            if len(counts) != len(seq_ids):
                raise ValueError(f"num_tokens: expected an int or {len(seq_ids)} counts, got {len(counts)}")
        if any(c < 0 for c in counts):
            raise ValueError(f"num_tokens={num_tokens!r}: expected counts >= 0")
        bs = self._block_size
        plan, needed, released = [], 0, {}
        for s, c in zip(seq_ids, counts):
            length, nb = self._lens[s], self._nblocks[s]
            cow = False
            if c > 0 and length % bs != 0:
                last = int(self._tables[s][nb - 1])
                # Earlier sequences in this call may already have copied away from the same block.
                cow = self._ref[last] - released.get(last, 0) > 1
                if cow:
                    released[last] = released.get(last, 0) + 1
            grow = -(-(length + c) // bs) - nb
            plan.append((s, c, cow, grow))
            needed += grow + int(cow)
        return plan, needed

    def append(self, seq_ids: Sequence[int], num_tokens: Union[int, Sequence[int]]) -> torch.Tensor:
        """Reserve slots for new tokens; returns int64 ``slot_mapping`` (all of seq 0's, then seq 1's, ...).

        A shared, partly filled last block is first replaced by a fresh copy (queued for
        :meth:`take_copies`). Raises :class:`KVCacheExhausted` with nothing changed when the pool is short.
        """
        plan, needed = self._plan(seq_ids, num_tokens)
        bs = self._block_size
        if needed > len(self._free):
            raise KVCacheExhausted(
                f"KV cache exhausted: {needed} blocks needed, {len(self._free)} free of {self._num_blocks} "
                f"(block_size {bs}); free finished sequences or allocate more blocks"
            )

        slots = np.empty(sum(c for _, c, _, _ in plan), dtype=np.int64)
        pos = 0
        for s, c, cow, grow in plan:
            table, nb, length = self._tables[s], self._nblocks[s], self._lens[s]
            if cow:
                src, dst = int(table[nb - 1]), self._free.pop()
                self._ref[src] -= 1
                self._ref[dst] = 1
                table[nb - 1] = dst
                self._copies.append((src, dst))
                self.blocks_copied += 1
            if grow:
                if nb + grow > table.shape[0]:
                    bigger = np.empty(max(2 * table.shape[0], nb + grow), dtype=np.int32)
                    bigger[:nb] = table[:nb]
                    self._tables[s] = table = bigger
                new = [self._free.pop() for _ in range(grow)]
                table[nb : nb + grow] = new
                self._ref[new] = 1
                self._nblocks[s] = nb = nb + grow
            if c == 1:  # a decode step
                slots[pos] = int(table[length // bs]) * bs + length % bs
            else:
                p = np.arange(length, length + c)
                slots[pos : pos + c] = table[p // bs].astype(np.int64) * bs + p % bs
            self._lens[s] = length + c
            pos += c
        return torch.from_numpy(slots)

    def truncate_many(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        """Shorten sequences to ``lengths`` (undoing appends), releasing blocks no longer needed."""
        seq_ids = [self._check_seq(s, "seq_ids") for s in seq_ids]
        lengths = list(lengths)
        if len(lengths) != len(seq_ids):
            raise ValueError(f"lengths: expected {len(seq_ids)} lengths, got {len(lengths)}")
        for s, n in zip(seq_ids, lengths):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= self._lens[s]:
                raise ValueError(f"lengths: {n!r} for sequence {s}: expected 0 <= length <= {self._lens[s]}")
        for s, n in zip(seq_ids, lengths):
            keep = -(-int(n) // self._block_size)
            dropped = self._tables[s][keep : self._nblocks[s]]
            self._ref[dropped] -= 1
            self._free.extend(dropped[self._ref[dropped] == 0][::-1].tolist())
            self._nblocks[s] = keep
            self._lens[s] = int(n)

    def take_copies(self) -> list[tuple[int, int]]:
        """The ``(src_block, dst_block)`` copies queued since the last call; run them before writing slots."""
        out, self._copies = self._copies, []
        return out

    # ------------------------------------------------------------------ views
    def block_table(self, seq_ids: Sequence[int], *, width: int | None = None) -> torch.Tensor:
        """int32 ``[len(seq_ids), max_blocks]`` (``width`` columns if given), padded with 0."""
        seq_ids = [self._check_seq(s, "seq_ids") for s in seq_ids]
        most = max((self._nblocks[s] for s in seq_ids), default=0)
        width = most if width is None else width
        if width < most:
            raise ValueError(f"width={width}: expected at least {most}, the longest table")
        out = np.zeros((len(seq_ids), width), dtype=np.int32)
        for i, s in enumerate(seq_ids):
            nb = self._nblocks[s]
            out[i, :nb] = self._tables[s][:nb]
        return torch.from_numpy(out)

    def shared_prefix_groups(self, seq_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """The structure ``shared_prefix_decode_attention`` takes for rows ``seq_ids``: ``(group_starts,
        shared_lens)``. A group is a run of consecutive sequences whose first block is the same physical
        block (beams forked from one prompt); ``shared_lens[g]`` is how many leading tokens every member
        holds in the same blocks (whole shared blocks, the last possibly partly filled, cut at the
        shortest member). A sequence sharing nothing with its neighbours is a group of its own."""
        return prefix_groups(self.block_table(seq_ids).numpy(), self.seq_lens(seq_ids).numpy(), self._block_size)

    def seq_lens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 ``[len(seq_ids)]``."""
        return torch.tensor([self._lens[self._check_seq(s, "seq_ids")] for s in seq_ids], dtype=torch.int32)

    def blocks_of(self, seq_id: int) -> list[int]:
        s = self._check_seq(seq_id)
        return self._tables[s][: self._nblocks[s]].tolist()

    def ref_count(self, block: int) -> int:
        return int(self._ref[block])

    # ----------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests and debugging)."""
        counts = np.zeros(self._num_blocks, dtype=np.int64)
        for s, length in self._lens.items():
            nb = self._nblocks[s]
            blocks = self._tables[s][:nb]
            assert nb == -(-length // self._block_size), f"seq {s}: {nb} blocks for length {length}"
            assert len(set(blocks.tolist())) == nb, f"seq {s}: a block appears twice"
            counts[blocks] += 1
        assert np.array_equal(counts, self._ref), "ref counts differ from the tables"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert free == set(np.flatnonzero(self._ref == 0).tolist()), "free list differs from ref counts == 0"
        assert len(self._free) + int((self._ref > 0).sum()) == self._num_blocks

    def _check_seq(self, seq_id, name: str = "seq_id") -> int:
        if type(seq_id) is int and seq_id in self._lens:  # the fast path of the decode loop
            return seq_id
        if isinstance(seq_id, bool) or not isinstance(seq_id, numbers.Integral) or seq_id not in self._lens:
            raise ValueError(f"{name}: {seq_id!r} is not a live sequence")
        return int(seq_id)
