"""What bounds the decoder's memory: KV pools that hold each prompt's blocks once (its candidates are forks that
share them) and each candidate's own blocks past them, fewer prompts at once where memory cannot hold the pools,
and prompts read in forwards of a bounded number of tokens."""
import random
import warnings

import pytest
import torch

import ivg.decode_loop as decode_loop
import ivg.decoder as decoder_module
from ivg.decoder import IVGDecoder
from ivg.naive import NaiveDecoder
from ivg.options import DecodeOptions

from .decoder_fixtures import EOS, ivg_models
from .test_decoder import _same

LONG = "it is a truly wonderful day, and the movie was so good. what a day"  # 66 characters, one token each


@pytest.fixture(scope="module")
def models():
    return ivg_models("gpt2")


def _pool(dec):
    return dec._group.caches["base"].pool.kv.shape[2]


def test_a_long_prompt_is_held_once_not_once_per_candidate(models):
    """16 candidates of a 66-token prompt in blocks of 4: the pool holds fewer blocks than the prompt takes
    16 times over (it was sized so: 305 blocks where 65 do), and the results are the naive baseline's."""
    opts = DecodeOptions(mode="ivg", width=4, successors=4, chunk_len=3, max_new_tokens=6, eos_token_ids=())
    dec = IVGDecoder(models, block_size=4)
    got = dec.generate([LONG], opts)
    prompt_blocks = -(-len(LONG) // 4)
    assert _pool(dec) < 16 * prompt_blocks, (_pool(dec), prompt_blocks)
    _same(got, NaiveDecoder(models).generate([LONG], opts))
    assert set(dec.kv_blocks_in_use().values()) == {0}


def _config(rng):
    mode = rng.choice(["eft", "cbs", "ivg", "bon", "won"])
    kw = dict(mode=mode, width=rng.randint(1, 4), successors=rng.randint(1, 4), chunk_len=rng.choice([1, 2, 3, None]),
              n=rng.randint(2, 6), temperature=rng.choice([0.0, 0.7, 1.0]), max_new_tokens=rng.randint(1, 14),
              seed=rng.randint(0, 99), eos_token_ids=rng.choice([(), (EOS, 5)]), speculate=rng.choice([0, 0, 2, 4]))
    if kw["speculate"]:  # greedy, so that the naive baseline (which does not speculate) gives the same tokens
        kw["temperature"] = 0.0
    kw["num_return"] = min(kw["width"], kw["n"]) if mode in ("cbs", "ivg", "bon", "won") else 1
    decoder = dict(block_size=rng.choice([1, 2, 3, 4, 5, 8]), read_every=rng.choice([None, 3]),
                   max_batch_prompts=rng.choice([1, 2, 64]), merge_twins=rng.random() < 0.8)
    prompts = [LONG[rng.randint(0, 40):][:rng.randint(1, 50)] for _ in range(rng.randint(1, 3))]
    return kw, decoder, prompts


def test_pools_of_the_computed_size_are_never_short(models):
    """Random searches over long prompts in small blocks (speculation, twin rows, continuous batching, EOS),
    each on a fresh decoder, whose pools are then exactly ``prompt_blocks`` for the call: none runs short
    (``KVCacheExhausted``), none holds a block after it, and the results are the naive baseline's. The
    largest share of a pool in use at once is reported on failure (it reaches 94% in these runs)."""
    rng = random.Random(20261203)
    for case in range(14):
        kw, decoder, prompts = _config(rng)
        where = f"case {case}: {kw} {decoder} {[len(p) for p in prompts]}"
        opts = DecodeOptions(**kw)
        dec = IVGDecoder(models, **decoder)
        got = dec.generate(prompts, opts)
        assert set(dec.kv_blocks_in_use().values()) == {0}, where
        try:
            _same(got, NaiveDecoder(models).generate(prompts, DecodeOptions(**{**kw, "speculate": 0})))
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None


def _tight(monkeypatch, fits: int, error=torch.OutOfMemoryError("CUDA out of memory (simulated)")):
    """KV caches of more than ``fits`` blocks fail to allocate; returns the sizes asked for."""
    real, sizes = decoder_module.KVCache, []

    def cache(*args, num_blocks, **kwargs):
        sizes.append(num_blocks)
        if num_blocks > fits:
            raise error
        return real(*args, num_blocks=num_blocks, **kwargs)

    monkeypatch.setattr(decoder_module, "KVCache", cache)
    return sizes


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
def test_pools_that_do_not_fit_decode_fewer_prompts_at_once(models, monkeypatch, error):
    """Where the pools for every prompt at once do not fit, the decoder halves the prompts it decodes at once
    until they do, says so, and gives the same results (CUDA's error and the CPU allocator's alike)."""
    prompts = ["the movie was", "a", "it is a truly wonderful day, and", "bad", "so, what?"]
    opts = DecodeOptions(mode="ivg", max_new_tokens=8, eos_token_ids=())
    want = IVGDecoder(models).generate(prompts, opts)
    plan = IVGDecoder(models)
    resolved, _, ids = plan._plan(prompts, opts)
    sizes = _tight(monkeypatch, fits=plan._pool_blocks(ids, resolved, 2), error=error)  # 2 prompts' pools fit
    dec = IVGDecoder(models)
    with pytest.warns(UserWarning, match=r"max_batch_prompts: the KV caches of 5 prompts at once do not fit in memory; "
                                         r"decoding 2 at a time"):
        got = dec.generate(prompts, opts)
    _same(got, want)
    assert len(sizes) >= 3 and sizes[-1] < sizes[0], sizes
    assert set(dec.kv_blocks_in_use().values()) == {0}
    # a second call tries no size that failed: it keeps the pools that fit (and on a GPU their CUDA graphs)
    pools, tried = dec._group.caches["base"].pool.kv, len(sizes)
    with pytest.warns(UserWarning, match="decoding 2 at a time"):
        _same(dec.generate(prompts, opts), want)
    assert len(sizes) == tried and dec._group.caches["base"].pool.kv is pools


def test_one_prompt_whose_pools_do_not_fit_is_an_error_that_says_how_large(models, monkeypatch):
    """No smaller batch helps: the error names the blocks one prompt needed and what to lower; other
    allocation errors pass through untouched, and the decoder then decodes what fits."""
    opts = DecodeOptions(mode="ivg", max_new_tokens=8, eos_token_ids=())
    _tight(monkeypatch, fits=10)
    dec = IVGDecoder(models)
    with pytest.raises(torch.OutOfMemoryError, match=rf"KV caches of one prompt do not fit in memory: \d+ blocks of "
                                                      rf"{dec.block_size} tokens per model \(4 models\), for 16 candidates"):
        dec.generate(["the movie was", "a"], opts)
    _tight(monkeypatch, fits=0, error=RuntimeError("expected a CUDA device"))
    with pytest.raises(RuntimeError, match="expected a CUDA device"):
        IVGDecoder(models).generate(["a"], opts)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(dec.generate(["a"], opts), IVGDecoder(models).generate(["a"], opts))


def test_prefill_groups_hold_whole_prompts_in_order_within_the_budget():
    rng = random.Random(7)
    for _ in range(300):
        lengths, budget = [rng.randint(1, 40) for _ in range(rng.randint(1, 6))], rng.randint(1, 50)
        groups = decode_loop.prefill_groups(lengths, budget)
        assert [i for g in groups for i in g] == list(range(len(lengths)))
        for g, after in zip(groups, groups[1:] + [None]):
            total = sum(lengths[i] for i in g)
            assert total <= budget or len(g) == 1, (lengths, budget, groups)  # a longer prompt alone
            if after is not None:  # greedy: the next prompt did not fit
                assert total + lengths[after[0]] > budget
    assert decode_loop.prefill_groups([3, 4], 16) == [[0, 1]]  # one forward, as a rule
    assert decode_loop.prefill_groups([20, 3, 4, 30], 16) == [[0], [1, 2], [3]]


@pytest.mark.parametrize("kw", [dict(mode="ivg", width=2, successors=3, chunk_len=3),
                                dict(mode="eft", temperature=0.0, speculate=3), dict(mode="bon", n=4)])
def test_prompts_read_in_bounded_forwards_decode_what_one_forward_gives(models, monkeypatch, kw):
    """Forwards of at most 7 tokens (prompts of 1 to 66 tokens: most alone; the lazy token RM's catch-up reads
    at chunk boundaries and at best-of-N's length limit in groups of rows): the naive baseline's tokens and values,
    more forwards than with the default, every prompt's result the same, and no forward of the token RM over
    several sequences reading more than 7 tokens."""
    from ivg.paged_model import PagedModel

    prompts = ["the movie was", "a", LONG, "it is a truly wonderful day, and"]
    opts = DecodeOptions(max_new_tokens=6, eos_token_ids=(), **kw)
    whole = IVGDecoder(models, block_size=4)
    want = whole.generate(prompts, opts)
    monkeypatch.setattr(decode_loop, "PREFILL_TOKENS", 7)
    monkeypatch.setattr(decode_loop, "CPU_PREFILL_TOKENS", 7)
    reads, call = [], PagedModel.__call__

    def counted(pm, seq_ids, tokens, **kwargs):
        if pm.model is models.token_rm:
            counts = kwargs.get("counts")
            reads.append((len(seq_ids), sum(counts) if counts is not None else sum(map(len, tokens))
                          if isinstance(tokens, list) else len(tokens)))
        return call(pm, seq_ids, tokens, **kwargs)

    monkeypatch.setattr(PagedModel, "__call__", counted)
    dec = IVGDecoder(models, block_size=4)
    got = dec.generate(prompts, opts)
    assert dec.last_stats.forwards > whole.last_stats.forwards
    if kw["mode"] != "eft":  # the token RM scores lazily
        assert reads and all(n == 1 or t <= 7 for n, t in reads), reads
    _same(got, want, tol=1e-9)
    _same(got, NaiveDecoder(models).generate(prompts, DecodeOptions(**{**opts.__dict__, "speculate": 0})))
    assert set(dec.kv_blocks_in_use().values()) == {0}
