"""The Triton kernels against the plain-torch references on randomly drawn configurations (fixed seeds):
the sampler (vocabulary widths around the slice sizes, 16-bit inputs, guides of other widths, per-row and
scalar parameters, every filter, tiny and zero temperatures, ties, masked, flat and ranked rows, the fallback
pool's sizes), paged decode and prefill attention (block sizes from 1, GQA groups, windows, splits, the
64-key tiles, logit soft-capping and attention sinks; also against dense attention) and the speculative verification and draft draw (drafts
inside and outside the draft's support). The parity tests pin each path; these cover their combinations.
On the CPU the kernels run in the Triton interpreter; on a GPU, compiled."""
import random

import pytest
import torch

from ivg_kernels._args import prepare_sample_args
from ivg_kernels.attention import paged_decode_attention, paged_prefill_attention, shared_prefix_decode_attention
from ivg_kernels.reference.sampling import _guided_sample_ref
from ivg_kernels.reference.speculative import draft_draw_ref, speculative_verify_ref
from ivg_kernels.speculative import draft_sample, speculative_verify

from .helpers import DEVICE, args_to, assert_close, requires_triton
from .test_attention_kernels import ATOL, _dense_capped, _setup
from .test_shared_prefix_attention import _fork_history, _inputs as _group_inputs
from .test_speculative_kernels import _case

pytestmark = requires_triton


def _rows(rng, gen, kind, n, width, dtype):
    """``[n, width]`` scores of one kind: normal, few values (ties), one peak, ranked by id, flat, mostly
    -inf, or of magnitude 1e3."""
    if kind == "ties":
        x = torch.randint(0, 3, (n, width), generator=gen).float() * 1.7
    elif kind == "peaked":
        x = torch.randn(n, width, generator=gen)
        x[:, rng.randrange(width)] += 15
    elif kind == "ranked":
        x = -torch.arange(width).float().expand(n, width) * rng.choice([0.001, 0.01, 0.1])
    elif kind == "flat":
        x = torch.zeros(n, width)
    elif kind == "masked":
        x = torch.randn(n, width, generator=gen) * 2
        x[torch.rand(n, width, generator=gen) < 0.7] = float("-inf")
        x[:, rng.randrange(width)] = 0.0
    else:
        x = torch.randn(n, width, generator=gen) * (1e3 if kind == "huge" else 2.5)
    return x.to(dtype)


def _param(rng, scalars, per_row):
    return torch.tensor(per_row()) if rng.random() < 0.3 else rng.choice(scalars)


def _sampler_case(rng, gen):
    n = rng.choice([1, 1, 2, 3, 5])
    v = rng.choice([1, 2, 7, 63, 64, 65, 200, 511, 1000, 2049])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    kind = rng.choice(["normal", "ties", "peaked", "ranked", "flat", "masked", "huge"])
    logits = _rows(rng, gen, kind, n, v + rng.choice([0, 0, 3]), dtype)
    guides = [(_rows(rng, gen, kind, n, v + rng.choice([0, 1]), dtype),
               torch.randn(n, generator=gen) if rng.random() < 0.3 else rng.choice([0.0, 0.5, -0.7, 2.0]))
              for _ in range(rng.choice([0, 1, 2, 3]))]
    temperature = _param(rng, [1.0, 0.7, 0.0, 1e-6, 4.0, 1e-30], lambda: [rng.choice([1.0, 0.5, 0.0, 3.0, 1e-7])
                                                                          for _ in range(n)])
    top_k = _param(rng, [0, 0, 1, 2, 5, 50, 300, v], lambda: [rng.choice([0, 1, 3, 40]) for _ in range(n)])
    top_p = _param(rng, [1.0, 1.0, 0.3, 0.8, 0.9, 0.99], lambda: [rng.choice([1.0, 0.6, 0.95]) for _ in range(n)])
    min_p = _param(rng, [0.0, 0.0, 0.002, 0.05, 0.5], lambda: [rng.choice([0.0, 0.1]) for _ in range(n)])
    seed = rng.randrange(-(1 << 62), 1 << 62) if rng.random() < 0.7 else torch.randint(-(1 << 62), 1 << 62, (n,),
                                                                                       generator=gen)
    a = prepare_sample_args(logits, guides, temperature, top_k, top_p, min_p, seed, rng.randrange(1 << 40), v)
    where = dict(n=n, v=v, dtype=dtype, kind=kind, guides=len(guides), temperature=temperature, top_k=top_k,
                 top_p=top_p, min_p=min_p)
    return a, kind, where


