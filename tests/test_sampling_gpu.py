"""The Triton sampler compiled on a GPU: the reference's tokens at model shapes (every filter), bitwise
determinism and CUDA-graph replay, and frequencies. (The parity grid on small shapes runs in
test_sampling_parity.py, on the GPU too.) Skipped without a CUDA device.
"""
import pytest
import torch

import ivg_kernels
from benchmarks.bench_sampling import make_rows
from ivg_kernels._args import prepare_sample_args
from ivg_kernels.reference.sampling import _guided_sample_ref

from .helpers import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _rows(n, v, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(n, v, device="cuda", generator=gen) * 3).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n,v", [(1, 151936), (64, 128256), (300, 50257)])
@pytest.mark.parametrize("cfg", [dict(top_k=0, top_p=1.0), dict(top_k=50, top_p=1.0), dict(top_k=0, top_p=0.9),
                                 dict(top_k=40, top_p=0.8, min_p=0.01)], ids=["plain", "topk", "topp", "all"])
def test_triton_sampler_matches_reference_at_model_shapes(n, v, cfg):
    base, tune, ref = _rows(n, v, torch.bfloat16, n + v)
    seed = torch.randint(0, 1 << 62, (n,), device="cuda")
    a = prepare_sample_args(base, [(tune, 1.5), (ref, -1.5)], 0.7, cfg["top_k"], cfg["top_p"], cfg.get("min_p", 0.0),
                            seed, 11, None)
    want = _guided_sample_ref(a)
    got = ivg_kernels.guided_sample(base, [(tune, 1.5), (ref, -1.5)], temperature=0.7, seed=seed, offset=11,
                                    backend="triton", **cfg)
    assert torch.equal(got.ok, want.ok) and bool(got.ok.all())
    assert torch.equal(got.tokens, want.tokens)
    for name in ("logprob", "logsumexp", "input_logprobs", "input_logits"):
        assert_close(getattr(got, name), getattr(want, name), torch.float32, name, scale=10.0)


@pytest.mark.parametrize("top_p", [0.9, 0.95])
def test_fallback_rows_at_model_shapes_match_reference_through_the_pool_and_the_passes(top_p, monkeypatch):
    """Rows like a language model's (N(0, 1) plus a Zipf-like head), 256 of them at V = 151936: some rows'
    nucleus outgrows the candidates and takes the exact fallback, where every program of a call shares the
    pool (an atomic reservation; a program reads back the entries its threads wrote). The reference's
    tokens, and the same bits with the pool turned off (every such row then takes full-row passes)."""
    from ivg_kernels._triton import sampling_kernels as sk

    n, v = 256, 151936
    base, tune, ref = make_rows("peaked", n, v, "cuda", torch.Generator(device="cuda").manual_seed(7))
    seed = torch.randint(0, 1 << 62, (n,), device="cuda")
    kwargs = dict(temperature=0.7, top_p=top_p, seed=seed, offset=5, backend="triton")
    a = prepare_sample_args(base, [(tune, 1.0), (ref, -1.0)], 0.7, 0, top_p, 0.0, seed, 5, None)
    want = _guided_sample_ref(a)
    pooled = ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], **kwargs)
    assert torch.equal(pooled.tokens, want.tokens)
    assert_close(pooled.logprob, want.logprob, torch.float32, "logprob", scale=10.0)
    monkeypatch.setattr(sk, "POOL_MAX", 0)
    try:
        passes = ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], **kwargs)
    finally:
        monkeypatch.undo()
    assert torch.equal(passes.tokens, pooled.tokens)
    assert torch.equal(passes.logprob, pooled.logprob)


@pytest.mark.parametrize("n", [1, 256])
@pytest.mark.parametrize("setting", [dict(top_k=50), dict(min_p=0.05), dict(top_p=0.95), dict(top_k=50, top_p=0.9)])
def test_filters_on_rows_whose_likely_tokens_crowd_the_low_ids_match_reference(n, setting):
    """Rows whose Zipf-like heads lie among the first 4,096 ids, where byte-level BPE vocabularies number their
    frequent tokens (bench_sampling's "ranked" rows), at V = 151936: stage 1's slices take every S-th granule,
    so those tokens spread over the slices' candidates. The compiled kernel draws the reference's tokens."""
    v = 151936
    base, tune, ref = make_rows("ranked", n, v, "cuda", torch.Generator(device="cuda").manual_seed(11 + n))
    seed = torch.randint(0, 1 << 62, (n,), device="cuda")
    k, p, mp = setting.get("top_k", 0), setting.get("top_p", 1.0), setting.get("min_p", 0.0)
    want = _guided_sample_ref(prepare_sample_args(base, [(tune, 1.0), (ref, -1.0)], 0.7, k, p, mp, seed, 3, None))
    got = ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], temperature=0.7, top_k=k, top_p=p, min_p=mp,
                                    seed=seed, offset=3, backend="triton")
    assert torch.equal(got.tokens, want.tokens)
    assert_close(got.logprob, want.logprob, torch.float32, "logprob", scale=10.0)


