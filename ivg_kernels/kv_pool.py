"""KV storage on the device for paged sequences, and groups of models that fork and prune together.

``KVPool`` holds one model's K and V for every layer in one tensor
``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, so a batch of copy-on-write block
copies is one indexed copy for all layers. ``KVCache`` pairs a pool with its ``BlockManager``.
``KVCacheGroup`` holds one ``KVCache`` per model (base, guides, token reward model): one call forks,
appends to or frees the same logical sequences in every model. Each model keeps its own block
tables, so their lengths may differ (different prompt templates); sequence ids agree across models
because every model's sequences are created through the group.

Memory traffic: a fork moves no KV bytes; an append moves at most one block per forked child per
model (copy-on-write of a shared, partly filled last block).
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from ._backend import resolve_backend
from ._transfer import to_device
from .attention import CACHE_DTYPES
from .block_manager import BlockManager, KVCacheExhausted, int_index


MAX_DIM = 2 ** 31 - 1  # any one size of a pool


class KVPool:
    """K and V blocks of one model, all layers."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, *, dtype=torch.float32,
                 device="cpu"):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
            if v > MAX_DIM:  # (torch's own error for a size past int64 names no argument)
                raise ValueError(f"{name}={v!r}: expected at most {MAX_DIM}")
        if dtype not in CACHE_DTYPES:  # (the attention ops take these; another failed at the first forward)
            raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(str(d) for d in CACHE_DTYPES)}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device={device!r}: expected a torch device or its name ({e})") from None
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)  # (L, 2, B, S, Hkv, D)
        self._layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(num_layers)]  # views, made once
        self.bytes_copied = 0

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def bytes_per_block(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of layer ``i``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        if type(i) is not int or not 0 <= i < len(self._layers):  # (a negative index would be another layer's)
            k = int_index(i)
            if k is None or not 0 <= k < len(self._layers):
                raise ValueError(f"i={i!r}: expected a layer index from 0 to {len(self._layers) - 1}")
            i = k
        return self._layers[i]

    def copy_blocks(self, copies: Sequence[tuple[int, int]], backend: str = "auto") -> None:
        """Run ``(src, dst)`` block copies for every layer (a destination is never a source here).

        ``backend``: ``"reference"`` is one indexed torch gather and scatter; ``"cuda"`` one launch of
        csrc/copy_blocks.cu; ``"auto"`` the CUDA kernel where measured faster, else the reference.
        """
        if backend == "triton":
            raise ValueError("backend='triton': copy_blocks has no Triton kernel; expected 'auto', 'reference' or 'cuda'")
        try:
            copies = [(s, d) for s, d in copies]
        except (TypeError, ValueError):
            raise ValueError(f"copies={copies!r}: expected a sequence of (src, dst) block pairs") from None
        if not copies:
            return
        which = resolve_backend(backend, self.kv, triton_dtypes=None, cuda_dtypes=(self.kv.dtype,), op="copy_blocks",
                                size=(len(copies), self.bytes_per_block))
        num_blocks = self.kv.shape[2]
        for k, (s, d) in enumerate(copies):
            i, j = (s, d) if type(s) is int and type(d) is int else (int_index(s), int_index(d))  # (ints: the common case)
            if i is None or j is None or not (0 <= i < num_blocks and 0 <= j < num_blocks):
                raise ValueError(f"copies: block pair ({s!r}, {d!r}) out of range [0, {num_blocks}) (block ids are ints)")
            copies[k] = (i, j)
        pairs = to_device(torch.tensor(copies, dtype=torch.int64), self.kv.device)
        if which == "cuda":
            from .build import load

            load().copy_blocks(self.kv, pairs)
        else:
            per_layer = self.kv.view(2 * self.kv.shape[0], num_blocks, -1)  # (L * 2, B, block bytes)
            per_layer.index_copy_(1, pairs[:, 1], per_layer.index_select(1, pairs[:, 0]))
        self.bytes_copied += len(copies) * self.bytes_per_block


class KVCache:
    """One model's paged cache: block metadata plus device storage."""

    def __init__(self, num_layers, num_kv_heads, head_dim, *, num_blocks, block_size, dtype=torch.float32,
                 device="cpu"):
        self.blocks = BlockManager(num_blocks, block_size)
        self.pool = KVPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.pool.kv.device

    def append(self, seq_ids: Sequence[int], num_tokens: Union[int, Sequence[int]]) -> torch.Tensor:
        """Reserve slots, run the copy-on-write copies, return the slot mapping on the pool's device. On an
        error (in the copies too) the cache is as it was."""
        seq_ids = list(seq_ids)
        slots = self.blocks.append(seq_ids, num_tokens, copy=self.pool.copy_blocks)  # copies before any change
        try:
            return to_device(slots, self.device)
        except BaseException:
            self.truncate_appended(seq_ids, num_tokens)
            raise

    def truncate_appended(self, seq_ids: Sequence[int], num_tokens: Union[int, Sequence[int]]) -> None:
        """Undo :meth:`append` ``(seq_ids, num_tokens)``: the sequences back to their lengths before it (blocks
        it copied stay their copies: each holds what its source held)."""
        counts = torch.as_tensor(num_tokens, dtype=torch.int64)
        self.blocks.truncate_many(seq_ids, (self.blocks.seq_lens(seq_ids).long() - counts).tolist())


class KVCacheGroup:
    """Several models' caches that fork, grow and prune the same logical sequences together."""

    def __init__(self, caches: Mapping[str, KVCache]):
        if not isinstance(caches, Mapping) or not caches or not all(
                isinstance(name, str) and isinstance(c, KVCache) for name, c in caches.items()):
            what = type(caches).__name__ if not isinstance(caches, Mapping) else caches
            raise ValueError(f"caches={what!r}: expected a mapping of model names to KVCache (at least one)")
        self.caches = dict(caches)

    def __getitem__(self, name: str) -> KVCache:
        return self.caches[name]

    def _all(self, fn):
        results = [fn(c.blocks) for c in self.caches.values()]
        assert all(r == results[0] for r in results), "sequence ids diverged across models"
        return results[0]

    def new_sequences(self, n: int) -> list[int]:
        return self._all(lambda bm: bm.new_sequences(n))

    def fork_many(self, seq_ids: Sequence[int], n, *, replace: bool = False) -> list[list[int]]:
        """:meth:`BlockManager.fork_many` in every model (``replace``: checked in every model first, since it
        frees the parents with no child)."""
        if not seq_ids:  # (a step with nothing to fork: numpy's fixed costs in every model, for nothing)
            return []
        if replace:
            seq_ids = self._live_everywhere(seq_ids)
        return self._all(lambda bm: bm.fork_many(seq_ids, n, replace=replace))

    def free_many(self, seq_ids: Sequence[int]) -> None:
        seq_ids = self._live_everywhere(seq_ids)
        for c in self.caches.values():
            c.blocks.free_many(seq_ids)

    def free_all(self) -> None:
        """Free every live sequence of every model, and give their block managers one next sequence id
        again: an operation of the group that failed part-way (an error, or an interrupt, after one model's
        manager had forked or made sequences and before the next's) leaves their ids apart, and the group
        usable again only once they agree."""
        for c in self.caches.values():
            live = c.blocks.live_sequences
            if live:
                c.blocks.free_many(live)
        top = max(c.blocks.next_id for c in self.caches.values())
        for c in self.caches.values():
            c.blocks.skip_ids(top)

    def _live_everywhere(self, seq_ids: Sequence[int]) -> list:
        """``seq_ids`` as a list, after checking them in every model (a ValueError before any change: no
        model freed and another not)."""
        seq_ids = list(seq_ids)
        for c in self.caches.values():
            c.blocks.seq_lens(seq_ids)
        return seq_ids

    def append(self, seq_ids: Sequence[int], num_tokens) -> dict[str, torch.Tensor]:
        """Append in every model; ``num_tokens`` is shared or a ``{model: counts}`` mapping.

        Checks every model's free blocks before changing any, so exhaustion leaves all of them as they were;
        after any other error the models appended to go back as well.
        """
        per_model = num_tokens if isinstance(num_tokens, Mapping) else {k: num_tokens for k in self.caches}
        for name, cache in self.caches.items():
            need = cache.blocks.blocks_needed(seq_ids, per_model[name])
            if need > cache.blocks.num_free_blocks:
                raise KVCacheExhausted(
                    f"KV cache of model {name!r} exhausted: {need} blocks needed, "
                    f"{cache.blocks.num_free_blocks} free of {cache.blocks.num_blocks}"
                )
        done = {}
        try:
            for name, cache in self.caches.items():
                done[name] = cache.append(seq_ids, per_model[name])
        except BaseException:  # the models appended to before the error go back too
            for name in done:
                self.caches[name].truncate_appended(seq_ids, per_model[name])
            raise
        return done
