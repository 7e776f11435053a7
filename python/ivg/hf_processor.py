"""``IVGLogitsProcessor``: token-wise IVG guidance inside transformers' ``generate()``.

Adds ``sum_i beta_i * (log_softmax(tuned_i) - log_softmax(ref_i)) + w * Q`` to the base scores, running
each guide model incrementally on its own ``DynamicCache``. Works with greedy search, sampling and
beam search: when ``generate`` reorders beams, the processor finds each row's parent by its prefix and
reorders its caches to match (and rebuilds them from scratch if a row has no parent).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .models import _finite, cache_kwargs, guide_triples


class IVGLogitsProcessor:
    """A transformers ``LogitsProcessor``.

    Parameters
    ----------
    guides : sequence of ``(tuned_model, ref_model, beta)``
    token_rm : optional token reward model (its logits are ``Q``), with ``token_rm_weight``
    pad_token_id : the padding id of left-padded batches (each row's leading pads are masked, as
        ``generate``'s attention mask masks them; the id later in a row is a token like any other, but a
        prompt that starts with it reads as padded: the processor does not see the attention mask)
    vocab_size : columns shared by all models (default: the narrowest); base columns past it get -inf
    """

    def __init__(self, guides: Sequence = (), token_rm=None, token_rm_weight: float = 1.0,
                 pad_token_id: Optional[int] = None, vocab_size: Optional[int] = None):
        self.pairs = guide_triples(guides)
        if not self.pairs and token_rm is None:
            raise ValueError("guides: expected at least one (tuned, ref, beta) pair or a token_rm")
        self.token_rm = token_rm
        self.token_rm_weight = _finite("token_rm_weight", token_rm_weight)
        self.pad_token_id = pad_token_id
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size={vocab_size!r}: expected None or an int >= 1")
        self.vocab_size = vocab_size
        self._models = [m for t, r, _ in self.pairs for m in (t, r)] + ([token_rm] if token_rm is not None else [])
        self.reorders = 0  # times the caches followed a beam reordering
        self._reset()

    def _reset(self):
        self._caches = None
        self._seen: Optional[torch.Tensor] = None  # input_ids already fed, [B, T]
        self._last: list = []

    def _mask(self, ids):
        """The attention mask of a left-padded batch: 0 on each row's leading pads only (the pad id later in a
        row, in its prompt or drawn, is a token the base attends to)."""
        if self.pad_token_id is None:
            return torch.ones_like(ids)
        return (ids != self.pad_token_id).long().cummax(dim=-1).values

    @torch.no_grad()
    def _run(self, ids: torch.Tensor):
        """Logits of every model at the last position, feeding only what the caches lack."""
        from transformers import DynamicCache

        if self._seen is not None and ids.shape[1] == self._seen.shape[1] + 1 and ids.shape[0] == self._seen.shape[0]:
            prev = ids[:, :-1]
            if not torch.equal(prev, self._seen):  # beam search reordered the rows: follow it
                match = (prev[:, None, :] == self._seen[None, :, :]).all(-1)  # [B, B_old]
                if not match.any(1).all():
                    self._reset()
                    return self._run(ids)
                parent = match.float().argmax(1)
                self.reorders += 1
                for c in self._caches:
                    c.reorder_cache(parent)
            new = ids[:, -1:]
        else:
            self._reset()
            self._caches = [DynamicCache(config=m.config) for m in self._models]
            new = ids
        mask = self._mask(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        self._last = [m(input_ids=new, attention_mask=mask, position_ids=pos, use_cache=True,
                        **cache_kwargs(m, c)).logits[:, -1] for m, c in zip(self._models, self._caches)]
        self._seen = ids.clone()
        return self._last

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids: expected an integer tensor [batch, length], got {_kind(input_ids)}")
        if (not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.dtype.is_floating_point
                or scores.shape[0] != input_ids.shape[0]):
            raise ValueError(f"scores: expected a float tensor [{input_ids.shape[0]}, vocab] (input_ids' rows), got "
                             f"{_kind(scores)}")
        outs = self._run(input_ids)
        widest = min([scores.shape[-1]] + [o.shape[-1] for o in outs])
        if self.vocab_size is not None and self.vocab_size > widest:
            raise ValueError(f"vocab_size={self.vocab_size}: expected at most {widest}, the narrowest of the scores "
                             "and the guides' logits")
        v = self.vocab_size or widest
        add = torch.zeros(scores.shape[0], v, dtype=torch.float32, device=scores.device)
        for k, (_, _, beta) in enumerate(self.pairs):
            tuned, ref = outs[2 * k][:, :v].float(), outs[2 * k + 1][:, :v].float()
            add += beta * (torch.log_softmax(tuned, -1) - torch.log_softmax(ref, -1))
        if self.token_rm is not None:
            add += self.token_rm_weight * outs[-1][:, :v].float()
        out = torch.full_like(scores, float("-inf"))
        out[:, :v] = scores[:, :v] + add.to(scores.dtype)
        return out


def _kind(x) -> str:
    """A tensor's dtype and shape, or another value's type, for an error message."""
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