def test_triton_sampler_is_deterministic_and_replays_in_a_graph():
    base, tune, ref = _rows(16, 32000, torch.float16, 3)
    seed = torch.arange(16, device="cuda")
    offset = torch.zeros(16, dtype=torch.int64, device="cuda")

    def step():
        return ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], temperature=1.0, top_p=0.95, seed=seed,
                                         offset=offset, backend="triton")

    a, b = step(), step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # bitwise: integer masses; the fallback pool's atomic changes no bits
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


def test_triton_sampler_frequencies_follow_the_softmax():
    v, n = 8, 4096
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 0.2]], device="cuda").repeat(n, 1)
    out = ivg_kernels.guided_sample(logits, seed=torch.arange(n, device="cuda"), offset=5, backend="triton")
    freq = torch.bincount(out.tokens, minlength=v).double() / n
    p = logits[0].double().softmax(-1)
    sd = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sd + 1e-9).all(), (freq.tolist(), p.tolist())


@pytest.mark.parametrize("cfg", [dict(), dict(top_k=50, top_p=0.9), dict(min_p=0.05)], ids=["plain", "filters", "min-p"])
def test_remembered_calls_with_pointers_as_ints_draw_the_reference_tokens(cfg, monkeypatch):
    """``launch.POINTERS_AS_INTS``: remembered calls launch with their tensors' addresses (as Triton's
    launchers take them, without the driver's pointer query), and draw the reference's tokens and values, for
    scalar and tensor temperatures, on a second stream too; memory stays flat over 200 calls."""
    from ivg_kernels._triton import launch

    monkeypatch.setattr(launch, "POINTERS_AS_INTS", True)
    base, tune, ref = _rows(8, 32000, torch.bfloat16, 17)
    seed = torch.arange(8, device="cuda")
    for temperature in (0.7, torch.full((8,), 0.7, device="cuda")):
        a = prepare_sample_args(base, [(tune, 1.0), (ref, -1.0)], temperature, cfg.get("top_k", 0),
                                cfg.get("top_p", 1.0), cfg.get("min_p", 0.0), seed, 4, None)
        want = _guided_sample_ref(a)

        def call():
            return ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], temperature=temperature, seed=seed,
                                             offset=4, backend="triton", **cfg)

        call()  # binds the kernels (tensors through Triton's binder); the calls below pass ints
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(200):
            got = call()
        torch.cuda.synchronize()
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.ok, want.ok)
        for name in ("logprob", "logsumexp", "input_logprobs", "input_logits"):
            assert_close(getattr(got, name), getattr(want, name), torch.float32, name, scale=10.0)
        del got
        assert torch.cuda.memory_allocated() == before
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = call()
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(got.tokens, want.tokens)


def test_eager_calls_leave_device_memory_flat():
    """1,000 eager calls (direct launches after the first) allocate nothing that outlives them, and the
    direct path draws what the first call, through Triton's own launch, drew."""
    base, tune, ref = _rows(8, 32000, torch.bfloat16, 5)
    kwargs = dict(temperature=0.7, top_p=0.9, seed=3, offset=1, backend="triton")
    first = ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], **kwargs).tokens
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        out = ivg_kernels.guided_sample(base, [(tune, 1.0), (ref, -1.0)], **kwargs)
    torch.cuda.synchronize()
    assert torch.equal(out.tokens, first)
    del out
    assert torch.cuda.memory_allocated() == before
    kc = torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(4, 8, 64, dtype=torch.bfloat16, device="cuda")
    table = torch.arange(16, dtype=torch.int32, device="cuda").view(4, 4)
    lens = torch.full((4,), 60, dtype=torch.int32, device="cuda")
    want = ivg_kernels.paged_decode_attention(q, kc, kc, table, lens, scale=0.125, backend="triton")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        got = ivg_kernels.paged_decode_attention(q, kc, kc, table, lens, scale=0.125, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    del got
    assert torch.cuda.memory_allocated() == before
