"""BlockManager: hypothesis state machine over new/append/fork/free, exhaustion, copy-on-write bounds."""
import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ivg_kernels.block_manager import BlockManager, KVCacheExhausted
from ivg_kernels.kv_pool import KVCache, KVCacheGroup, KVPool

NUM_BLOCKS, BLOCK_SIZE = 24, 4


class BlockManagerMachine(RuleBasedStateMachine):
    """Shadow KV: a distinct value per written token; each live sequence must read back its own history."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.kv = np.full(NUM_BLOCKS * BLOCK_SIZE, -1, dtype=np.int64)
        self.history: dict[int, list[int]] = {}
        self.counter = 0

    def _write(self, seq_ids, counts):
        snapshot = (self.bm.num_free_blocks, {s: self.bm.seq_len(s) for s in self.history})
        try:
            slots = self.bm.append(seq_ids, counts)
        except KVCacheExhausted:
            assert (self.bm.num_free_blocks, {s: self.bm.seq_len(s) for s in self.history}) == snapshot
            return
        for src, dst in self.bm.take_copies():
            self.kv[dst * BLOCK_SIZE:(dst + 1) * BLOCK_SIZE] = self.kv[src * BLOCK_SIZE:(src + 1) * BLOCK_SIZE]
        i = 0
        for s, c in zip(seq_ids, counts):
            for _ in range(c):
                self.kv[slots[i]] = self.counter
                self.history[s].append(self.counter)
                self.counter += 1
                i += 1
        assert i == len(slots)

    @rule(prompt=st.integers(0, 9))
    def new(self, prompt):
        s = self.bm.new_sequence()
        self.history[s] = []
        self._write([s], [prompt])

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def append(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.history)), min_size=1, max_size=4, unique=True))
        counts = data.draw(st.lists(st.integers(0, 6), min_size=len(ids), max_size=len(ids)))
        self._write(ids, counts)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), n=st.integers(0, 3), prune_parent=st.sampled_from(["no", "free", "replace"]))
    def fork(self, data, n, prune_parent):
        parents = data.draw(st.lists(st.sampled_from(sorted(self.history)), min_size=1, max_size=2, unique=True))
        copied = self.bm.blocks_copied
        kids = self.bm.fork_many(parents, n, replace=prune_parent == "replace")
        assert self.bm.blocks_copied == copied and self.bm.take_copies() == [], "a fork must copy nothing"
        for p, ks in zip(parents, kids):
            if prune_parent == "replace":  # the first child is the parent's own sequence
                assert ks[:1] == ([p] if n else [])
                ks = ks[1:]
            for k in ks:
                self.history[k] = list(self.history[p])
        if prune_parent == "free":
            self.bm.free_many(parents)
        if prune_parent != "no":
            for p in parents:
                if prune_parent == "free" or not n:
                    del self.history[p]

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def truncate(self, data):
        s = data.draw(st.sampled_from(sorted(self.history)))
        n = data.draw(st.integers(0, len(self.history[s])))
        self.bm.truncate_many([s], [n])
        del self.history[s][n:]

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.history)))
        self.bm.free(s)
        del self.history[s]

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == NUM_BLOCKS
        for s, hist in self.history.items():
            assert self.bm.seq_len(s) == len(hist)
            if not hist:
                continue
            table = self.bm.block_table([s])[0]
            pos = torch.arange(len(hist))
            slots = table[pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
            assert self.kv[slots.numpy()].tolist() == hist, f"seq {s} reads back another history"

    def teardown(self):
        self.bm.free_many(list(self.history))
        assert self.bm.num_free_blocks == NUM_BLOCKS, "blocks leaked"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_slot_mapping_layout():
    bm = BlockManager(8, 4)
    a, b = bm.new_sequences(2)
    slots = bm.append([a, b], [6, 3])
    ta, tb = bm.blocks_of(a), bm.blocks_of(b)
    expected = [ta[p // 4] * 4 + p % 4 for p in range(6)] + [tb[0] * 4 + p for p in range(3)]
    assert slots.tolist() == expected and slots.dtype == torch.int64
    table = bm.block_table([a, b])
    assert table.dtype == torch.int32 and table.tolist() == [ta, tb + [0]]
    assert bm.seq_lens([a, b]).tolist() == [6, 3]
    both = bm.tables([b, a])
    assert both[0].tolist() == [tb + [0], ta] and both[1].dtype == torch.int32 and both[1].tolist() == [3, 6]
    with pytest.raises(ValueError, match="seq_ids: 99 is not a live sequence"):
        bm.tables([a, 99])


def test_exhaustion_names_the_numbers_and_changes_nothing():
    bm = BlockManager(4, 4)
    a, b = bm.new_sequences(2)
    bm.append([a], 10)  # 3 blocks
    before = (bm.num_free_blocks, bm.seq_len(a), bm.seq_len(b), bm.blocks_of(a))
    with pytest.raises(KVCacheExhausted, match="3 blocks needed, 1 free of 4"):
        bm.append([a, b], [3, 8])  # a: 13 tokens -> one more block; b: two blocks
    with pytest.raises(KVCacheExhausted, match="2 blocks needed, 1 free"):
        bm.append([b], 5)
    assert (bm.num_free_blocks, bm.seq_len(a), bm.seq_len(b), bm.blocks_of(a)) == before
    bm.check_invariants()


def test_a_group_append_may_take_every_free_block_and_not_one_more():
    """``KVCacheGroup.append`` checks every model's free blocks before changing any: exactly enough is enough (the
    pools end full), one block short in one model is ``KVCacheExhausted`` with every model as it was."""
    group = KVCacheGroup({name: KVCache(1, 1, 2, num_blocks=n, block_size=4) for name, n in (("a", 4), ("b", 5))})
    s, t = group.new_sequences(2)
    group.append([s, t], {"a": [6, 8], "b": [6, 12]})  # a: 2 + 2 blocks of 4, b: 2 + 3 of 5
    assert [c.blocks.num_free_blocks for c in group.caches.values()] == [0, 0]
    group.free_many([t])
    with pytest.raises(KVCacheExhausted, match="model 'b' exhausted: 4 blocks needed, 3 free of 5"):
        group.append([s], {"a": 2, "b": 18})  # a: fits in its last block; b: 6 + 18 tokens -> 6 blocks
    assert [c.blocks.seq_len(s) for c in group.caches.values()] == [6, 6]
    group.append([s], {"a": 2, "b": 14})  # b: 20 tokens, exactly its 3 free blocks more
    assert [c.blocks.num_free_blocks for c in group.caches.values()] == [2, 0]
    for c in group.caches.values():
        c.blocks.check_invariants()


def test_a_group_checks_ids_in_every_model_before_freeing_in_any():
    """``KVCacheGroup.free_many`` and a replacing ``fork_many`` (which frees) check the ids in every model first: an
    id dead in the last model (as a failed operation can leave it) is a ValueError, and the first model keeps
    every sequence it had."""
    group = KVCacheGroup({name: KVCache(1, 1, 2, num_blocks=8, block_size=4) for name in ("a", "b")})
    s, t = group.new_sequences(2)
    group.append([s, t], 5)
    group["b"].blocks.free_many([t])
    for call in (lambda: group.free_many([s, t]), lambda: group.fork_many([s, t], 0, replace=True)):
        with pytest.raises(ValueError, match=f"{t} is not a live sequence"):
            call()
        assert group["a"].blocks.live_sequences == [s, t] and group["b"].blocks.live_sequences == [s]


def test_fork_then_append_copies_at_most_one_block_per_child():
    bm = BlockManager(64, 16)
    parent = bm.new_sequence()
    bm.append([parent], 100)  # 7 blocks, the last one partly filled
    kids = bm.fork(parent, 8)
    bm.free(parent)
    bm.append(kids, 1)
    copies = bm.take_copies()
    assert len(copies) == 7, "the last child owns the shared block alone and writes in place"
    assert all(src == bm.blocks_of(kids[-1])[-1] for src, _ in copies)
    assert bm.blocks_copied == 7
    for k in kids:
        assert bm.blocks_of(k)[:6] == bm.blocks_of(kids[0])[:6]
    bm.append(kids, 1)
    assert bm.take_copies() == [], "after the copy each child owns its last block"


def test_fork_at_a_block_boundary_copies_nothing():
    bm = BlockManager(16, 4)
    p = bm.new_sequence()
    bm.append([p], 8)
    kids = bm.fork(p, 3)
    bm.append(kids + [p], 1)
    assert bm.take_copies() == []


def test_fork_many_counts_and_bad_ids():
    bm = BlockManager(16, 4)
    a, b = bm.new_sequences(2)
    bm.append([a, b], 5)
    kids = bm.fork_many([a, b], [2, 0])
    assert len(kids[0]) == 2 and kids[1] == []
    assert bm.ref_count(bm.blocks_of(a)[0]) == 3
    with pytest.raises(ValueError, match="seq_ids: 99 is not a live sequence"):
        bm.fork_many([99], 1)
    with pytest.raises(ValueError, match="seq_ids"):
        bm.append([a, a], 1)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.append([a], -1)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="width"):
        bm.block_table([a], width=1)
    bm.free(a)
    with pytest.raises(ValueError, match="not a live sequence"):
        bm.free(a)
    bm.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_a_replacing_fork_is_a_fork_then_freeing_the_parents(seed):
    """``fork_many(..., replace=True)``: each child holds the blocks it would after ``fork_many`` and
    ``free_many`` of the parents, with the same reference counts and free list; a parent's first child is
    its own sequence and a parent with no child is gone. Bad arguments change nothing."""
    import random

    def build(rng):
        bm = BlockManager(200, 3)
        seqs = bm.new_sequences(8)
        bm.append(seqs, [rng.randint(0, 10) for _ in seqs])
        seqs += [k for ks in bm.fork_many(seqs[:3], 2) for k in ks]
        bm.append(seqs[-4:], 2)
        return bm, seqs

    rng = random.Random(seed)
    a, seqs = build(random.Random(seed))
    b, _ = build(random.Random(seed))
    parents = rng.sample(seqs, rng.randint(1, len(seqs)))
    counts = [rng.choice([0, 1, 2, 4]) for _ in parents]
    kids = a.fork_many(parents, counts)
    a.free_many(parents)
    moved = b.fork_many(parents, counts, replace=True)
    assert [len(k) for k in moved] == counts
    assert all(m[:1] == ([p] if c else []) for p, c, m in zip(parents, counts, moved))
    assert [a.blocks_of(k) for ks in kids for k in ks] == [b.blocks_of(k) for ks in moved for k in ks]
    assert [a.seq_len(k) for ks in kids for k in ks] == [b.seq_len(k) for ks in moved for k in ks]
    assert a._free == b._free and (a._ref == b._ref).all()
    assert sorted(b.live_sequences) == sorted(set(seqs) - set(parents) | {k for ks in moved for k in ks})
    b.check_invariants()
    before = (list(b._free), b._ref.copy(), b.live_sequences)
    live = b.live_sequences
    for bad in ([live[0], live[0]], [live[0], 10 ** 6]):
        with pytest.raises(ValueError, match="seq_ids"):
            b.fork_many(bad, 1, replace=True)
    assert (list(b._free), b.live_sequences) == (before[0], before[2]) and (b._ref == before[1]).all()


def test_the_remembered_rows_of_the_last_list_never_outlive_their_sequences():
    """A list of ids looked up again is not looked up again (the decode loop's rows, step after step), yet a
    freed id, a changed list and ids of the wrong type are seen as they would be without the memo."""
    bm = BlockManager(32, 4)
    a, b, c = bm.new_sequences(3)
    bm.append([a, b, c], 5)
    rows = [a, b]
    assert bm.tables(rows)[1].tolist() == [5, 5]
    bm.append(rows, 1)
    assert bm.seq_lens(rows).tolist() == [6, 6]
    rows[1] = c  # the caller's list changed in place
    assert bm.seq_lens(rows).tolist() == [6, 5]
    assert bm.block_table(rows).tolist() == [bm.blocks_of(a), bm.blocks_of(c)]
    assert (a, b) == (0, 1) and bm.seq_lens([b, a]).tolist() == [6, 6]  # remembered: [1, 0]
    with pytest.raises(ValueError, match="is not a live sequence"):
        bm.seq_lens([True, False])  # equal to [1, 0] as a list, but no ids
    bm.free(c)  # (its own look-up of [c] was the last)
    for gone in ([c], rows):
        with pytest.raises(ValueError, match=f"seq_ids: {c} is not a live sequence"):
            bm.append(gone, 1)
    assert bm.fork_many([b], 0, replace=True) == [[]]
    with pytest.raises(ValueError, match=f"seq_ids: {b} is not a live sequence"):
        bm.seq_lens([b])
    assert bm.seq_len(a) == 6
    bm.check_invariants()


def test_batch_calls_act_as_one_sequence_after_another():
    """Within one call, sequences take blocks, copy and release in the order given (worked by hand)."""
    bm = BlockManager(16, 4)
    p, q = bm.new_sequences(2)
    bm.append([p], 6)  # blocks 0, 1 (low ids first)
    bm.append([q], 2)  # block 2
    (k1, k2), (k3, k4) = bm.fork_many([p, q], 2)
    bm.free_many([p, q])
    # Each last block has two holders: the first writer (in call order) copies it away, the second
    # writes in place, whichever parent the writers came from.
    slots = bm.append([k3, k1, k4, k2], 1)
    assert bm.take_copies() == [(2, 3), (1, 4)]
    assert [bm.blocks_of(k) for k in (k1, k2, k3, k4)] == [[0, 4], [0, 1], [3], [2]]
    assert slots.tolist() == [3 * 4 + 2, 4 * 4 + 2, 2 * 4 + 2, 1 * 4 + 2]
    # k2 releases block 1 (block 0 still held by k1), then k1 releases its blocks last to first: 4, 0.
    bm.free_many([k2, k1])
    s = bm.new_sequence()
    bm.append([s], 12)
    assert bm.blocks_of(s) == [0, 4, 1], "the blocks released last are handed out first"
    # Truncating releases like freeing; a sequence keeps ceil(length / block_size) blocks.
    bm.truncate_many([s, k3], [5, 0])
    assert bm.blocks_of(s) == [0, 4] and bm.blocks_of(k3) == [] and bm.seq_lens([s, k3]).tolist() == [5, 0]
    with pytest.raises(ValueError, match="no repeats"):
        bm.truncate_many([s, s], [1, 1])
    with pytest.raises(ValueError, match="lengths: 6 for sequence"):
        bm.truncate_many([s], [6])
    bm.check_invariants()


@pytest.mark.parametrize("seed", range(3))
def test_array_work_and_per_sequence_work_agree(monkeypatch, seed):
    """Batch calls run as array work from ARRAY_FROM (RELEASE_ARRAY_FROM) sequences, as a Python loop below
    it: on random histories of new/append/fork/truncate/free both give the same tables, slots, copies and
    free list."""
    import random

    import ivg_kernels.block_manager as bmod

    def history(array_from):
        monkeypatch.setattr(bmod, "ARRAY_FROM", array_from)
        monkeypatch.setattr(bmod, "RELEASE_ARRAY_FROM", array_from)
        rng, bm, seen = random.Random(seed), BlockManager(160, 3), []
        for _ in range(120):
            live = bm.live_sequences
            op = rng.choice(["append", "append", "fork", "free", "truncate"]) if len(live) > 4 else "new"
            if op == "new":
                out = bm.new_sequences(rng.randint(3, 12))
            elif op == "append":
                ids = rng.sample(live, rng.randint(1, len(live)))
                counts = 1 if rng.random() < 0.4 else [rng.choice([0, 1, 1, 2, 7]) for _ in ids]
                try:
                    out = (bm.append(ids, counts).tolist(), bm.take_copies())
                except KVCacheExhausted as e:
                    out = str(e)
            elif op == "fork":
                out = bm.fork_many(rng.sample(live, rng.randint(1, 4)), rng.randint(0, 4), replace=rng.random() < 0.5)
            elif op == "free":
                out = bm.free_many(rng.sample(live, rng.randint(1, len(live) // 2)))
            else:
                ids = rng.sample(live, rng.randint(1, len(live)))
                out = bm.truncate_many(ids, [rng.randint(0, bm.seq_len(s)) for s in ids])
            bm.check_invariants()
            live = bm.live_sequences
            seen.append((op, out, live, bm.block_table(live).tolist() if live else [], bm.seq_lens(live).tolist(),
                         list(bm._free), bm.blocks_copied))
        return seen

    arrays, loops = history(1), history(10 ** 9)
    assert any(op == "append" and isinstance(out, tuple) and out[1] for op, out, *_ in arrays), "no copy-on-write seen"
    assert arrays == loops


def test_counts_that_are_not_ints_are_named():
    bm = BlockManager(8, 4)
    s = bm.new_sequences(2)
    for bad in (1.5, [1, 2.0], [True, 1], "2"):
        with pytest.raises(ValueError, match=r"num_tokens=.*: expected an int or a sequence of ints"):
            bm.append(s, bad)
    assert bm.num_free_blocks == 8
    assert bm.append(s, np.array([1, 2])).tolist() == [0, 4, 5]  # numpy ints are ints


def test_a_kv_pool_names_a_bad_shape_or_dtype():
    """The attention ops take float caches only: an integer one was made, then failed at the first forward."""
    with pytest.raises(ValueError, match=r"dtype=torch.int32: expected one of torch.float32, torch.bfloat16"):
        KVCache(2, 2, 8, num_blocks=4, block_size=4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"head_dim=0: expected a positive int"):
        KVPool(2, 4, 4, 2, 0)
    assert KVPool(1, 2, 4, 1, 8, dtype=torch.bfloat16).kv.dtype == torch.bfloat16


@pytest.mark.parametrize("pair", [(4, 0), (0, 4), (-1, 2), (2, -1)])
def test_a_block_copy_out_of_range_is_named_and_copies_nothing(pair):
    pool = KVPool(2, 4, 2, 1, 3)
    pool.kv.copy_(torch.arange(pool.kv.numel(), dtype=pool.kv.dtype).view_as(pool.kv))
    before = pool.kv.clone()
    with pytest.raises(ValueError, match=rf"copies: block pair \({pair[0]}, {pair[1]}\) out of range \[0, 4\)"):
        pool.copy_blocks([(1, 3), pair], backend="reference")
    assert torch.equal(pool.kv, before) and pool.bytes_copied == 0
    pool.copy_blocks([(1, 3)], backend="reference")
    assert torch.equal(pool.kv[:, :, 3], before[:, :, 1]) and pool.bytes_copied == pool.bytes_per_block


def test_sequence_ids_may_be_numpy_or_torch_integers():
    """Ids taken from a tensor (a drawn row's index, say) were "not a live sequence": a 0-d tensor is no dict
    key for its value. Bools and floats are still refused."""
    bm = BlockManager(8, 4)
    (a,) = bm.new_sequences(1)
    assert bm.append(torch.tensor([a]), 3).tolist() == bm.block_table([a])[0, :1].mul(4).add(torch.arange(3)).tolist()
    kids = bm.fork(torch.tensor(a), np.int64(2))
    assert bm.seq_lens(np.array(kids)).tolist() == [3, 3] and bm.seq_lens(torch.tensor(kids)).tolist() == [3, 3]
    for bad in (True, 0.0, torch.tensor(0.0)):
        with pytest.raises(ValueError, match="is not a live sequence"):
            bm.append([bad], 1)
    bm.free_many(torch.tensor(kids + [a]))
    assert bm.num_used_blocks == 0


def test_arguments_of_the_wrong_kind_are_named_and_change_nothing():
    """Found by a fuzz of the public methods: an id list given as an int, None or a 0-d tensor failed with Python's
    "object is not iterable"; a tensor among the ids met the remembered id list's ``==`` (elementwise: "Boolean value
    of Tensor ... is ambiguous"); a fork count past int64, a width given as a tensor and a block id out of range
    (``ref_count(-1)`` read the last block's count) failed inside numpy, or not at all. Each is named now, and the
    manager is left as it was."""
    bm = BlockManager(8, 4)
    (a,) = bm.new_sequences(1)
    bm.append([a], 6)
    bm.tables([a])  # (the remembered look-up, which a tensor id met first)
    before = (bm.num_free_blocks, bm.seq_lens([a]).tolist(), bm.block_table([a]).tolist())
    for call, match in [
        (lambda: bm.append(a, 1), "seq_ids=0: expected a sequence of sequence ids"),
        (lambda: bm.free_many(None), "seq_ids=None: expected a sequence of sequence ids"),
        (lambda: bm.seq_lens(torch.tensor(0)), r"seq_ids=tensor\(0\): expected a sequence of sequence ids"),
        (lambda: bm.tables([torch.tensor([])]), r"seq_ids: tensor\(\[\]\) is not a live sequence"),
        (lambda: bm.fork(torch.tensor([]), 1), r"seq_ids: tensor\(\[\]\) is not a live sequence"),
        (lambda: bm.fork(a, 2 ** 70), r"n=\d+: expected counts from 0 to 2147483647"),
        (lambda: bm.fork_many([a], None), "n=None: expected an int or one count per parent"),
        (lambda: bm.truncate_many([a], 3), "lengths=3: expected one length per sequence"),
        (lambda: bm.append([a], torch.tensor(1)), r"num_tokens=tensor\(1\): expected an int or a sequence of ints"),
        (lambda: bm.append([a, bm.new_sequence()], [1, 2 ** 70]), "num_tokens=.*up to 2147483647"),
        (lambda: bm.block_table([a], width=torch.tensor([])), r"width=tensor\(\[\]\): expected None or an int"),
        (lambda: bm.ref_count(-1), "block=-1: expected a block id from 0 to 7"),
        (lambda: bm.ref_count(8), "block=8: expected a block id from 0 to 7"),
        (lambda: bm.ref_count(1.0), "block=1.0: expected a block id"),
        (lambda: BlockManager(2 ** 31, 4), "num_blocks=2147483648: expected a positive int up to 2147483647"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
        bm.check_invariants()
        assert (bm.num_free_blocks, bm.seq_lens([a]).tolist(), bm.block_table([a]).tolist()) == before, match
    assert bm.ref_count(bm.blocks_of(a)[0]) == 1 and bm.ref_count(7) == 0


def test_a_pool_and_a_group_name_arguments_of_the_wrong_kind():
    """``layer(-1)`` returned the last layer's views (a Python index); copies that are not (src, dst) pairs, a
    device name torch cannot read, a size past int32 and a group of other things than caches failed with
    Python's or torch's own errors, which named no argument."""
    pool = KVPool(2, 4, 2, 1, 3)
    assert pool.layer(1)[0].shape == (4, 2, 1, 3) and pool.layer(np.int64(0))[1].shape == (4, 2, 1, 3)
    for i in (-1, 2, 1.0, True):
        with pytest.raises(ValueError, match=rf"i={i!r}: expected a layer index from 0 to 1"):
            pool.layer(i)
    for copies in ("x", 3, [1, 2], [(0, 1, 2)], torch.tensor(1)):
        with pytest.raises(ValueError, match="copies=.*: expected a sequence of \\(src, dst\\) block pairs"):
            pool.copy_blocks(copies, backend="reference")
    for pair in (("a", 1), (True, 1), (1.0, 2)):
        with pytest.raises(ValueError, match=rf"copies: block pair \({pair[0]!r}, {pair[1]!r}\) out of range \[0, 4\)"):
            pool.copy_blocks([pair], backend="reference")
    assert pool.bytes_copied == 0
    pool.copy_blocks(torch.tensor([[1, 3]]), backend="reference")  # integer tensors' and NumPy's elements are ids
    pool.copy_blocks([(np.int64(0), 2)], backend="reference")
    assert pool.bytes_copied == 2 * pool.bytes_per_block
    with pytest.raises(ValueError, match="device='x': expected a torch device"):
        KVPool(1, 2, 4, 1, 8, device="x")
    with pytest.raises(ValueError, match="num_kv_heads=2147483648: expected at most 2147483647"):
        KVPool(1, 2, 4, 2 ** 31, 8)
    cache = KVCache(1, 1, 8, num_blocks=2, block_size=4)
    for caches in (None, [cache], {"base": 1}, {1: cache}, {}):
        with pytest.raises(ValueError, match="caches=.*: expected a mapping of model names to KVCache"):
            KVCacheGroup(caches)
    assert KVCacheGroup({"base": cache})["base"] is cache
