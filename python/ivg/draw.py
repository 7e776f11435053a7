"""What one decode step draws and keeps: the fused sampler's call over the models' logits, and the
record of the step (flag, token, log-prob, implicit and explicit values) the host reads later.

:class:`StepDraw` holds everything the call depends on besides the logits and the keys, as plain
values, so that the eager step (``DecodeLoop.sample``) and a step replayed from one CUDA graph
(:mod:`ivg.step_graphs`) make the same call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import ivg_kernels

from .search import sampler_guides


DECODER_BACKENDS = ("auto", "reference", "triton")


def decoder_backend(backend) -> str:
    """A decoder's ``backend``, checked before anything runs: its sampler and attention take ``"auto"``,
    ``"reference"`` or ``"triton"`` (neither has a CUDA kernel: ``csrc/`` holds the copy-on-write block
    copy, which runs where the measured table says it wins, whatever the decoder's backend)."""
    if backend == "cuda":
        raise ValueError("backend='cuda': a decoder's sampler and attention have no CUDA kernel (csrc/ holds the "
                         "block copy, which runs where the measured table says it wins); expected 'auto', "
                         "'reference' or 'triton'")
    if not isinstance(backend, str) or backend not in DECODER_BACKENDS:
        raise ValueError(f"backend={backend!r}: expected 'auto', 'reference' or 'triton'")
    return backend


@dataclass(frozen=True)
class StepDraw:
    """The sampler's settings for one decoding run; hashable (a key of the step graphs)."""

    names: tuple  # the models run every step, in order; "rm" among them when the token RM guides
    guides: tuple  # ((index, beta), ...) of the guide pairs
    eft: bool  # the guide pairs steer the draw (else they only score)
    w_rm: float  # the token RM's weight in the draw (0: it only scores)
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    vocab: int
    backend: str

    def draw(self, cur: dict, seed: torch.Tensor, offset: torch.Tensor):
        """One fused draw for every row of ``cur`` (model name -> logits ``[N, V]``)."""
        return ivg_kernels.guided_sample(
            cur["base"], sampler_guides(cur, self.guides, self.eft, self.w_rm), temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=seed, offset=offset, vocab_size=self.vocab,
            backend=self.backend)

    def values(self, input_logprobs: torch.Tensor, input_logits: torch.Tensor):
        """Each drawn token's implicit value (sum of beta * (log pi_tune - log pi_ref)) and explicit value
        (the token RM's raw value when it is a sampler input, else NaN), float64, from the sampler's
        per-input outputs ``[..., 1 + G]`` (inputs: base, the guide pairs, then the token RM)."""
        lp = input_logprobs.double()
        implicit = torch.zeros(lp.shape[:-1], dtype=torch.float64, device=lp.device)
        for k, (_, beta) in enumerate(self.guides):
            implicit += beta * (lp[..., 1 + 2 * k] - lp[..., 2 + 2 * k])
        rm_input = "rm" in self.names  # a token RM run every step is the sampler's last input
        return implicit, input_logits[..., -1].double() if rm_input else torch.full_like(implicit, torch.nan)

    def record(self, sample) -> torch.Tensor:
        """The step's record, float64 ``[N, 5]``: ok, token, log-prob, implicit value, explicit value."""
        implicit, explicit = self.values(sample.input_logprobs, sample.input_logits)
        return torch.stack([sample.ok.double(), sample.tokens.double(), sample.logprob.double(), implicit, explicit],
                           dim=1)
