"""longrope RoPE scaling in paged forwards (``ivg.row_rope``): transformers picks a longrope model's short or long
frequencies by the longest sequence of a forward; a paged forward holds many sequences, so each must get the
frequencies it would get alone. The oracle is transformers itself, each sequence run alone with a cache and
fed the same pieces (the keys a forward rotated stay in the cache, so the pieces matter)."""
import copy
import random
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, DynamicCache, LlamaConfig, Phi3Config,  # noqa: E402
                          PreTrainedConfig)

from ivg.cuda_graphs import DecodeGraphs  # noqa: E402
from ivg.paged_model import PagedModel  # noqa: E402

from .decoder_fixtures import with_graph_buffers  # noqa: E402
from .helpers import DEVICE  # noqa: E402
from .test_paged_models import _pair  # noqa: E402

V = 97
SWITCH = 16


def _longrope(switch=SWITCH, head_dim=8):
    half = head_dim // 2
    return dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=switch,
                short_factor=[1.0 + 0.1 * i for i in range(half)], long_factor=[4.0 + i for i in range(half)])


def _config(family, rope) -> PreTrainedConfig:
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=V, max_position_embeddings=256, rope_parameters=rope)
    if family == "phi3":  # the family longrope checkpoints ship in (fused projections; no lean forward)
        return Phi3Config(original_max_position_embeddings=rope.get("original_max_position_embeddings"),
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    return LlamaConfig(**kw)


@torch.no_grad()
def _alone(model, pieces):
    """transformers' logits after the last piece, the sequence fed piece by piece through a cache (float64 models:
    its eager attention takes the softmax in float32, so it agrees to about 1e-8)."""
    cache = DynamicCache(config=model.config)
    for piece in pieces:
        out = model(torch.tensor([piece], device=DEVICE), past_key_values=cache, use_cache=True)
    return out.logits[0, -1]


CASES = [("llama", True, False), ("llama", False, False), ("llama", True, True), ("phi3", False, False),
         ("phi3", False, True)]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*original_max_position_embeddings.*")
@pytest.mark.parametrize("family,lean,graphs", CASES)
def test_each_sequence_gets_the_frequencies_it_would_get_alone(family, lean, graphs):
    """Ragged prompts on both sides of the switch, decode steps and extends that carry rows across it one by
    one, forks: every row's logits are those of the row alone (lean and transformers forwards; the CUDA
    graphs' static buffers, run eagerly off CUDA)."""
    # float64 on the CPU; on a GPU float32 through the Triton attention, so that the graphs are captured
    dtype, backend, tol = (torch.float64, "reference", 1e-6) if DEVICE.type == "cpu" else (torch.float32, "auto", 1e-4)
    oracle, model = (m.to(dtype) for m in _pair(_config(family, _longrope()), seed=1))
    pm = PagedModel(model, num_blocks=256, block_size=4, backend=backend, lean=lean or False)
    assert pm.row_rope is not None and (pm.lean is not None) == lean
    if graphs:
        pm.graphs = DecodeGraphs(pm)
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (3, 9, 14, 20)]
    live = pm.blocks.new_sequences(len(prompts))
    pieces = {s: [p] for s, p in zip(live, prompts)}
    new, mixed = prompts, 0
    for step in range(12):
        counts = [len(t) for t in new]
        logits = pm(live, new) if step % 3 else pm(live, torch.tensor([t for n in new for t in n], device=DEVICE),
                                                     counts=counts)
        lens = [sum(map(len, pieces[s])) for s in live]
        mixed += min(lens) <= SWITCH < max(lens)
        for i, s in enumerate(live):
            diff = (logits[i] - _alone(oracle, pieces[s])).abs().max().item()
            assert diff <= tol, f"step {step}, row {i} ({lens[i]} tokens): max |diff| {diff:.2e}"
        if step == 4:  # fork the shortest row into two
            parent = live[lens.index(min(lens))]
            kids = pm.blocks.fork(parent, 2)
            pieces.update({k: list(pieces[parent]) for k in kids})
            pm.blocks.free(parent)
            live = [s for s in live if s != parent] + kids
        q = rng.choice([1, 1, 2])  # the same count for every row: a graph's extend
        new = [torch.randint(0, V, (q,), generator=gen).tolist() for _ in live]
        for s, t in zip(live, new):
            pieces[s].append(t)
    assert mixed >= 8, "precondition: most forwards hold rows on both sides of the switch"
    if graphs:
        assert pm.graphs.replays > 0
    pm.blocks.free_many(live)


