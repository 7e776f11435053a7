"""``benchmarks/bench_sampling.py``'s guard: on a GPU it times the Triton sampler only where it draws the reference's
tokens on the benchmark's own rows (``reference_mismatches``). Here in the interpreter, on small rows of each kind."""
import pytest
import torch

from benchmarks import bench_sampling as bs


@pytest.mark.parametrize("cfg_name", ["imdb", "alpaca", "top-p-0.9", "top-p-0.95", "min-p-0.05"])
@pytest.mark.parametrize("kind", ["flat", "peaked", "ranked"])
def test_the_triton_sampler_draws_the_reference_tokens_on_the_benchmark_rows(cfg_name, kind):
    n, v = 3, 700
    base, tune, ref = bs.make_rows(kind, n, v, torch.device("cpu"), torch.Generator().manual_seed(n * v))
    assert bs.reference_mismatches(base, tune, ref, bs.CONFIGS[cfg_name], torch.device("cpu")) == 0


def test_a_sampler_that_draws_other_tokens_is_counted(monkeypatch):
    n, v = 4, 700
    base, tune, ref = bs.make_rows("peaked", n, v, torch.device("cpu"), torch.Generator().manual_seed(1))
    real = bs._guided_sample_ref

    def shifted(a):  # the reference with rows 1 and 3 drawing the next token id
        out = real(a)
        return out._replace(tokens=torch.where(torch.arange(n) % 2 == 1, (out.tokens + 1) % v, out.tokens))

    monkeypatch.setattr(bs, "_guided_sample_ref", shifted)
    assert bs.reference_mismatches(base, tune, ref, bs.CONFIGS["imdb"], torch.device("cpu")) == 2
