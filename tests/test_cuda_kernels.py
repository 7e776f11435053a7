"""The CUDA kernels of csrc/ on a GPU: the sampler against the reference at large shapes, its
determinism and graph replay, its input errors, and the copy-on-write block copy.

(The sampler's full parity grid runs in test_sampling_parity.py, once per kernel.)
Skipped without a CUDA device or without nvcc to build csrc/.
"""
import pytest
import torch

import ivg_kernels
from ivg_kernels._args import prepare_sample_args
from ivg_kernels.kv_pool import KVPool
from ivg_kernels.reference.sampling import _guided_sample_ref

from .helpers import assert_close

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda_build():
    from ivg_kernels.build import cuda_backend_available

    if not torch.cuda.is_available() or not cuda_backend_available():
        pytest.skip("needs a CUDA device and a build of csrc/")


def _rows(n, v, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(n, v, device="cuda", generator=gen) * 3).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n,v", [(1, 151936), (64, 128256), (300, 50257)])
@pytest.mark.parametrize("cfg", [dict(top_k=0, top_p=1.0), dict(top_k=50, top_p=1.0), dict(top_k=0, top_p=0.9),
                                 dict(top_k=40, top_p=0.8, min_p=0.01)], ids=["plain", "topk", "topp", "all"])
def test_cuda_sampler_matches_reference_at_model_shapes(n, v, cfg):
    base, tune, ref = _rows(n, v, torch.bfloat16, n + v)
    seed = torch.randint(0, 1 << 62, (n,), device="cuda")
    a = prepare_sample_args(base, [(tune, 1.5), (ref, -1.5)], 0.7, cfg["top_k"], cfg["top_p"], cfg.get("min_p", 0.0),
                            seed, 11, None)
    want = _guided_sample_ref(a)
    got = ivg_kernels.guided_sample(base, [(tune, 1.5), (ref, -1.5)], temperature=0.7, seed=seed, offset=11,
                                    backend="cuda", **cfg)
    assert torch.equal(got.ok, want.ok) and bool(got.ok.all())
    assert torch.equal(got.tokens, want.tokens)
    for name in ("logprob", "logsumexp", "input_logprobs", "input_logits"):
        assert_close(getattr(got, name), getattr(want, name), torch.float32, name, scale=10.0)


def test_cuda_sampler_is_deterministic_and_replays_in_a_graph():
    base, tune, ref = _rows(16, 32000, torch.float16, 3)
    seed = torch.arange(16, device="cuda")
    offset = torch.zeros(16, dtype=torch.int64, device="cuda")

    def step():
        return ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], temperature=1.0, top_p=0.95, seed=seed,
                                         offset=offset, backend="cuda")

    a, b = step(), step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # bitwise: fixed-order reductions, integer histograms
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in range(1, 4):
        offset.fill_(t)
        graph.replay()
        eager = step()
        assert torch.equal(captured.tokens, eager.tokens)
        assert torch.equal(captured.logprob, eager.logprob)


def test_cuda_sampler_frequencies_follow_the_softmax():
    v, n = 8, 4096
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 0.2]], device="cuda").repeat(n, 1)
    out = ivg_kernels.guided_sample(logits, seed=torch.arange(n, device="cuda"), offset=5, backend="cuda")
    freq = torch.bincount(out.tokens, minlength=v).double() / n
    p = logits[0].double().softmax(-1)
    sd = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sd + 1e-9).all(), (freq.tolist(), p.tolist())


def test_cuda_sampler_rejects_mixed_dtypes_and_cpu_tensors():
    base = torch.randn(2, 10, device="cuda")
    with pytest.raises(ValueError, match=r"guides\[0\]\[0\]: dtype"):
        ivg_kernels.guided_sample(base, [(base.half(), 1.0)], seed=0, offset=0, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'.*cpu"):
        ivg_kernels.guided_sample(base.cpu(), seed=0, offset=0, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'.*float64"):
        ivg_kernels.guided_sample(base.double(), seed=0, offset=0, backend="cuda")


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 3), (torch.float32, 5)])
def test_cuda_copy_blocks_matches_the_reference(dtype, head_dim):
    pools = [KVPool(3, 40, 4, 2, head_dim, dtype=dtype, device="cuda") for _ in range(2)]
    init = torch.randn_like(pools[0].kv, dtype=torch.float32).to(dtype)
    for p in pools:
        p.kv.copy_(init)
    copies = [(0, 7), (3, 39), (12, 1), (5, 6)]
    pools[0].copy_blocks(copies, backend="reference")
    pools[1].copy_blocks(copies, backend="cuda")
    assert torch.equal(pools[0].kv, pools[1].kv)
    assert pools[0].bytes_copied == pools[1].bytes_copied > 0
    untouched = [b for b in range(40) if b not in (7, 39, 1, 6)]
    assert torch.equal(pools[1].kv[:, :, untouched], init[:, :, untouched])
