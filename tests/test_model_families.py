"""Which transformers families PagedModel serves: those whose attention goes through transformers'
AttentionInterface give the logits transformers gives (each with what sets it apart: partial or interleaved
rotary embeddings, learned positions, multi-query attention, query/key norms, per-layer windows, experts);
those it cannot serve exactly are refused when the PagedModel is made, with the reason, not decoded wrongly."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ivg.paged_model import PagedModel, paged_attention_forward  # noqa: E402

from .helpers import DEVICE  # noqa: E402

V = 97
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=256, head_dim=8)
# latent attention expands keys and values to every head (its checkpoints give as many KV heads as heads)
DEEPSEEK = dict({k: v for k, v in LLAMA_LIKE.items() if k != "head_dim"}, num_key_value_heads=4, q_lora_rank=None,
                kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2,
                num_experts_per_tok=1, first_k_dense_replace=2, moe_intermediate_size=16, n_group=1, topk_group=1)
SERVED = {
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V,
                     max_position_embeddings=256, rotary_pct=0.5),  # partial rotary, parallel residual
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=V,
                max_position_embeddings=256, word_embed_proj_dim=32),  # learned positions (offset 2)
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=V, n_positions=256),  # interleaved rotary
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=256, multi_query=True),
    "qwen3": LLAMA_LIKE,  # query/key RMS norms
    "gemma3_text": dict(LLAMA_LIKE, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "mixtral": dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    # logit soft-capping at 0.7 (queries and keys scaled up so that it bites: 0.37 off without it), windows
    "gemma2": dict(LLAMA_LIKE, attn_logit_softcapping=0.7, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"]),
    # attention sinks (drawn with a spread of 2: 0.19 off without them), windows, experts
    "gpt_oss": dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    "granite_swa": dict(LLAMA_LIKE, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),  # sinks
    # multi-head latent attention: keys of 12 (8 + 4 rotary), values of 8, held zero-padded to 12
    "deepseek_v2": DEEPSEEK,
    "deepseek_v3": DEEPSEEK,
    "minicpm3": dict(DEEPSEEK, scale_emb=2.0, scale_depth=1.4, dim_model_base=16),
    # layers of several shapes (a heterogeneous config): full-attention layers with heads of 16 (8 in the sliding
    # ones) and one KV head (two), keys as values; the cache holds two heads of 16, the others padded and repeated.
    # The last two layers attend with the keys and values of the last earlier layer of their type
    "gemma4_text": dict(LLAMA_LIKE, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                        sliding_window=4, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
                        num_kv_shared_layers=2),
    # KV sharing as in Gemma 4, with per-layer inputs, AltUp and LAuReL blocks
    "gemma3n_text": dict(LLAMA_LIKE, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, sliding_window=4, hidden_size_per_layer_input=8, laurel_rank=4,
                         altup_num_inputs=2, intermediate_size=[64] * 4, activation_sparsity_pattern=[0.0] * 4),
    # sliding-window layers with twice the KV heads the config states (the cache takes the modules' most), values of
    # 8 under keys of 12, sinks in the sliding layers
    "mimo_v2_flash": dict(LLAMA_LIKE, head_dim=12, v_head_dim=8, layer_types=["full_attention", "sliding_attention"],
                          sliding_window=4, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                          mlp_layer_types=["dense", "dense"]),
}

REFUSED = {
    "falcon": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V), "its own attention"),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=V), "its own attention"),
    "mpt": (dict(d_model=32, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=256), "its own attention"),
    "stablelm": (LLAMA_LIKE, "its own attention"),
    # hybrids: layers that keep recurrent or convolution state, which the paged cache does not hold
    "lfm2": (dict(LLAMA_LIKE, layer_types=["conv", "full_attention"], block_dim=32, block_ff_dim=64, conv_L_cache=3),
             "layers of type conv"),
    "minimax": (dict(LLAMA_LIKE, layer_types=["linear_attention", "full_attention"], num_local_experts=2,
                     num_experts_per_tok=1), "layers of type linear_attention"),
}


def _model(family, kw, seed=0):
    cfg = AutoConfig.for_model(family, pad_token_id=0, bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    sharpen(model, 40)  # scores and sinks large enough that soft-capping and sinks change the logits
    return model.to(DEVICE)


@torch.no_grad()
def sharpen(model, factor, generator=None):
    """Queries and keys scaled by ``factor`` (scores by its square), sinks drawn with a spread of 2 (from
    ``generator``, on the CPU, else torch's default one)."""
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            p.mul_(factor)
        elif name.endswith(".sinks"):
            p.copy_(torch.randn(p.shape, generator=generator) * 2.0) if generator is not None else p.normal_(0.0, 2.0)


@pytest.mark.parametrize("family", list(SERVED))
def test_families_on_the_attention_interface_match_transformers(family):
    """Two ragged prompts, decode steps across block boundaries, a fork: each row's logits as transformers'
    from scratch."""
    oracle = _model(family, SERVED[family])
    model = copy.deepcopy(oracle)
    if getattr(type(model), "_supports_attention_backend", True) is False:
        # an older transformers runs this family's own attention code (GPT-J in transformers 5.17): refused, named
        with pytest.raises(ValueError, match="runs its own attention code"):
            PagedModel(model, num_blocks=64, block_size=4, backend="reference")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning
        pm = PagedModel(model, num_blocks=64, block_size=4, backend="reference")
    history = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]]
    seqs = pm.blocks.new_sequences(2)
    pm(seqs, history)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 2:
            kid, = pm.blocks.fork(seqs[0], 1)
            seqs, history = seqs + [kid], history + [list(history[0])]
        new = torch.randint(1, V, (len(seqs),), generator=gen).tolist()
        for h, t in zip(history, new):
            h.append(t)
        logits = pm(seqs, [[t] for t in new])
        with torch.no_grad():
            want = torch.stack([oracle(torch.tensor([h], device=DEVICE)).logits[0, -1] for h in history])
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4, msg=f"{family}, step {step}")
    pm.blocks.free_many(seqs)
    assert pm.blocks.num_free_blocks == pm.blocks.num_blocks


