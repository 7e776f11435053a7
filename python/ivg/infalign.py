"""InfAlign's inference-time measures (arXiv 2412.19792), on rewards of samples per prompt.

* calibrated reward: ``C(x, y) = P_{y' ~ pi_ref(.|x)}[ r(x, y') <= r(x, y) ]``, estimated with the
  reference policy's samples for the same prompt;
* inference-time win rate against the reference policy:
  ``E_x E_{y ~ pi, y' ~ pi_ref}[ 1(r(y) > r(y')) + 1/2 * 1(r(y) = r(y')) ]``.
"""
from __future__ import annotations

import math
from typing import Sequence


def _numbers(name: str, values) -> list:
    """``values`` as floats; a NaN (a reward that was never computed: it would count as a loss in every
    comparison) or anything but a number is an error naming its place."""
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}]={v!r}: expected a number") from None
        if math.isnan(x):
            raise ValueError(f"{name}[{i}]=nan: expected a reward (not NaN)")
        out.append(x)
    return out


def _length(name: str, values) -> int:
    """``len(values)``, or an error naming ``name`` where ``values`` is no sequence (a number, None)."""
    try:
        return len(values)
    except TypeError:
        raise ValueError(f"{name}={values!r}: expected a sequence of rewards") from None


def calibrated_reward(reward: float, reference_rewards: Sequence[float]) -> float:
    """Fraction of the reference samples' rewards at or below ``reward``."""
    if _length("reference_rewards", reference_rewards) == 0:
        raise ValueError("reference_rewards: expected at least one reward of a reference sample")
    try:
        (reward,) = _numbers("reward", [reward])
    except ValueError:
        raise ValueError(f"reward={reward!r}: expected a number (not NaN)") from None
    ref = _numbers("reference_rewards", reference_rewards)
    return sum(r <= reward for r in ref) / len(ref)


def win_rate(policy_rewards: Sequence[Sequence[float]], reference_rewards: Sequence[Sequence[float]]) -> float:
    """Mean over prompts of P[policy beats reference], ties counting one half.

    Both arguments hold, per prompt, the rewards of that prompt's samples (lists, or NumPy or torch arrays
    ``[prompts, samples]``).
    """
    n, m = _length("policy_rewards", policy_rewards), _length("reference_rewards", reference_rewards)
    if n != m or n == 0:  # (arrays have no truth value)
        raise ValueError(f"policy_rewards/reference_rewards: expected the same non-zero number of prompts, got "
                         f"{n} and {m}")
    total = 0.0
    for i, (pol, ref) in enumerate(zip(policy_rewards, reference_rewards)):
        if _length(f"policy_rewards[{i}]", pol) == 0 or _length(f"reference_rewards[{i}]", ref) == 0:
            raise ValueError(f"prompt {i}: expected at least one policy and one reference reward")
        pol, ref = _numbers(f"policy_rewards[{i}]", pol), _numbers(f"reference_rewards[{i}]", ref)
        wins = sum((a > b) + 0.5 * (a == b) for a in pol for b in ref)
        total += wins / (len(pol) * len(ref))
    return total / len(policy_rewards)
