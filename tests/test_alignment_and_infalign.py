"""Alignment vectors and InfAlign's measures."""
import pytest
import torch

from ivg.alignment_vectors import apply_alignment_vectors
from ivg.infalign import calibrated_reward, win_rate

from .decoder_fixtures import lm


def test_lambda_zero_is_the_base_and_one_is_the_aligned_model():
    base, aligned, ref = lm("gpt2", 1), lm("gpt2", 2), lm("gpt2", 1)
    same = apply_alignment_vectors(base, [(aligned, ref, 0.0)])
    for k, v in base.state_dict().items():
        assert torch.equal(same.state_dict()[k], v)
    moved = apply_alignment_vectors(ref, [(aligned, ref, 1.0)])  # base + (aligned - base) = aligned
    for k, v in aligned.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(moved.state_dict()[k], v, rtol=0, atol=1e-12)
    assert not torch.equal(base.state_dict()["lm_head.weight"], moved.state_dict()["lm_head.weight"])
    # not in place: a new model; the one given is as it was
    assert moved is not ref and same is not base
    for k, v in lm("gpt2", 1).state_dict().items():
        assert torch.equal(ref.state_dict()[k], v), k


def test_a_16_bit_model_is_rounded_once():
    """``theta + sum lambda_j (aligned_j - base_j)`` is summed in float64 and rounded to the model's dtype once
    (adding a bfloat16-rounded sum to bfloat16 weights rounds twice, several ulps away on some weights)."""
    base, a1, a2 = (lm("gpt2", s, dtype=torch.bfloat16) for s in (1, 2, 3))
    out = apply_alignment_vectors(base, [(a1, base, 0.3), (a2, base, -0.7)])
    for k, v in base.state_dict().items():
        if v.is_floating_point():
            want = (v.double() + 0.3 * (a1.state_dict()[k].double() - v.double())
                    - 0.7 * (a2.state_dict()[k].double() - v.double())).to(torch.bfloat16)
            assert torch.equal(out.state_dict()[k], want), k


def test_several_vectors_add_and_inplace():
    base, a1, a2 = lm("gpt2", 1), lm("gpt2", 2), lm("gpt2", 3)
    w = base.lm_head.weight.detach().clone()
    out = apply_alignment_vectors(base, [(a1, base, 0.5), (a2, base, -0.25)], inplace=True)
    assert out is base
    expected = w + 0.5 * (a1.lm_head.weight - w) - 0.25 * (a2.lm_head.weight - w)
    torch.testing.assert_close(base.lm_head.weight, expected, rtol=0, atol=1e-12)


def test_mismatched_architectures_are_named():
    gpt, llama = lm("gpt2", 1), lm("llama", 1)
    with pytest.raises(ValueError, match="architecture 'llama' differs"):
        apply_alignment_vectors(gpt, [(llama, gpt, 1.0)])
    bigger = lm("gpt2", 1, layers=3)
    state = dict(bigger.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"][:, :8]
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        apply_alignment_vectors(gpt, [(state, gpt, 1.0)])
    for bad in ("x", True):  # (a bool is an int in Python, not a lambda)
        with pytest.raises(ValueError, match=r"vectors\[0\]\[2\]=.*: expected a finite float lambda"):
            apply_alignment_vectors(gpt, [(gpt, gpt, bad)])
    for bad in (float("nan"), float("inf")):  # would turn every weight into NaN or inf without a word
        with pytest.raises(ValueError, match=r"vectors\[0\]\[2\]=(nan|inf): expected a finite float lambda"):
            apply_alignment_vectors(gpt, [(gpt, gpt, bad)])


def test_calibrated_reward_and_win_rate_by_hand():
    ref = [0.1, 0.5, 0.5, 0.9]
    assert calibrated_reward(0.5, ref) == 0.75  # 0.1, 0.5, 0.5 are <= 0.5
    assert calibrated_reward(0.0, ref) == 0.0 and calibrated_reward(1.0, ref) == 1.0
    # prompt 1: policy 0.5 vs ref [0.1, 0.5, 0.9] -> (1 + 0.5 + 0) / 3 = 0.5; prompt 2: 1.0 vs [0.2] -> 1
    assert win_rate([[0.5], [1.0]], [[0.1, 0.5, 0.9], [0.2]]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same non-zero number of prompts"):
        win_rate([[1.0]], [])
    with pytest.raises(ValueError, match="reference_rewards"):
        calibrated_reward(0.3, [])


def test_a_nan_reward_is_named_not_counted_as_a_loss():
    """A NaN compares false both ways: counted silently it would lose every comparison."""
    nan = float("nan")
    with pytest.raises(ValueError, match=r"policy_rewards\[1\]\[0\]=nan: expected a reward"):
        win_rate([[0.5], [nan]], [[0.1], [0.2]])
    with pytest.raises(ValueError, match=r"reference_rewards\[0\]\[1\]=nan"):
        win_rate([[0.5]], [[0.1, nan]])
    with pytest.raises(ValueError, match=r"reward=nan: expected a number"):
        calibrated_reward(nan, [0.1])
    with pytest.raises(ValueError, match=r"reference_rewards\[0\]='x': expected a number"):
        calibrated_reward(0.3, ["x"])


def test_rewards_that_are_no_sequence_are_named():
    """A number or None where a sequence of rewards belongs failed with "object of type 'float' has no len()"."""
    for call, match in [(lambda: calibrated_reward(0.3, 0.5), r"reference_rewards=0.5: expected a sequence of rewards"),
                        (lambda: win_rate(None, [[0.1]]), r"policy_rewards=None: expected a sequence of rewards"),
                        (lambda: win_rate([[0.1]], 0.2), r"reference_rewards=0.2: expected a sequence of rewards"),
                        (lambda: win_rate([0.5, 0.6], [[0.1], [0.2]]),
                         r"policy_rewards\[0\]=0.5: expected a sequence of rewards")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_win_rate_takes_arrays_of_rewards():
    """A NumPy or torch matrix [prompts, samples] (the natural shape of a reward table) raised "the truth value
    of an array is ambiguous"."""
    import numpy as np

    from ivg.infalign import win_rate

    pol, ref = [[0.1, 0.5], [0.3, 0.2]], [[0.2, 0.5], [0.1, 0.4]]
    expect = (1.5 / 4 + 2 / 4) / 2  # prompt 0: 0.5 beats 0.2 and ties 0.5; prompt 1: 0.3 and 0.2 beat 0.1
    assert win_rate(pol, ref) == pytest.approx(expect)
    assert win_rate(np.array(pol), np.array(ref)) == pytest.approx(expect)
    assert win_rate(torch.tensor(pol), torch.tensor(ref)) == pytest.approx(expect)
    with pytest.raises(ValueError, match="the same non-zero number of prompts"):
        win_rate(np.zeros((0, 2)), np.zeros((0, 2)))