@pytest.mark.filterwarnings("ignore:.*original_max_position_embeddings.*")
def test_the_model_called_directly_is_transformers_own():
    """Outside a paged forward the wrapped rotary embedding is transformers': the model a PagedModel was made
    over gives its twin's logits, short and past the switch, before and after a paged forward."""
    twin, model = _pair(_config("llama", _longrope()), seed=2)
    pm = PagedModel(model, num_blocks=64, block_size=4, backend="reference")
    a, b = pm.blocks.new_sequences(2)
    pm([a, b], [[5] * 4, [6] * 30])  # a mixed paged forward first
    for n in (10, 30):
        ids = torch.arange(1, n + 1, device=DEVICE).unsqueeze(0) % V
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=0)


def _llama(rope):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config("llama", rope)).double().eval()


def test_a_warning_only_where_sequences_cannot_choose(monkeypatch):
    """A longrope model whose rotary embedding ivg.row_rope cannot wrap gets a warning that results depend on
    the batch (and the warning is true: a short row's logits change beside a long one); a longrope model it can
    wrap, and every other RoPE type, get none."""
    for rope in (dict(rope_type="default", rope_theta=10000.0), dict(rope_type="dynamic", factor=2.0, rope_theta=1e4),
                 _longrope(), _longrope(switch=256)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            PagedModel(_llama(rope), num_blocks=8, block_size=4, backend="reference")
    monkeypatch.setattr("ivg.paged_model.row_rope", lambda model, switch: None)
    with pytest.warns(UserWarning, match="longrope RoPE scaling.*past 16 tokens.*depend on the batch"):
        pm = PagedModel(_llama(_longrope()), num_blocks=64, block_size=4, backend="reference")
    short, long = list(range(1, 11)), list(range(1, 31))
    a, = pm.blocks.new_sequences(1)
    alone = pm([a], [short])[0]
    b, c = pm.blocks.new_sequences(2)
    assert (alone - pm([b, c], [short, long])[0]).abs().max() > 1e-6


def _as_before_5_24(model):
    """``model`` with its rotary forward wrapped in ``torch.no_grad()`` outside ``dynamic_rope_update``, as
    transformers 5.0 to 5.23 decorate it (5.24 dropped the outer wrapper)."""
    rotary = next(m for m in model.modules() if getattr(m, "rope_type", None) == "longrope")
    base = type(rotary)
    rotary.__class__ = type(base.__name__, (base,), {"forward": torch.no_grad()(base.forward)})
    return model


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*original_max_position_embeddings.*")
def test_a_rotary_forward_wrapped_again_still_chooses_per_sequence():
    """Under transformers 5.0 to 5.23 ``torch.no_grad()`` wraps the rotary forward outside
    ``dynamic_rope_update``, so the forward one ``__wrapped__`` down still chose the frequencies by the longest
    sequence, and every row of a forward beside one past the switch got the long ones (all of this file's
    per-sequence tests failed there). The wrapper is now found by its code: a short row's logits are the same
    alone and beside a long row, and those of the model's twin run alone."""
    twin, model = (_as_before_5_24(m.double()) for m in _pair(_config("llama", _longrope()), seed=3))
    pm = PagedModel(model, num_blocks=64, block_size=4, backend="reference")
    assert pm.row_rope is not None
    short, long = list(range(1, 11)), list(range(1, 31))
    a, = pm.blocks.new_sequences(1)
    alone = pm([a], [short])[0]
    b, c = pm.blocks.new_sequences(2)
    torch.testing.assert_close(pm([b, c], [short, long])[0], alone, rtol=0, atol=1e-9)  # the bug: 1e-3 apart
    torch.testing.assert_close(alone, _alone(twin, [short]), rtol=0, atol=1e-6)


def test_paged_models_over_one_model_share_its_wrapper():
    """Two PagedModels over one model wrap its rotary embedding once, and each decodes as it would alone."""
    model = _llama(_longrope())
    first, second = (PagedModel(model, num_blocks=64, block_size=4, backend="reference") for _ in range(2))
    assert first.row_rope is second.row_rope
    out = []
    for pm in (first, second):
        a, b = pm.blocks.new_sequences(2)
        out.append(pm([a, b], [[3] * 5, [4] * 25]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("graphs,speculate", [(False, 0), (True, 0), (False, 3)],
                         ids=["eager", "graph-buffers", "speculative"])
def test_the_decoder_stays_batch_invariant(monkeypatch, graphs, speculate):
    """IVG over a longrope base whose switch the prompts cross at different steps: decoding them together, in
    pairs or one at a time gives the same beams. Also with speculative rounds, whose draft model (the tuned
    guide, longrope too) runs its one-token forwards for rows on both sides of the switch: its logits are the
    tuned guide's in the draw and in the implicit value, which shows frequencies chosen by the longest row (the
    tokens and the explicit score did not)."""
    from ivg.decoder import IVGDecoder
    from ivg.models import GuidePair, IVGModels, TokenRewardModel
    from ivg.options import DecodeOptions

    from .decoder_fixtures import EOS, VOCAB, char_tokenizer, lm

    if graphs:
        with_graph_buffers(monkeypatch)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=96, eos_token_id=EOS,
                      bos_token_id=EOS, rope_parameters=_longrope(switch=12, head_dim=4))

    def longrope(seed, make=AutoModelForCausalLM.from_config):
        torch.manual_seed(seed)
        model = make(cfg).double().eval()
        with torch.no_grad():  # logits large enough for guidance to change the draws
            (model.score_head.weight if isinstance(model, TokenRewardModel) else model.lm_head.weight).mul_(12.0)
        return model

    # the base, the tuned guide and the token RM longrope (the draws, the implicit and the explicit values)
    models = IVGModels(base=longrope(1), guides=[GuidePair(longrope(2), lm("gpt2", 3), 1.5)],
                       token_rm=longrope(4, TokenRewardModel.from_body_config), token_rm_weight=0.7,
                       tokenizer=char_tokenizer())
    prompts = ["a", "the movie", "it is a truly wonderful day"]  # 1, 9 and 27 tokens: the switch is 12
    opts = DecodeOptions(mode="ivg", width=2, successors=3, chunk_len=4, max_new_tokens=14, seed=11,
                         temperature=1.0, num_return=2, eos_token_ids=(), speculate=speculate)
    dec = IVGDecoder(models)
    together = dec.generate(prompts, opts)
    assert (dec.last_stats.drafted > 0) == bool(speculate)
    import ivg.decode_loop as decode_loop

    with monkeypatch.context() as m:  # prompts read in forwards of at most 10 tokens: the 27 alone, read whole
        m.setattr(decode_loop, "PREFILL_TOKENS", 10)
        m.setattr(decode_loop, "CPU_PREFILL_TOKENS", 10)
        bounded = IVGDecoder(models).generate(prompts, opts)
    for decoded in ([IVGDecoder(models).generate([p], opts)[0] for p in prompts],
                    IVGDecoder(models, max_batch_prompts=2).generate(prompts, opts), bounded):
        for x, y in zip(together, decoded):
            assert [b.tokens for b in x.beams] == [b.tokens for b in y.beams], x.prompt
            for bx, by in zip(x.beams, y.beams):  # the explicit value (the score) and the implicit one
                for u, v in ((bx.score, by.score), (bx.implicit_value, by.implicit_value)):
                    assert abs(u - v) <= 1e-12 * max(1.0, abs(v)), x.prompt


@pytest.mark.filterwarnings("ignore:.*original_max_position_embeddings.*")
def test_a_deep_copy_of_a_wrapped_model_stands_alone():
    """A model deep-copied after a PagedModel wrapped its rotary embedding keeps working once the original is
    gone: called directly (transformers' logits) and made paged (each sequence its own frequencies)."""
    import gc

    twin, model = _pair(_config("llama", _longrope()), seed=3)
    PagedModel(model, num_blocks=8, block_size=4, backend="reference")
    copied = copy.deepcopy(model)
    del model
    gc.collect()
    ids = torch.arange(1, 31, device=DEVICE).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).logits, twin(ids).logits, rtol=0, atol=0)
    pm = PagedModel(copied, num_blocks=64, block_size=4, backend="reference")
    a, b = pm.blocks.new_sequences(2)
    short = pm([a, b], [list(range(1, 6)), list(range(1, 31))])[0]
    with torch.no_grad():
        torch.testing.assert_close(short, twin(ids[:, :5]).logits[0, -1], rtol=1e-5, atol=1e-5)
