"""Result types shared by every backend."""
from __future__ import annotations

from typing import NamedTuple

import torch


class SampleOutput(NamedTuple):
    """What :func:`ivg_kernels.guided_sample` returns. ``N`` rows, ``G`` guides.

    Attributes
    ----------
    tokens : int64 ``[N]``
        The drawn token, or ``-1`` for a row that could not be drawn from (see ``ok``).
    logprob : float ``[N]``
        Log-probability of the token under the final warped distribution
        (temperature, top-k, top-p, min-p). ``0`` for greedy rows.
    logsumexp : float ``[N, 1+G]``
        Each input row's log-sum-exp over the vocabulary ``[:V]`` at temperature 1
        (column 0 is the base logits, column ``i`` guide ``i-1``).
    input_logprobs : float ``[N, 1+G]``
        Each input row's log-softmax at the chosen token.
    input_logits : float ``[N, 1+G]``
        Each input row's raw value at the chosen token.
    ok : bool ``[N]``
        False for a row that was reported, not drawn from: a NaN or ``+inf`` in an
        input or in the combined score, no finite candidate, or an out-of-range
        tensor parameter (temperature < 0 or NaN, top_p outside (0, 1], min_p
        outside [0, 1]). Such a row has token ``-1`` and NaN in every float field.

    Floats are float32 (float64 when the logits are float64).
    """

    tokens: torch.Tensor
    logprob: torch.Tensor
    logsumexp: torch.Tensor
    input_logprobs: torch.Tensor
    input_logits: torch.Tensor
    ok: torch.Tensor

    def check(self) -> "SampleOutput":
        """Raise ``ValueError`` if any row was flagged. Reads ``ok`` on the host (a sync)."""
        bad = (~self.ok).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"guided_sample: rows {bad[:8]}{'...' if len(bad) > 8 else ''} could not be sampled: "
                "NaN or +inf in the inputs, no finite candidate, or an out-of-range tensor parameter"
            )
        return self
