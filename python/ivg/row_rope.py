"""Rotary frequencies chosen per sequence in a paged forward, for models with ``longrope`` RoPE scaling.

transformers gives a ``longrope`` model (Phi-3 and Phi-3.5 long-context checkpoints, Phi-4-mini, and any
config that names it) short frequency factors while a sequence holds at most
``original_max_position_embeddings`` tokens and long ones past that, and picks them by the *longest*
sequence of a forward (``max(position_ids) + 1``). Run alone, a sequence gets the short factors for every
forward that leaves it at or below the switch and the long ones after; its cache keeps the keys each
forward rotated. A paged forward holds many sequences, so left to transformers one sequence past the
switch would turn every other sequence of the forward to the long factors: results would depend on the
batch.

:class:`RowRope` makes the rotary embedding choose per sequence instead, exactly as that sequence alone
would: each new token is rotated with the long factors when its sequence holds more than the switch after
the forward, with the short ones otherwise. It wraps the rotary module's forward (the family's own code,
called once with each set of frequencies, so the values are bitwise transformers'); outside a paged
forward it makes transformers' choice (by the longest sequence) between the same two.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


class RowRope:
    """The per-sequence choice for one ``longrope`` rotary module (``rotary``), switching past ``switch``
    tokens. Made by :func:`row_rope`; a paged forward runs inside :meth:`rows`."""

    def __init__(self, rotary, switch: int):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.switch = switch
        self.token_lens: Optional[torch.Tensor] = None  # set by rows() for the length of one forward
        short = rotary.original_inv_freq
        long = getattr(rotary, "long_inv_freq", None)
        if long is None:  # as transformers computes it on its first long forward
            long, _ = ROPE_INIT_FUNCTIONS["longrope"](rotary.config, short.device, seq_len=switch + 1)
        # transformers copies its choice into ``inv_freq``, so it is rounded to that buffer's dtype
        long = long.to(device=short.device, dtype=rotary.inv_freq.dtype)
        self._inner = _without_choice(type(rotary).forward)  # the family's forward without transformers' choice
        # views, not the module: nothing here refers to it, so a deep copy of the model copies this consistently
        self._views = (_with_inv_freq(rotary, short), _with_inv_freq(rotary, long))
        rotary.forward = self.forward

    def forward(self, x, position_ids):
        short, long = (self._inner(view, x, position_ids) for view in self._views)
        lens = self.token_lens
        if lens is None:  # not in a paged forward, or all its sequences on one side: transformers' choice
            past = position_ids.max() + 1 > self.switch
        else:  # position_ids: [1, T]; cos, sin: [1, T, D]
            past = (lens > self.switch).view(1, -1, 1)
        return tuple(torch.where(past, a, b) for a, b in zip(long, short))

    @contextlib.contextmanager
    def rows(self, token_lens: Optional[torch.Tensor]):
        """Within: each new token's sequence length after the forward, ``[T]`` on the model's device (None:
        transformers' choice, right when every sequence of the forward is on the same side of the switch)."""
        self.token_lens = token_lens
        try:
            yield
        finally:
            self.token_lens = None


def _without_choice(forward):
    """``forward`` (a rotary module's) without transformers' ``dynamic_rope_update``, the wrapper that picks the
    frequencies by the longest sequence; None where no such wrapper is found. In transformers 5.0 to 5.23
    ``torch.no_grad()`` wrapped it in turn, so ``forward.__wrapped__`` still made transformers' choice: the
    chain is followed to the wrapper whose code is ``dynamic_rope_update``'s (``functools.wraps`` copies the
    names, not the code; the rotary tables need no gradient, so the outer wrappers may go)."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    choice = dynamic_rope_update(lambda self, x, position_ids: None).__code__
    f = forward
    while hasattr(f, "__wrapped__"):
        if getattr(f, "__code__", None) is choice:
            return f.__wrapped__
        f = f.__wrapped__
    return None


def _with_inv_freq(rotary, inv_freq):
    """A view of ``rotary`` (same attributes, no copy of its parameters) whose ``inv_freq`` is ``inv_freq``."""
    view = object.__new__(type(rotary))
    view.__dict__ = dict(rotary.__dict__)
    view.__dict__["_buffers"] = {**rotary._buffers, "inv_freq": inv_freq}
    return view


def row_rope(model, switch: int) -> Optional[RowRope]:
    """The :class:`RowRope` of ``model``'s ``longrope`` rotary embedding (made on first use, then shared by
    every paged model over ``model``), or None where the model's rotary module is not one transformers
    chooses frequencies for in the usual way (one rotary module with one RoPE type, its ``original_inv_freq``,
    its forward wrapped by ``dynamic_rope_update``)."""
    found = [m for m in model.modules() if getattr(m, "rope_type", None) == "longrope"
             and isinstance(getattr(m, "original_inv_freq", None), torch.Tensor)
             and _without_choice(type(m).forward) is not None]
    if len(found) != 1:
        return None
    rotary = found[0]
    made = rotary.__dict__.get("_ivg_row_rope")
    if made is None:
        made = rotary.__dict__["_ivg_row_rope"] = RowRope(rotary, switch)
    return made
