"""Hugging Face causal LMs on the paged KV cache: one forward over a ragged batch of sequences.

:class:`PagedModel` appends each sequence's new tokens to its blocks, builds the one :class:`PagedBatch` every
layer shares (slots, block tables, lengths, beam groups) and runs the model through the paged attention
(:mod:`ivg.paged_attention`): its lean forward where one exists (:mod:`ivg.lean_models`), else transformers' own
with the ``"ivg_paged"`` attention. Batches are packed as one row of ``T`` tokens with explicit
``position_ids``; transformers builds no mask for an attention implementation it does not know, and none is
needed. Decode steps (and extends) replay CUDA graphs on a GPU (:mod:`ivg.cuda_graphs`).

Tested families: GPT-2, Llama (grouped-query attention), Mistral (sliding window), Qwen2; Phi-3 with longrope
RoPE scaling, whose frequencies `ivg.row_rope` chooses per sequence; Qwen3, Gemma 3, GPT-NeoX, OPT, GPT-J,
GPTBigCode and Mixtral; Gemma 2 (attention logit soft-capping), gpt-oss and Granite SWA (attention sinks);
DeepSeek V2/V3 and MiniCPM3 (latent attention: values narrower than keys, held zero-padded); Gemma 4 (layers of
several head sizes and KV head counts, held padded and repeated to the widest); Gemma 3n and 4 with layers that
reuse an earlier layer's keys and values; MiMo-V2 (sliding-window layers with more KV heads than its config states).
:func:`check_family` (:mod:`ivg.model_families`) refuses, with the reason, models it cannot serve exactly.

The attention function and the family checks live in their own modules; their public names are importable from
here as before (``PagedBatch``, ``paged_attention_forward``, ``ATTN_IMPLEMENTATION``, ``check_family``,
``kv_shape``, ``local_kv_shape``, ``model_from_config``, ``register_attention``).
"""
from __future__ import annotations

import operator
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from ivg_kernels.attention import attention_backend
from ivg_kernels._transfer import to_device, to_device_many
from ivg_kernels.block_manager import as_list, prefix_groups
from ivg_kernels.kv_pool import KVCache

from .lean_models import lean_forward
from .model_families import check_family, kv_shape, local_kv_shape, model_from_config
from .models import batch_dependent_rope, model_positions
from .paged_attention import (ATTN_IMPLEMENTATION, PagedBatch, attend, check_attended, paged_attention_forward,
                              register_attention)
from .row_rope import row_rope

__all__ = ["PagedModel", "ForwardTimer", "SHARED_PREFIX_MIN_TOKENS", "PagedBatch", "paged_attention_forward",
           "ATTN_IMPLEMENTATION", "register_attention", "check_family", "kv_shape", "local_kv_shape", "model_from_config"]

# Shared tokens per row from which the plain-torch shared-prefix attention beats per-row attention in
# the decoder (CPU, one thread; benchmarks/results_notes.md, 2026-12-02: IVG W=K=4, 4 prompts, 32 new tokens,
# both paths planned once per forward: prompts of 80 and 112 tokens 19% and 9% slower shared, 144 to 224 tokens
# 2% to 18% faster): below it the per-row SDPA path wins.
SHARED_PREFIX_MIN_TOKENS = 128


