"""pytest-benchmark entries for the sampler on the CPU (the GPU numbers come from bench_sampling.py).

    python -m pytest benchmarks/test_bench_sampling.py --benchmark-only
"""
import pytest
import torch

from benchmarks.bench_sampling import CONFIGS, make_fn

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("provider", ["composition", "reference"])
@pytest.mark.parametrize("n,v", [(1, 32000), (16, 50257)])
def test_sampling(benchmark, provider, n, v):
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    base, tune, ref = (torch.randn(n, v, generator=gen).bfloat16() for _ in range(3))
    fn = make_fn(provider, base, tune, ref, CONFIGS["imdb"], device)
    benchmark.extra_info["bytes"] = 3 * n * v * 2
    benchmark(fn)
