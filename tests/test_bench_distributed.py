"""``benchmarks/bench_distributed.py`` end to end on the CPU (torchrun, gloo): it reads each run's time from
`ivg generate`'s summary line, which it must keep parsing as that line changes (from 95fd7cf until 2026-12-07 it
looked for "s wall", which the line no longer held, and every run failed), and compares the ranks' output with one
process's: the same tokens, float32 values up to the rounding of another batch."""
import pytest

pytest.importorskip("transformers")

from benchmarks import bench_distributed  # noqa: E402


def test_the_benchmark_runs_and_reads_each_runs_time(capsys):
    assert bench_distributed.main(["--prompts", "3", "--max-new-tokens", "3", "--repeats", "1", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompts/s") == 3, out  # 1 rank x 1 thread, 1 rank x every thread, 2 ranks x 1 thread
    assert "outputs of 2 ranks and 1 rank: the same prompts, tokens and texts: True" in out


def test_outputs_differing_in_the_values_last_digits_are_the_same_but_other_tokens_are_not():
    line = '{"index": 0, "prompt": "a", "text": "cii", "tokens": [4, 10, 10], "score": %s, "implicit_value": -0.45, ' \
           '"explicit_value": %s}'
    a = line % ("-0.02569656447", "-0.02569656447")
    b = line % ("-0.02569659986", "-0.02569659986")
    same, gap = bench_distributed.same_outputs(a, b)
    assert same and 3e-8 < gap < 4e-8
    assert not bench_distributed.same_outputs(a, b.replace("[4, 10, 10]", "[4, 10, 11]"))[0]
    assert not bench_distributed.same_outputs(a, a + "\n" + a)[0]


def test_the_summary_line_is_parsed_and_anything_else_is_an_error():
    line = ("ivg generate: 3 prompts decoded in 0.42 s, 61 tokens drawn by all candidates (145.2 tokens/s); "
            "the 3 best responses hold 9 tokens")
    assert bench_distributed.generation_seconds("noise\n" + line + "\n") == 0.42
    assert bench_distributed.generation_seconds(line.replace("3 prompts", "1 prompt")) == 0.42
    with pytest.raises(RuntimeError, match="no wall time"):
        bench_distributed.generation_seconds("ivg generate: 3 prompts decoded, 0.42 s wall")