class ForwardTimer:
    """Total time inside ``PagedModel`` forwards: the host clock on the CPU; CUDA events on a GPU, read
    once in :meth:`total` (no synchronisation per forward), i.e. the device time between each forward's
    first and last launch."""

    def __init__(self):
        self.cpu_s = 0.0
        self.events: list = []

    def begin(self, device):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def end(self, device, token) -> None:
        if device.type == "cuda":
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self.events.append((token, stop))
        else:
            self.cpu_s += time.perf_counter() - token

    def total(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
        return self.cpu_s + sum(a.elapsed_time(b) for a, b in self.events) / 1e3


class PagedModel:
    """A causal LM plus its paged KV cache.

    Parameters
    ----------
    model : a transformers causal LM. It is switched to the ``"ivg_paged"`` attention when transformers'
        forward runs it (no lean forward, or CUDA graphs); a lean forward leaves the model as it is.
    num_blocks, block_size : pool size of a new cache (without ``cache``)
    cache : an existing KVCache (for example a member of a ``KVCacheGroup``) instead of a new one: the
        model's layers, KV heads and head size, dtype and device (checked). A forward that would take a
        sequence past the model's positions (``max_position_embeddings``) is refused, as every bad input is,
        with the sequences left as they were
    backend : kernel backend of the attention ops and ``write_kv``: ``"auto"``, ``"reference"`` or ``"triton"``
    cuda_graphs : replay decode steps (one new token per sequence), and extends of the same number of
        tokens per sequence that keep the logits at every position (a speculative round's verification),
        from CUDA graphs captured per batch-size bucket (:mod:`ivg.cuda_graphs`); ignored off CUDA, where
        every forward runs eagerly
    shared_prefix : decode steps attend through ``shared_prefix_decode_attention``: the blocks that
        consecutive sequences share (beams forked from one prompt) are read once per group. ``True``
        whenever two rows share a block; ``None`` (default) where it was measured to pay: the plain-torch
        path (CPU) when the rows share at least ``SHARED_PREFIX_MIN_TOKENS`` tokens each on average
        (``benchmarks/RESULTS.md``); off on CUDA until measured there. Steps replayed from CUDA graphs
        take the groups as graph inputs (``ivg.cuda_graphs``)
    lean : eager forwards run through :mod:`ivg.lean_models` (the same submodules in the same order as
        transformers, bitwise the same logits, without its per-call work) where the family is supported:
        ``None`` (default) where it is, ``True`` to insist (ValueError otherwise), ``False`` for the
        transformers forward. Steps replayed from CUDA graphs use the transformers forward
    """

    def __init__(self, model, *, num_blocks: int = 0, block_size: int = 16, cache: KVCache | None = None,
                 backend: str = "auto", cuda_graphs: bool = False, shared_prefix: bool | None = None,
                 lean: bool | None = None):
        check_family(model)
        register_attention()
        self.model = model.eval()
        self._previous_attn = None
        param = next(model.parameters())
        layers, kv_heads, head_dim = local_kv_shape(model)
        if cache is None:
            cache = KVCache(layers, kv_heads, head_dim, num_blocks=num_blocks, block_size=block_size,
                            dtype=param.dtype, device=param.device)
        else:
            if num_blocks:  # (the cache's own pool size is the one that counts)
                raise ValueError(f"num_blocks={num_blocks!r}: give the pool size or cache=, not both")
            kv = cache.pool.kv  # [layers, 2, blocks, block_size, kv_heads, head_dim]
            if (kv.shape[0], kv.shape[4], kv.shape[5]) != (layers, kv_heads, head_dim) or kv.dtype != param.dtype \
                    or kv.device != param.device:
                raise ValueError(f"cache: holds {kv.shape[0]} layers of {kv.shape[4]} KV heads of {kv.shape[5]} "
                                 f"({kv.dtype}, {kv.device}); {type(model).__name__} needs {layers} of {kv_heads} of "
                                 f"{head_dim} ({param.dtype}, {param.device})")
        attention_backend(backend, cache.pool.kv)  # an unknown backend, or one this cache cannot take: now
        self.cache = cache
        self.backend = backend
        self.positions = model_positions(model)  # the most tokens a sequence may hold (None: no stated limit)
        switch = batch_dependent_rope(model)
        # longrope: each sequence's own short or long frequencies (before the lean forward takes the rotary)
        self.row_rope = None if switch is None else row_rope(model, switch)
        if switch is not None and self.row_rope is None:
            warnings.warn(f"ivg.PagedModel: {type(model).__name__} uses longrope RoPE scaling, whose frequencies "
                          f"transformers picks by the longest sequence of a forward (long ones past {switch} "
                          "tokens), and its rotary embedding is not one ivg.row_rope can choose per sequence; "
                          "a paged forward holds many sequences, so once one of them passes "
                          f"{switch} tokens the logits of the others in that forward change too and results "
                          "depend on the batch. Decode one prompt at a time (max_batch_prompts=1) where that "
                          "matters", UserWarning, stacklevel=2)
        self.device = param.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.config_vocab = model.config.get_text_config().vocab_size  # token ids must lie below it
        if shared_prefix not in (None, True, False):
            raise ValueError(f"shared_prefix={shared_prefix!r}: expected None, True or False")
        if shared_prefix is None:
            shared_prefix = "auto" if (self.device.type == "cpu" or backend == "reference") else False
        self.shared_prefix = shared_prefix
        self.timer: ForwardTimer | None = None  # set by the decoder to measure its forwards
        if lean not in (None, True, False):
            raise ValueError(f"lean={lean!r}: expected None, True or False")
        self.lean = None if lean is False else lean_forward(model, attend)
        if lean and self.lean is None:
            raise ValueError(f"lean=True: {type(model).__name__} is not a family ivg.lean_models supports "
                             "(GPT-2, Llama, Mistral, Qwen2); use lean=None or False")
        if self.lean is not None and self.lean.kv_shapes != {(kv_heads, head_dim)}:
            held = ", ".join(f"{h} KV heads of {d}" for h, d in sorted(self.lean.kv_shapes))
            raise ValueError(f"model: {type(model).__name__}'s attention modules hold {held}; its config states "
                             f"{kv_heads} of {head_dim}, the paged cache's shape (a key the model does not read, such "
                             "as num_key_value_heads on GPT-2)")
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)
        self.attach()

    @property
    def blocks(self):
        return self.cache.blocks

    def attach(self) -> None:
        """Switch the model to the paged attention: at construction, and again for a run after
        :meth:`release` (a decoder keeps its paged models, and their CUDA graphs, from call to call)."""
        # transformers' forward needs the paged attention; a lean forward without graphs never calls it, and
        # the model keeps its own (switching costs about 0.2 ms per model and run)
        if self.lean is not None and self.graphs is None:
            return
        current = self.model.config._attn_implementation
        if current != ATTN_IMPLEMENTATION:
            self._previous_attn = current
            self.model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def release(self) -> None:
        """Give the model its previous attention implementation back (the cache stays as it is)."""
        if self._previous_attn and self._previous_attn != ATTN_IMPLEMENTATION:
            self.model.set_attn_implementation(self._previous_attn)

    def forward(self, seq_ids: Sequence[int], tokens, *, counts: Sequence[int] | None = None,
                every_position: bool = False, logits_at: torch.Tensor | None = None, twins=None) -> torch.Tensor:
        """Feed each sequence its new tokens; return the logits after each one's last new token, ``[B, V]``
        (``every_position``: after every new token, ``[T, V]`` in the order of ``tokens``; ``logits_at``: after
        the new tokens at these places of that order, an int64 tensor on the model's device, ``[len, V]``).

        ``tokens``: one list of ids per sequence, or an int64 tensor of the ids of every sequence in
        order, on any device, with ``counts`` the number of ids of each (default one per sequence): a step
        fed straight from a sampler's output, read back by nothing, so the ids are not range-checked (the
        sampler's are in range by construction).

        ``twins``: ``(twin_ids, of)``, sequences that read the same new tokens as ``seq_ids[of[i]]`` after the
        same tokens as it (candidates with the same response so far, :mod:`ivg.twins`): each gets the keys and
        values computed for those tokens, and no logits of its own (they would be the same). Their lengths are
        checked; their tokens, which the cache does not hold, are the caller's to match.

        On any error the sequences keep their previous lengths (nothing half-appended, no leaked blocks).
        """
        if twins is not None:
            twins = self._check_twins(twins, seq_ids)
        if logits_at is not None:
            if every_position:
                raise ValueError("logits_at: give it or every_position=True, not both")
            if (not isinstance(logits_at, torch.Tensor) or logits_at.dim() != 1 or logits_at.dtype != torch.long
                    or logits_at.device != self.device):
                raise ValueError(f"logits_at: expected a 1-D int64 tensor on {self.device}")
        return self.timed(self._forward, seq_ids, tokens, counts, every_position, logits_at, twins)

    def timed(self, fn, *args):
        """``fn(*args)``, measured by the decoder's :class:`ForwardTimer` when it set one (``timer``)."""
        if self.timer is None:
            return fn(*args)
        token = self.timer.begin(self.device)
        try:
            return fn(*args)
        finally:
            self.timer.end(self.device, token)

    def check_positions(self, seq_ids, lens) -> None:
        """ValueError when a sequence would hold more tokens than the model's positions (``lens``: host lengths)."""
        if self.positions is not None and int(lens.max()) > self.positions:
            i = int(lens.argmax())
            raise ValueError(f"tokens: sequence {seq_ids[i]} would hold {int(lens[i])} tokens, past "
                             f"{type(self.model).__name__}'s {self.positions} positions")

    @staticmethod
    def _check_twins(twins, seq_ids) -> tuple:
        """``twins`` as ``(twin ids, places in seq_ids)``, checked, or None when there are none."""
        try:
            twin_ids, of = twins
            twin_ids, of = [int(s) for s in twin_ids], [int(j) for j in of]
        except (TypeError, ValueError):
            raise ValueError("twins: expected (twin_ids, of): two lists of ints of one length") from None
        if len(twin_ids) != len(of) or not all(0 <= j < len(seq_ids) for j in of):
            raise ValueError(f"twins: expected (twin_ids, of) of one length with each of in [0, {len(seq_ids)})")
        if len(set(twin_ids)) != len(twin_ids) or not set(twin_ids).isdisjoint(seq_ids):
            raise ValueError("twins: expected each twin once, and none of them in seq_ids")
        return (twin_ids, of) if twin_ids else None

    def _flat_tokens(self, seq_ids, tokens, counts):
        """``(flat ids [T], new tokens per sequence)``, checked."""
        if not seq_ids:
            raise ValueError("seq_ids: expected at least one sequence")
        if isinstance(tokens, torch.Tensor):
            try:
                counts = [1] * len(seq_ids) if counts is None else [operator.index(c) for c in counts]
            except TypeError:
                raise ValueError(f"counts={counts!r}: expected {len(seq_ids)} ints >= 1") from None
            if len(counts) != len(seq_ids) or min(counts, default=1) < 1:
                raise ValueError(f"counts: expected {len(seq_ids)} counts >= 1, got {counts}")
            if tokens.dim() != 1 or tokens.shape[0] != sum(counts) or tokens.dtype != torch.long:
                raise ValueError(f"tokens: expected an int64 tensor [{sum(counts)}] (the sum of counts), "
                                 f"got {tokens.dtype} {list(tokens.shape)}")
            return tokens, counts
        if counts is not None:
            raise ValueError("counts: only with a tensor of tokens (lists carry their own lengths)")
        if not hasattr(tokens, "__len__") or isinstance(tokens, (str, bytes)):
            raise ValueError(f"tokens={type(tokens).__name__}: expected one list of ids per sequence, or an int64 tensor "
                             "with counts")
        if len(tokens) != len(seq_ids):
            raise ValueError(f"tokens: expected one token list per sequence ({len(seq_ids)}), got {len(tokens)}")
        try:  # (no check per row up front: a boundary feeds a thousand rows' lists on the decode path)
            counts = [len(t) for t in tokens]
            ids = [int(x) for t in tokens for x in t]
        except (TypeError, ValueError):
            raise ValueError("tokens: expected one list of ids per sequence, or an int64 tensor with counts") from None
        if any(c == 0 for c in counts):
            raise ValueError("tokens: expected at least one new token per sequence")
        if min(ids) < 0 or max(ids) >= self.config_vocab:
            raise ValueError(f"tokens: ids must lie in [0, {self.config_vocab})")
        return torch.tensor(ids, dtype=torch.long), counts

    @torch.inference_mode()
    def _forward(self, seq_ids, tokens, counts, every_position, logits_at=None, twins=None):
        seq_ids = as_list("seq_ids", seq_ids, "a sequence of the cache's sequence ids")
        flat, counts = self._flat_tokens(seq_ids, tokens, counts)
        q = counts[0]
        uniform = all(c == q for c in counts)
        twin_ids, of = twins if twins is not None else ([], [])
        if twin_ids:  # (before any change)
            try:
                twin_lens = self.blocks.seq_lens(twin_ids)
            except ValueError as e:
                raise ValueError(f"twins: {e}") from None
            if not torch.equal(twin_lens, self.blocks.seq_lens(seq_ids)[of]):
                raise ValueError("twins: a twin sequence holds another number of tokens than the one it reads with")
        every = counts + [counts[j] for j in of]  # new tokens per sequence, twins last
        # one count for all as an int: the block manager skips checking a list per row (an error leaves the
        # cache as it was)
        slots = self.cache.append(seq_ids + twin_ids, q if uniform else every)
        try:
            table, lens = self.blocks.tables(seq_ids)
            self.check_positions(seq_ids, lens)
            decode = uniform and q == 1  # one new token per sequence
            if uniform:  # q new tokens per sequence, the j-th at its new length - q + j
                cu = torch.arange(0, q * len(counts) + 1, q, dtype=torch.int32)
                positions = lens.long() - 1 if decode else ((lens.long() - q).unsqueeze(1) + torch.arange(q)).flatten()
            else:
                n_new = torch.tensor(counts)
                cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
                cu[1:] = n_new.cumsum(0)
                # position of each new token: its sequence's old length plus its index among the new ones
                positions = (lens - n_new - cu[:-1]).repeat_interleave(n_new) + torch.arange(len(flat))
            groups = self._group_lists(table, lens) if decode and self.shared_prefix else None
            # graphs replay decode steps, and extends of q tokens per row with logits at every position
            if self.graphs is not None and logits_at is None and (decode or every_position) and uniform and not twin_ids:
                self.attach()  # (a no-op when attached)
                logits = self.graphs.run(flat, positions, slots, table, lens, groups, q=q)
                if logits is not None:
                    return logits
            on_host = flat.device.type == "cpu"  # ids from lists; a sampler's stay where they are
            rope_lens = self._rope_lens(lens, counts)
            moved = to_device_many([table, lens, cu, positions] + ([flat] if on_host else [])
                                   + ([] if rope_lens is None else [rope_lens]), self.device)
            table_d, lens_d, cu_d, pos = moved[:4]
            ids = moved[4] if on_host else flat
            batch = PagedBatch(
                cache=self.cache, slot_mapping=slots, block_table=table_d, seq_lens=lens_d, cu_seqlens_q=cu_d,
                max_seqlen_q=max(counts), is_decode=decode, backend=attention_backend(self.backend, self.cache.pool.kv),
                groups=None if groups is None else self._groups_on_device(groups),
                write_rows=self._twin_rows(counts, of) if twin_ids else None,
            )
            # the logits after each sequence's last new token: every token's for a decode step (no gather)
            keep = logits_at if logits_at is not None else None if every_position or decode else (cu_d[1:] - 1).long()
            if rope_lens is None:
                return self._run(ids, pos, keep, batch)
            with self.row_rope.rows(moved[-1]):  # longrope rows on both sides of the switch
                return self._run(ids, pos, keep, batch)
        except BaseException:
            self.cache.truncate_appended(seq_ids + twin_ids, every)
            raise

    def _twin_rows(self, counts, of) -> torch.Tensor:
        """``PagedBatch.write_rows`` on the device: the new tokens in order, then each twin's source's (numpy: a
        fifth of torch's cost per operation on these few hundred indices, once per forward of every model)."""
        n = np.asarray(counts, dtype=np.int64)
        start = np.cumsum(n) - n  # each sequence's first new token
        at, m = start[of], n[of]
        # twin token g (of the twins' tokens, in order) is token g - o of its source's, o the twin's first g
        src = np.repeat(at - (np.cumsum(m) - m), m) + np.arange(int(m.sum()))
        return to_device(torch.from_numpy(np.concatenate([np.arange(int(n.sum())), src])), self.device)

    def _run(self, ids, pos, keep, batch):
        """The model's forward over the packed tokens ``ids`` at ``pos`` (lean where it can)."""
        if self.lean is not None:
            return self.lean(ids, pos, keep, batch)
        return self.model_forward(ids.unsqueeze(0), pos.unsqueeze(0), 0 if keep is None else keep, batch)

    def model_forward(self, input_ids, position_ids, keep, batch: PagedBatch) -> torch.Tensor:
        """transformers' forward over ``batch`` (ids and positions ``[1, T]``; ``keep``: transformers'
        ``logits_to_keep``, 0 or a tensor of positions, never a positive int: with one, Gemma 3n and 4 would pass
        their KV-sharing layers only the last queries), checked to have attended through the paged cache at every
        layer; logits ``[T', V]``."""
        batch.attended = 0
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep,
                         ivg_batch=batch)
        check_attended(self, batch)
        return out.logits[0]

    __call__ = forward

    def _rope_lens(self, lens, counts):
        """Each new token's sequence length after the forward (host int32 ``[T]``) where a longrope model's
        sequences lie on both sides of its switch; else None (transformers' own choice is then each one's)."""
        if self.row_rope is None:
            return None
        past = lens > self.row_rope.switch
        if not bool(past.any()) or bool(past.all()):
            return None
        return lens.repeat_interleave(torch.tensor(counts))

    def _group_lists(self, table, lens):
        """``(group_starts, shared_lens, max_group_rows)`` of the rows as host lists, or None when no two
        rows share a block (or, for ``shared_prefix=None``, when they share too little for it to pay)."""
        if self.shared_prefix == "auto" and int(lens.sum()) < SHARED_PREFIX_MIN_TOKENS * len(lens):
            return None  # the rows are too short to share that much
        starts, shared = prefix_groups(table.numpy(), lens.numpy(), self.blocks.block_size)
        sizes = [b - a for a, b in zip(starts, starts[1:])]
        most = max(sizes)
        if most < 2:
            return None
        if (self.shared_prefix == "auto"
                and sum(s * n for s, n in zip(shared, sizes)) < SHARED_PREFIX_MIN_TOKENS * len(lens)):
            return None
        return list(starts), list(shared), most

    def _groups_on_device(self, groups):
        starts, shared, most = groups
        starts_d, shared_d = to_device_many([torch.tensor(starts, dtype=torch.int32),
                                             torch.tensor(shared, dtype=torch.int32)], self.device)
        return starts_d, shared_d, most
