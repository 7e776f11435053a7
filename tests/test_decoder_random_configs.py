"""The paged decoder on randomly drawn configurations (a fixed seed): the naive baseline's tokens and values,
the same result for a prompt decoded alone, greedy speculative decoding equal to plain decoding, and no
block held after a call. The matrix tests cover each option; these cover their combinations (beam widths
and chunk lengths of 1, stop strings inside beam search, filters with guidance, small batches with
continuous batching, several read intervals, twin rows computed once or not), with CUDA graphs' padded buffers
or without."""
import random

import pytest
import torch

from ivg.decoder import IVGDecoder
from ivg.naive import NaiveDecoder
from ivg.options import DecodeOptions

from .decoder_fixtures import EOS, ivg_models, with_graph_buffers
from .test_decoder import _same

MODES = ["plain", "eft", "tokenrm", "cbs", "ivg", "bon", "won"]
POOL = ["the movie was", "a", "it is a truly wonderful day, and", "bad", "so, what?", "zz top"]
CASES = 30


@pytest.fixture(scope="module")
def families():
    return {f: ivg_models(f) for f in ("gpt2", "llama")}


def _config(rng: random.Random):
    mode = rng.choice(MODES)
    kw = dict(mode=mode, width=rng.randint(1, 3), successors=rng.randint(1, 3), chunk_len=rng.choice([1, 2, 3, 5, None]),
              n=rng.randint(1, 4), temperature=rng.choice([0.0, 0.5, 1.0]), top_k=rng.choice([0, 0, 3]),
              top_p=rng.choice([1.0, 1.0, 0.8]), min_p=rng.choice([0.0, 0.0, 0.1]), max_new_tokens=rng.randint(1, 12),
              seed=rng.randint(0, 99), eos_token_ids=rng.choice([None, (), (EOS, 5)]),
              stop=rng.choice([(), (), ("e",), (" a",)]))
    searches = mode in ("cbs", "ivg", "bon", "won")
    kw["num_return"] = min(kw["width"], kw["n"]) if searches else 1  # every kept beam: the most to compare
    decoder = dict(read_every=rng.choice([None, 1, 3]), max_batch_prompts=rng.choice([1, 2, 64]),
                   merge_twins=rng.random() < 0.8)  # twin rows computed once (where the host reads every step)
    return rng.choice(["gpt2", "llama"]), kw, decoder, rng.sample(POOL, rng.randint(1, 4)), rng.randint(1, 4)


@pytest.mark.parametrize("graph_buffers", [False, True])
def test_random_configurations_match_the_naive_baseline(families, monkeypatch, graph_buffers):
    if graph_buffers:
        with_graph_buffers(monkeypatch)
    rng = random.Random(20261201 + graph_buffers)
    torch.manual_seed(0)
    for case in range(CASES):
        family, kw, decoder, prompts, gamma = _config(rng)
        where = f"case {case}: {family} {kw} {decoder} {prompts}"
        models, opts = families[family], DecodeOptions(**kw)
        dec = IVGDecoder(models, **decoder)
        got = dec.generate(prompts, opts)
        assert set(dec.kv_blocks_in_use().values()) == {0}, where
        try:
            _same(got, NaiveDecoder(models).generate(prompts, opts))
            _same(got[:1], dec.generate(prompts[:1], opts))  # batch invariance
            if kw["temperature"] == 0.0:  # greedy: speculative rounds keep exactly the plain tokens
                spec = dec.generate(prompts, DecodeOptions(**{**kw, "speculate": gamma}))
                _same(spec, got)
                assert set(dec.kv_blocks_in_use().values()) == {0}
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
