"""IVG as transformers' custom generation method: model.generate(custom_generate=ivg.CUSTOM_GENERATE)."""
import pytest
import torch

import ivg
from ivg.decoder import IVGDecoder
from ivg.options import DecodeOptions

from .decoder_fixtures import ivg_models


@pytest.fixture(scope="module")
def models():
    return ivg_models("gpt2", dtype=torch.float32)


def _call(m, **kw):
    g = m.guides[0]
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # the first prompt is left-padded
    args = dict(attention_mask=mask, custom_generate=ivg.CUSTOM_GENERATE, trust_remote_code=True,
                guides=[(g.tuned, g.ref, g.beta)], token_rm=m.token_rm, width=2, successors=2, chunk_len=3,
                max_new_tokens=6, temperature=0.9, do_sample=True, seed=4, eos_token_id=None, pad_token_id=0)
    args.update(kw)
    return ids, m.base.generate(ids, **args)


def test_custom_generate_is_the_ivg_decoder(models):
    ids, out = _call(models)
    expect = IVGDecoder(models).generate(
        [[5, 6, 7], [8, 9, 10, 11]], DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=6,
                                                    temperature=0.9, seed=4, eos_token_ids=()))
    assert out.shape == (2, 4 + 6)
    assert torch.equal(out[:, :4], ids), "the prompts come back as given"
    assert out[:, 4:].tolist() == [r.beams[0].tokens for r in expect]


def test_greedy_eft_through_custom_generate(models):
    _, out = _call(models, token_rm=None, do_sample=False)  # guides only: mode eft; do_sample=False: greedy
    expect = IVGDecoder(models).generate([[5, 6, 7], [8, 9, 10, 11]], DecodeOptions(
        mode="eft", temperature=0.0, max_new_tokens=6, eos_token_ids=()))
    assert out[:, 4:].tolist() == [r.beams[0].tokens for r in expect]


def test_without_a_seed_each_call_draws_anew_and_manual_seed_repeats_it(models):
    """As transformers' own sampling: the key came from seed 0 at every call, so a user sampling
    several times got the same responses each time."""
    kw = dict(seed=None, temperature=3.0, max_new_tokens=12)
    torch.manual_seed(7)
    _, first = _call(models, **kw)
    _, second = _call(models, **kw)
    assert not torch.equal(first, second)
    torch.manual_seed(7)
    _, again = _call(models, **kw)
    assert torch.equal(first, again)
    _, greedy = _call(models, seed=None, do_sample=False)  # greedy draws no key (the global stream stays put)
    state = torch.random.get_rng_state()
    _, greedy2 = _call(models, seed=None, do_sample=False)
    assert torch.equal(greedy, greedy2) and torch.equal(state, torch.random.get_rng_state())
    _, whole = _call(models, chunk_len=None)  # one chunk, the whole response: DecodeOptions' meaning of None
    expect = IVGDecoder(models).generate(
        [[5, 6, 7], [8, 9, 10, 11]], DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=None, max_new_tokens=6,
                                                    temperature=0.9, seed=4, eos_token_ids=()))
    assert whole[:, 4:].tolist() == [r.beams[0].tokens for r in expect]


def test_stop_strings_with_a_tokenizer_are_the_decoders_stop_strings(models):
    """``stop_strings`` (with ``tokenizer=``, as transformers' generate wants) were refused as not understood."""
    from ivg.models import IVGModels

    _, free = _call(models, max_new_tokens=12)
    stop = models.tokenizer.decode(free[1, 4 + 3:4 + 5].tolist())  # two tokens the second prompt's best beam drew
    _, out = _call(models, max_new_tokens=12, stop_strings=stop, tokenizer=models.tokenizer)
    expect = IVGDecoder(IVGModels(models.base, models.guides, models.token_rm, models.token_rm_weight,
                                  models.tokenizer)).generate(
        [[5, 6, 7], [8, 9, 10, 11]], DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=12,
                                                    temperature=0.9, seed=4, eos_token_ids=(), stop=(stop,)))
    assert [row[4:4 + len(r.beams[0].tokens)].tolist() for row, r in zip(out, expect)] == \
        [r.beams[0].tokens for r in expect]
    assert len(expect[1].beams[0].tokens) < 12, "the stop string ended the second prompt's response"
    with pytest.raises(ValueError, match=r"stop_strings: needs tokenizer="):
        _call(models, stop_strings=stop)