def test_a_multimodal_model_runs_its_text_decoder_on_the_paged_cache():
    """Gemma 3 with its vision tower (6 heads, not causal, unnumbered): the cache is the text layers' (2 KV heads),
    and text prompts give transformers' logits."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(LLAMA_LIKE, vocab_size=300, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=6, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    oracle = Gemma3ForConditionalGeneration(cfg).eval().to(DEVICE)
    pm = PagedModel(copy.deepcopy(oracle), num_blocks=32, block_size=4, backend="reference")
    assert tuple(pm.cache.pool.kv.shape[4:]) == (2, 8)
    tokens = torch.randint(1, 290, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = pm(pm.blocks.new_sequences(1), [tokens])
    with torch.no_grad():
        want = oracle(input_ids=torch.tensor([tokens], device=DEVICE)).logits[0, -1]
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(REFUSED))
def test_families_it_cannot_serve_exactly_are_refused_with_the_reason(family):
    kw, reason = REFUSED[family]
    model = _model(family, kw)
    with pytest.raises(ValueError, match=f"model: .*{reason}"):
        PagedModel(model, num_blocks=8, block_size=4, backend="reference")
    assert model.config._attn_implementation != "ivg_paged", "a refused model keeps its attention"


@pytest.mark.parametrize("family,kw,match", [
    ("lfm2", REFUSED["lfm2"][0], "1 of Lfm2ForCausalLM's 2 layers attended through the paged cache"),
    ("diffllama", LLAMA_LIKE, "2 layers attended 4 times"),  # differential attention: twice per layer
])
def test_a_model_the_checks_do_not_know_is_refused_at_its_first_forward(monkeypatch, family, kw, match):
    """Where the construction-time check lets a model through (a family it does not know), its first forward
    refuses it: a layer that did not attend through the paged cache, or keys and values of other shapes than
    the cache's. The cache is then as before the forward."""
    monkeypatch.setattr("ivg.paged_model.check_family", lambda model: None)
    pm = PagedModel(_model(family, kw), num_blocks=16, block_size=4, backend="reference")
    seqs = pm.blocks.new_sequences(2)
    with pytest.raises(ValueError, match=match):
        pm(seqs, [[3, 4, 5], [6, 7]])
    assert list(pm.blocks.seq_lens(seqs)) == [0, 0] and pm.blocks.num_free_blocks == pm.blocks.num_blocks


