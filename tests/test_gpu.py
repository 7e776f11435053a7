"""GPU-only checks: torch.compile(fullgraph=True) and CUDA-graph replay of the fused sampler.

Skipped without a CUDA device (the Triton interpreter cannot run under torch.compile). Every other
test file also runs on the GPU when one is present: parity tests move their inputs to CUDA.
"""
import pytest
import torch

import ivg_kernels

pytestmark = pytest.mark.gpu


def _inputs(n=16, v=50257):
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(n, v, device="cuda", generator=gen).bfloat16()  # noqa: E731
    return mk(), mk(), mk()


def _step(base, tune, ref, seed, offset):
    out = ivg_kernels.guided_sample(
        base, [(tune, 1.0), (ref, -1.0)], temperature=0.7, top_k=50, seed=seed, offset=offset, backend="triton"
    )
    return out.tokens, out.logprob, out.input_logprobs


def test_torch_compile_fullgraph_matches_eager():
    base, tune, ref = _inputs()
    seed = torch.arange(16, device="cuda")
    offset = torch.full((16,), 3, device="cuda")
    eager = _step(base, tune, ref, seed, offset)
    compiled = torch.compile(_step, fullgraph=True)(base, tune, ref, seed, offset)
    assert torch.equal(eager[0], compiled[0])
    torch.testing.assert_close(eager[1], compiled[1])


def test_cuda_graph_replay_follows_the_offset_tensor():
    base, tune, ref = _inputs()
    seed = torch.arange(16, device="cuda")
    offset = torch.zeros(16, dtype=torch.int64, device="cuda")
    _step(base, tune, ref, seed, offset)  # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(base, tune, ref, seed, offset)
    for step in range(1, 4):
        offset.fill_(step)
        graph.replay()
        expected = _step(base, tune, ref, seed, offset)
        assert torch.equal(captured[0], expected[0])
