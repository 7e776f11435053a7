"""``benchmarks/batch_invariance.py``: prompts decoded together against each alone. Its comparison counts the prompts
whose best response differs, the first position where one does and the score gap where the tokens agree; end to end
on random-weight tiny models in bfloat16 on the CPU, where the decoder's results do not depend on the batch since the
CPU attention computes 16-bit inputs in float64. With the float32 attention before that fix, the end-to-end test's 32
prompts gave one IVG prompt another best response together than alone (2026-12-07, this 2-core AMD EPYC; 6 prompts
had shown nothing); ``test_attention_kernels.py::test_16_bit_references_give_a_row_the_same_bits_in_any_batch`` is
the fix's regression test on every machine, since which rows round differently depends on the CPU's kernels."""
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from benchmarks import batch_invariance  # noqa: E402


def _result(tokens, score):
    return SimpleNamespace(beams=[SimpleNamespace(tokens=list(tokens), score=score)])


def test_the_comparison_counts_differing_prompts_their_first_position_and_the_score_gap():
    together = [_result([1, 2, 3], 2.0), _result([4, 5, 6], -0.5), _result([7, 8], 1.0), _result([9], None)]
    alone = [_result([1, 2, 3], 2.0 + 4e-7), _result([4, 9, 6], -0.5), _result([7, 8, 0], 1.0), _result([9], None)]
    got = batch_invariance.compare(together, alone)
    # prompt 1 differs at position 1, prompt 2 where the shorter one ends (2); the gap is relative to |2.0|
    assert got["differ"] == 2 and got["first"] == 1
    assert got["score_gap"] == pytest.approx(2e-7, rel=1e-6)
    assert batch_invariance.compare(together[:1], together[:1]) == dict(differ=0, first=None, score_gap=0.0)
    with pytest.raises(ValueError, match="together and alone"):
        batch_invariance.compare(together, alone[:2])


def test_bf16_prompts_decode_alike_together_and_alone_end_to_end(tmp_path, capsys, one_thread):
    argv = ["--models", "tiny-random", "--dtype", "bfloat16", "--prompts", "32", "--max-new-tokens", "10",
            "--modes", "eft", "ivg", "--work", str(tmp_path)]
    assert batch_invariance.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("0 of 32 prompts differ from the prompt decoded alone") == 2, out


def test_bad_arguments_are_refused_by_name(capsys):
    for argv, name in ((["--prompts", "1"], "--prompts"), (["--speculate", "-1"], "--speculate"),
                       (["--threads", "0"], "--threads"), (["--max-new-tokens", "0"], "--max-new-tokens")):
        with pytest.raises(SystemExit):
            batch_invariance.main(argv)
        assert name in capsys.readouterr().err