def test_sampler_on_random_configurations(monkeypatch):
    from ivg_kernels._triton import sampling_kernels as sk
    from ivg_kernels.sampling import _guided_sample_triton

    rng, gen = random.Random(20261202), torch.Generator().manual_seed(20261202)
    pool_max = sk.POOL_MAX
    for case in range(40):
        a, kind, where = _sampler_case(rng, gen)
        block, pool = rng.choice([0, 0, 64, 128, 256]), rng.choice([pool_max, pool_max, 0, 1, 3])
        monkeypatch.setattr(sk, "POOL_MAX", pool)
        where = f"case {case}: {where}, block={block}, pool={pool}"
        a = args_to(a)
        ref, tri = _guided_sample_ref(a), _guided_sample_triton(a, block)
        assert torch.equal(ref.ok, tri.ok), where
        assert torch.equal(ref.tokens, tri.tokens), f"{where}: {ref.tokens.tolist()} != {tri.tokens.tolist()}"
        assert ((ref.tokens >= 0) & (ref.tokens < a.vocab_size) | ~ref.ok).all(), where
        for name in ("logprob", "logsumexp", "input_logprobs", "input_logits"):
            # |x| of 1e3: the float32 log-sum-exp's rounding is 6e-5 per operation there
            assert_close(getattr(tri, name), getattr(ref, name), a.logits.dtype, f"{where} {name}",
                         scale=1000.0 if kind == "huge" else 10.0)


ATTENTION_SEED, ATTENTION_CASES = 20261203, 60
# One rounding of a 16-bit output apart: at most one ulp, relative to the value (|out| of 4 or more with the
# larger scales, where a bfloat16 ulp, 0.031, exceeds ATOL's 0.02).
ULP = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def test_paged_attention_on_random_configurations(monkeypatch):
    from ivg_kernels._triton import attention_kernels as ak

    rng = random.Random(ATTENTION_SEED)
    long_keys = ak._LONG_KEYS
    for case in range(ATTENTION_CASES):
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        h_kv, group = rng.choice([1, 2, 4]), rng.choice([1, 2, 3, 4])
        h, d, bs = h_kv * group, rng.choice([8, 16, 24, 32, 64]), rng.choice([1, 2, 4, 8, 16, 32])
        window = rng.choice([None, None, 1, 2, 5, 17, 64])
        monkeypatch.setattr(ak, "_LONG_KEYS", rng.choice([long_keys, 0]))  # 0: 16-bit rows read 64-key tiles
        kind, seed = rng.choice(["decode", "prefill", "shared"]), 1000 + case
        scale = d ** -0.5 * rng.choice([1.0, 1.0, 8.0])  # x8: scores large enough for a cap of 1 to bite
        softcap = rng.choice([None, None, 0.3, 1.0, 30.0])
        sinks = torch.randn(h, generator=torch.Generator().manual_seed(seed)) * 3 if rng.random() < 0.4 else None
        extra = dict(softcap=softcap, sinks=None if sinks is None else sinks.to(DEVICE))
        where = (f"case {case}: {kind} {dtype} h={h} h_kv={h_kv} d={d} bs={bs} window={window} scale={scale:.3g} "
                 f"softcap={softcap} sinks={sinks is not None}")
        if kind == "decode":
            lens = [rng.choice([1, 2, bs, bs + 1, rng.randint(1, 150)]) for _ in range(rng.randint(1, 5))]
            splits = rng.choice([0, 0, 1, 2, 3, 7])
            bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, dtype, seed=seed)
            q = torch.randn(len(lens), h, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
            args = [x.to(DEVICE) for x in (q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs))]
            want = paged_decode_attention(*args, scale=scale, sliding_window=window, backend="reference", **extra)
            got = paged_decode_attention(*args, scale=scale, sliding_window=window, num_splits=splits,
                                         backend="triton", **extra)
            new, q_pos = [1] * len(lens), [torch.tensor([n - 1]) for n in lens]
            where += f" lens={lens} splits={splits}"
        elif kind == "prefill":
            new = [rng.choice([0, 1, 2, 5, rng.randint(1, 40)]) for _ in range(rng.randint(1, 4))]
            lens = [max(nw + rng.choice([0, 0, 1, 7, rng.randint(0, 60)]), 1) for nw in new]
            bm, seqs, kc, vc, k, v = _setup(lens, h_kv, d, bs, dtype, seed=seed)
            cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
            q = torch.randn(sum(new), h, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
            args = [x.to(DEVICE) for x in (q, kc, vc, bm.block_table(seqs), bm.seq_lens(seqs), cu)]
            most = max(max(new), 1)
            want = paged_prefill_attention(*args, max_seqlen_q=most, scale=scale, sliding_window=window,
                                           backend="reference", **extra)
            got = paged_prefill_attention(*args, max_seqlen_q=most, scale=scale, sliding_window=window,
                                          backend="triton", **extra)
            q_pos = [torch.arange(n - nw, n) for n, nw in zip(lens, new)]
            where += f" lens={lens} new={new}"
        else:
            prompts = [rng.choice([1, 3, bs, 2 * bs + 1, rng.randint(1, 120)]) for _ in range(rng.randint(1, 3))]
            splits = rng.choice([0, 0, 1, 2, 5])
            cache, rows = _fork_history(prompts, h_kv, d, bs, dtype, seed, frees=rng.random() < 0.5)
            inputs = _group_inputs(cache, rows, h, seed)
            args, most = [x.to(DEVICE) for x in inputs[:7]], inputs[7]
            want = paged_decode_attention(*args[:5], scale=scale, sliding_window=window, backend="reference",
                                          **extra)
            shared = shared_prefix_decode_attention(*args, max_group_rows=most, scale=scale,
                                                    sliding_window=window, backend="reference", **extra)
            torch.testing.assert_close(shared.float(), want.float(), atol=ATOL[dtype], rtol=ULP[dtype], msg=where)
            got = shared_prefix_decode_attention(*args, max_group_rows=most, scale=scale, sliding_window=window,
                                                 num_splits=splits, backend="triton", **extra)
            q_pos = None
            where += f" prompts={prompts} splits={splits}"
        torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=ULP[dtype], msg=where)
        if q_pos is not None:  # the reference against dense attention, row by row
            q, at_k, at_q = args[0].cpu(), 0, 0
            for n, nw, pos in zip(lens, new, q_pos):
                if nw:
                    dense = _dense_capped(q[at_q:at_q + nw], k[at_k:at_k + n], v[at_k:at_k + n], pos, scale,
                                          window, softcap, sinks)
                    torch.testing.assert_close(want[at_q:at_q + nw].cpu().double(), dense.to(dtype).double(),
                                               atol=2 * ATOL[dtype], rtol=0, msg=where)
                at_k, at_q = at_k + n, at_q + nw


