"""``sampling_kernels.MAX_CANDIDATES`` (the candidates per slice stage 1 keeps for the filters, which
``benchmarks/tune_stage1.py --candidates`` varies on a GPU): any setting draws the reference's tokens, proven or by the
fallback, and a call after the setting changed is planned anew, also through the remembered public call."""
import pytest
import torch

import ivg_kernels
from ivg_kernels._args import prepare_sample_args
from ivg_kernels._triton import sampling_kernels as sk
from ivg_kernels.reference.sampling import _guided_sample_ref

N, V = 4, 3000


def _rows(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, V, generator=gen)
    base[:, torch.randperm(V, generator=gen)[:24]] += 6.0  # a peaked head the candidates can prove
    return base, torch.randn(N, V, generator=gen), torch.randn(N, V, generator=gen)


@pytest.mark.parametrize("candidates", [8, 4])
@pytest.mark.parametrize("cfg", [dict(top_k=20), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=50, top_p=0.95)])
def test_any_candidate_count_draws_the_reference_tokens(monkeypatch, candidates, cfg):
    monkeypatch.setattr(sk, "MAX_CANDIDATES", candidates)
    base, tune, ref = _rows()
    guides = [(tune, 0.5), (ref, -0.5)]
    seed, offset = torch.arange(N), torch.full((N,), 7)
    got = ivg_kernels.guided_sample(base, guides, temperature=0.7, seed=seed, offset=offset, backend="triton", **cfg)
    a = prepare_sample_args(base, guides, 0.7, cfg.get("top_k", 0), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0),
                            seed, offset, None)
    want = _guided_sample_ref(a)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.ok, want.ok), (got.tokens, want.tokens)


def test_a_changed_candidate_count_is_planned_anew(monkeypatch):
    base, tune, ref = _rows(1)
    sizes, empty = [], torch.empty

    def spy(*a, **k):  # the stages' one scratch allocation (uint8): its size holds the candidates' part
        x = empty(*a, **k)
        if k.get("dtype") is torch.uint8:
            sizes.append(x.numel())
        return x

    monkeypatch.setattr(sk.torch, "empty", spy)
    call = lambda: ivg_kernels.guided_sample(base, [(tune, 1.0)], temperature=0.7, top_k=20,  # noqa: E731
                                             seed=torch.arange(N), offset=torch.zeros(N, dtype=torch.int64),
                                             backend="triton")
    monkeypatch.setattr(sk, "MAX_CANDIDATES", 16)
    block = sk.slice_width(sk.pick_block(N, V), V)
    planned = sk._plan(N, V, block, 2, True)[7]
    call()
    call()  # remembered
    monkeypatch.setattr(sk, "MAX_CANDIDATES", 8)
    call()
    slices = -(-V // block)
    assert sizes == [planned, planned, planned - N * slices * 8 * 8]  # 8 fewer int64 candidates a slice