@pytest.mark.parametrize("lean", [None, False])
def test_a_config_that_misstates_the_kv_heads_is_refused(lean):
    """A GPT-2 config with a ``num_key_value_heads`` key (which GPT-2 does not read) sizes the cache for 2 KV heads
    where the layers hold 4: the lean forward's check refuses it when the PagedModel is made, transformers' path at
    its first forward (the cache as before), both naming the shapes; neither reaches an indexing error."""
    model = _model("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=256, num_key_value_heads=2))
    with pytest.raises(ValueError, match="(hold 4 KV heads of 8; its config states 2 of 8|keys of 4 heads of 8 .* the "
                                         "paged cache holds 2 heads of 8)"):
        pm = PagedModel(model, num_blocks=16, block_size=4, backend="reference", lean=lean)
        seqs = pm.blocks.new_sequences(1)
        try:
            pm(seqs, [[3, 4, 5]])
        finally:
            assert list(pm.blocks.seq_lens(seqs)) == [0] and pm.blocks.num_free_blocks == pm.blocks.num_blocks


@pytest.mark.parametrize("argument,value,match", [
    ("position_bias", torch.zeros(1), "position_bias"), ("is_causal", False, "is_causal"),
    ("s_aux", torch.zeros(2, 4), r"sinks of shape \(2, 4\).*one sink logit per query head \(4\)"),
    ("sinks", torch.zeros(3), r"sinks of shape \(3,\)"), ("softcap", -1.0, "soft-caps .* at -1.0"),
])
def test_the_attention_refuses_arguments_that_change_its_result(argument, value, match):
    """For a family the construction-time check does not know: the attention function names what it cannot
    compute (soft-capping and sinks of one logit per head it computes; other forms it refuses)."""
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        paged_attention_forward(torch.nn.Module(), q, q, q, None, ivg_batch=object(), **{argument: value})


def _ivg_models(base, rm_family):
    """The decoder tests' models with ``base`` as the base and a token RM whose body is of ``rm_family``."""
    from ivg.models import TokenRewardModel

    from .decoder_fixtures import EOS, VOCAB, ivg_models

    models = ivg_models("gpt2")
    cfg = AutoConfig.for_model(rm_family, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS)
    models.token_rm = TokenRewardModel.from_body_config(cfg).double().eval()
    models.base = base if base is not None else models.base
    return models


def _phi3_base():
    from .decoder_fixtures import EOS, VOCAB

    cfg = AutoConfig.for_model("phi3", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=96, pad_token_id=0,
                               bos_token_id=EOS, eos_token_id=EOS)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(cfg).double().eval()  # no lean forward: made paged, its attention switches


def test_a_decoder_refuses_such_a_model_before_it_allocates():
    """A token RM on Falcon: check() and generate() name it before any cache or paged model exists; the same
    decoder then decodes a mode without the token RM as a fresh one does."""
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _ivg_models(_phi3_base(), "falcon")
    dec = IVGDecoder(models)
    ivg = DecodeOptions(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=6, seed=3, num_return=1)
    for call in (dec.check, dec.generate):
        with pytest.raises(ValueError, match=r"model: TokenRewardModel \(FalconModel\) runs its own attention"):
            call(["the movie"], ivg)
    assert dec._group is None and dec._paged == {}
    assert all(m.config._attn_implementation != "ivg_paged" for _, m, _ in models.roles())
    eft = DecodeOptions(mode="eft", max_new_tokens=6, seed=3)
    got, want = dec.generate(["the movie"], eft), IVGDecoder(models).generate(["the movie"], eft)
    assert got[0].beams[0].tokens == want[0].beams[0].tokens


def test_models_made_paged_before_a_failing_one_get_their_attention_back(monkeypatch):
    """Where making a later model's PagedModel fails, the ones made before it give their models' attention
    back (the base here, whose attention the paged cache switches)."""
    from ivg import decoder
    from ivg.options import DecodeOptions

    models = _ivg_models(_phi3_base(), "gpt2")
    real, made = decoder.PagedModel, []

    def failing(model, **kw):
        made.append(model)
        if len(made) == 3:
            raise RuntimeError("third paged model")
        return real(model, **kw)

    monkeypatch.setattr(decoder, "PagedModel", failing)
    with pytest.raises(RuntimeError, match="third paged model"):
        decoder.IVGDecoder(models).generate(["the movie"], DecodeOptions(mode="eft", max_new_tokens=4))
    assert made[0] is models.base
    assert all(m.config._attn_implementation != "ivg_paged" for _, m, _ in models.roles())


def _family_lm(family, seed, base=LLAMA_LIKE, **kw):
    """A decoder-test LM (the character vocabulary, logits scaled up) of ``family``, with :func:`_model`'s large
    scores and sinks, on transformers' eager attention."""
    from .decoder_fixtures import EOS, VOCAB

    model = _model(family, dict(base, vocab_size=VOCAB, **kw), seed=seed)
    model.config.eos_token_id = model.config.bos_token_id = EOS
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    return model


def _capped(models):
    """A Gemma 2 base (logit soft-capping, alternating windows) and a gpt-oss tuned guide (attention sinks)."""
    windows = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    models.base = _family_lm("gemma2", 1, attn_logit_softcapping=0.7, **windows)
    models.guides[0].tuned = _family_lm("gpt_oss", 2, num_local_experts=4, num_experts_per_tok=2, **windows)


def _latent(models):
    """A DeepSeek V3 base, a MiniCPM3 tuned guide and a DeepSeek V2 reference: latent attention, keys and values
    of two sizes."""
    models.base = _family_lm("deepseek_v3", 1, DEEPSEEK)
    models.guides[0].tuned = _family_lm("minicpm3", 2, SERVED["minicpm3"])
    models.guides[0].ref = _family_lm("deepseek_v2", 3, DEEPSEEK)


def _heterogeneous(models):
    """A Gemma 4 base (sliding layers with heads of 8, full-attention layers with heads of 16 and one KV head, the
    last two layers sharing earlier ones' keys and values) and a Gemma 3n tuned guide (KV sharing)."""
    models.base = _family_lm("gemma4_text", 1, SERVED["gemma4_text"])
    models.guides[0].tuned = _family_lm("gemma3n_text", 2, SERVED["gemma3n_text"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("swap", [_capped, _latent, _heterogeneous], ids=["softcap-sinks", "latent", "heterogeneous"])
def test_ivg_with_the_attention_variants_matches_the_naive_decoder(backend, swap):
    """IVG and EFT decoding with models whose attention differs from plain softmax attention (:func:`_capped`,
    :func:`_latent`): the paged decoder's tokens and values are the naive decoder's, which runs the models on
    transformers' own cache and eager attention (the Triton kernels in the interpreter off a GPU). float32:
    gpt-oss's experts multiply in no wider type."""
    from ivg.decoder import IVGDecoder
    from ivg.naive import NaiveDecoder
    from ivg.options import DecodeOptions

    from .test_decoder import PROMPTS, _same

    if backend == "triton":
        pytest.importorskip("triton")
    models = _ivg_models(None, "gpt2")
    swap(models)
    for _, model, _ in models.roles():
        model.float().to(DEVICE)
    for mode in ("ivg", "eft") if backend == "reference" else ("ivg",):  # (interpreted: ivg steps are eft in a search)
        opts = DecodeOptions(mode=mode, width=2, successors=2, chunk_len=3, max_new_tokens=8, seed=5, num_return=1)
        _same(IVGDecoder(models, backend=backend).generate(PROMPTS, opts), NaiveDecoder(models).generate(PROMPTS, opts),
              tol=1e-4)