def test_speculative_verification_on_random_configurations():
    rng = random.Random(20261204)
    for case in range(30):
        r, s, v = rng.choice([1, 2, 5, 16]), rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 5, 17, 64, 300, 1030])
        g, temperature = rng.choice([0, 1, 2, 4]), rng.choice([1.0, 0.6, 0.0, 2.0, 1e-6, 1e-30])
        scale, similar = rng.choice([0.1, 1.2, 5.0, 30.0]), rng.random() < 0.7
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        foreign = rng.random() < 0.3  # drafts not drawn from the draft's q (a caller's own)
        where = f"case {case}: r={r} s={s} v={v} g={g} T={temperature} scale={scale} {dtype} foreign={foreign}"
        base, guides, draft, drafts, num, seeds, offset = _case(r, s, v, g, 500 + case, temperature, scale=scale,
                                                               similar=similar)
        if foreign:
            drafts = torch.randint(0, v, drafts.shape, generator=torch.Generator().manual_seed(case))
        base, draft, drafts, num, seeds, offset = (x.to(DEVICE) for x in (base.to(dtype), draft.to(dtype), drafts,
                                                                         num, seeds, offset))
        guides = [(x.to(dtype).to(DEVICE), w) for x, w in guides]
        kw = dict(temperature=temperature, seed=seeds, offset=offset)
        want = speculative_verify_ref(base, guides, draft, drafts, num, **kw)
        got = speculative_verify(base, guides, draft, drafts, num, backend="triton", **kw)
        assert torch.equal(got.ok, want.ok), where
        assert torch.equal(got.num_accepted, want.num_accepted), where
        assert torch.equal(got.tokens, want.tokens), f"{where}: {want.tokens.tolist()} != {got.tokens.tolist()}"
        live = want.tokens >= 0
        tol = 1e-5 * max(1.0, scale)
        torch.testing.assert_close(got.input_logits[live].double(), want.input_logits[live].double(), msg=where)
        torch.testing.assert_close(got.input_logprobs[live].double(), want.input_logprobs[live].double(), atol=tol,
                                   rtol=0, msg=where)
        torch.testing.assert_close(got.logprob[live], want.logprob[live], atol=tol, rtol=0, msg=where)
        k = rng.randrange(s)
        drawn = draft_sample(draft[:, k], temperature=temperature, seed=seeds, offset=offset[:, k], backend="triton")
        assert torch.equal(drawn, draft_draw_ref(draft[:, k], temperature=temperature, seed=seeds,
                                                 offset=offset[:, k])), where
