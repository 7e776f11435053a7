"""Twin rows: candidates of one prompt whose responses are the same so far.

Sampled candidates of a prompt often draw the same tokens: at temperature 0.7 on the ``ivg demo`` models, a
third of the rows a chunk search (W = K = 4) feeds in a step are twins of another row of their prompt. Twins
have the same prompt and response, so every model's forward gives them the same logits and writes them the
same keys and values. Where the host reads every step's tokens (on the CPU), the decoder computes one row of
each set of twins and gives the others its keys and values (written into their own KV sequences) and its
logits (``twins=`` of :meth:`ivg.PagedModel.forward`): the same results, less work. Each candidate still draws
with its own random key, so twins part again as their draws differ.

Twins are tracked by class, not by comparing responses: all candidates of a newly admitted prompt form one
class; a child inherits its parent's class; and a class splits by the token each of its rows reads next.
Two rows of one class have the same response, so a row's twins are those of its class reading its token.
"""
from __future__ import annotations

import itertools


class Twins:
    """Hands out twin classes (:attr:`ivg.search.Beam.twin`) and finds the twins among rows about to read."""

    def __init__(self):
        self._ids = itertools.count()

    def new_class(self) -> int:
        """A class of its own (a newly admitted prompt's candidates)."""
        return next(self._ids)

    def split(self, beams) -> tuple[list[int], list[int]]:
        """For ``beams`` about to read their last token: :func:`first_of` their twins (same class, same token).
        Each beam's class becomes that of its response with the token."""
        first, pick = first_of([(b.twin, b.tokens[-1]) for b in beams])
        ids = [next(self._ids) for _ in first]
        for b, j in zip(beams, pick):
            b.twin = ids[j]
        return first, pick


def twin_args(slots, first, pick) -> tuple:
    """``(the sequences computed, twins=)`` for :meth:`ivg.PagedModel.forward` from :func:`first_of`'s ``(first,
    pick)`` of rows holding ``slots``: the first of each set, and the others with the place of their first among
    those."""
    others = [(s, j) for i, (s, j) in enumerate(zip(slots, pick)) if first[j] != i]
    return [slots[i] for i in first], ([s for s, _ in others], [j for _, j in others])


def first_of(keys) -> tuple[list[int], list[int]]:
    """``(first, pick)``: the index of the first of each distinct key, in order, and for every key the place in
    ``first`` of its first."""
    seen: dict = {}
    first, pick = [], []
    for i, key in enumerate(keys):
        j = seen.setdefault(key, len(first))
        if j == len(first):
            first.append(i)
        pick.append(j)
    return first, pick