def test_a_generation_configs_processors_are_named_as_not_applied(models):
    """A model's generation_config.json may set a repetition penalty, say, which this method does not apply:
    it was ignored in silence."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=3, typical_p=1.0)
    with pytest.warns(UserWarning, match=r"generation config: repetition_penalty=1.3, no_repeat_ngram_size=3 not "
                                         r"applied by the IVG custom generation method"):
        _, out = _call(models, generation_config=cfg)
    _, plain = _call(models)
    assert torch.equal(out, plain)


def test_unsupported_arguments_are_named(models):
    with pytest.raises(ValueError, match="logits_processor: not supported"):
        _call(models, logits_processor=[lambda ids, scores: scores])
    with pytest.raises(ValueError, match="widht: not understood"):
        _call(models, widht=3)


@pytest.mark.parametrize("kw,match", [
    (dict(guides=1.5), r"guides=float: expected a list of \(tuned, ref, beta\) triples"),
    (dict(guides=[1, 2]), r"guides\[0\]: expected a \(tuned, ref, beta\) triple"),
    (dict(token_rm_weight="x"), "token_rm_weight='x': expected a finite number"),
    (dict(temperature=[]), r"temperature=\[\]: expected a finite number"),
    (dict(top_k=float("inf")), "top_k=inf: expected an int"),
    (dict(top_p="x"), "top_p='x': expected a finite number"),
    (dict(max_new_tokens="x"), "max_new_tokens='x': expected an int"),
    (dict(max_new_tokens=None, max_length=float("nan")), "max_length=nan: expected an int"),
    (dict(pad_token_id=2 ** 70), r"pad_token_id=\d+: expected a token id"),
    (dict(eos_token_id=1.5), "eos_token_id=1.5: expected a token id"),
    (dict(eos_token_id=-1), "eos_token_id=-1: expected a token id"),
    (dict(stop_strings=0, tokenizer=None), "stop_strings=0: expected a string or a list of strings"),
    (dict(tokenizer="gpt2"), "tokenizer=str: expected a loaded tokenizer"),
    (dict(attention_mask=[[1, 1, 1, 1]]), r"attention_mask: expected a tensor of input_ids' shape \[2, 4\], got list"),
])
def test_arguments_of_the_wrong_kind_are_named(models, kw, match):
    """Found by a fuzz of the method's arguments: each of these failed with Python's or torch's own error (a float()
    or int() of a string, "not iterable", an overflow, "'str' object has no attribute 'decode'")."""
    with pytest.raises(ValueError, match=match):
        _call(models, **kw)


def test_num_return_sequences_gives_each_prompts_best_beams_in_transformers_order(models):
    ids, out = _call(models, num_return_sequences=2)
    expect = IVGDecoder(models).generate(
        [[5, 6, 7], [8, 9, 10, 11]], DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=6,
                                                    temperature=0.9, seed=4, eos_token_ids=(), num_return=2))
    assert out.shape == (4, 4 + 6)
    assert torch.equal(out[:, :4], ids.repeat_interleave(2, dim=0)), "each prompt once per returned sequence"
    assert out[:, 4:].tolist() == [b.tokens for r in expect for b in r.beams]
    assert out[0, 4:].tolist() != out[1, 4:].tolist(), "the test needs two different beams of one prompt"
    with pytest.raises(ValueError, match=r"num_return_sequences=3: expected at most 2 for mode 'ivg'"):
        _call(models, num_return_sequences=3)  # more than the search keeps (width 2)
    with pytest.raises(ValueError, match=r"num_return_sequences=0: expected an int >= 1"):
        _call(models, num_return_sequences=0)


def test_num_beams_is_refused_and_max_length_counts_the_prompt(models):
    with pytest.raises(ValueError, match=r"num_beams=4: transformers' beam search does not apply"):
        _call(models, num_beams=4)
    _, one = _call(models, num_beams=1)
    _, plain = _call(models)
    assert torch.equal(one, plain)
    _, short = _call(models, max_new_tokens=None, max_length=7)  # 4 prompt positions: 3 new tokens
    assert short.shape == (2, 7)
    _, both = _call(models, max_new_tokens=6, max_length=7)  # max_new_tokens wins, as in transformers
    assert torch.equal(both, plain)
    with pytest.raises(ValueError, match=r"max_length=4: expected more than the prompts' 4 positions"):
        _call(models, max_new_tokens=None, max_length=4)


def test_the_decoder_is_kept_on_the_base_model_between_calls(models):
    """A loop of generate calls makes the decoder (its KV pools; on a GPU its CUDA graphs) once, as transformers
    keeps a static cache on the model: a second call with the same guides reuses the first call's decoder and
    pools and gives what a fresh decoder gives; another beta makes a new one; a copy or a pickle of the model
    holds none (one is made on first use), and ``del model._ivg_decoder`` lets it go."""
    import copy
    import pickle

    _call(models)
    held = models.base._ivg_decoder
    pools = held.decoder._group.caches["base"].pool.kv
    _, out = _call(models, seed=5)
    assert models.base._ivg_decoder is held and held.decoder._group.caches["base"].pool.kv is pools
    expect = IVGDecoder(models).generate(
        [[5, 6, 7], [8, 9, 10, 11]], DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=6,
                                                    temperature=0.9, seed=5, eos_token_ids=()))
    assert out[:, 4:].tolist() == [r.beams[0].tokens for r in expect]
    g = models.guides[0]
    _call(models, guides=[(g.tuned, g.ref, 2.0)])
    assert models.base._ivg_decoder is not held and models.base._ivg_decoder.decoder.models.guides[0].beta == 2.0
    for other in (copy.deepcopy(models.base), pickle.loads(pickle.dumps(models.base))):
        assert other._ivg_decoder.decoder is None
        ids = torch.tensor([[5, 6, 7]])
        got = other.generate(ids, custom_generate=ivg.CUSTOM_GENERATE, trust_remote_code=True,
                             guides=[(g.tuned, g.ref, g.beta)], token_rm=models.token_rm, width=2, successors=2,
                             chunk_len=3, max_new_tokens=6, temperature=0.9, do_sample=True, seed=4, eos_token_id=None)
        assert got[0, 3:].tolist() == [r.beams[0].tokens for r in IVGDecoder(models).generate(
            [[5, 6, 7]], DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=6,
                                       temperature=0.9, seed=4, eos_token_ids=()))][0]
        assert other._ivg_decoder.decoder is not None
    del models.base._ivg_decoder
    assert not hasattr(models.base, "_ivg_decoder")
