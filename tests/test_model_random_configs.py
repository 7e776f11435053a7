"""PagedModel on randomly drawn transformers configurations (a fixed seed) against the same weights run from
scratch by transformers: GPT-2 with other activations, unscaled attention and other MLP widths; Llama,
Mistral and Qwen2 with head dims unlike hidden / heads, grouped-query attention, biases, tied embeddings,
every RoPE type a checkpoint may name (default, linear, dynamic, llama3, yarn), sliding windows and
Qwen2's per-layer windows; Gemma 2 with attention logit soft-capping (and the final logits' cap) and
gpt-oss with attention sinks, each with per-layer windows and scores large enough for the cap and the sinks
to matter; the lean forward on and off; block sizes from 1; ragged prefills, decode steps,
multi-token extends and forks. The family tests pin each setting; these cover their combinations."""
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, Gemma2Config, GptOssConfig, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from ivg.paged_model import PagedModel  # noqa: E402

from .test_model_families import sharpen  # noqa: E402
from .test_paged_models import _pair, _scratch  # noqa: E402

V = 97
CASES, SEED = 40, 20261205


def _rope(rng):
    kind = rng.choice(["default", "default", "linear", "dynamic", "llama3", "yarn"])
    p = dict(rope_theta=rng.choice([10000.0, 500000.0, 100.0]), rope_type=kind)
    if kind in ("linear", "dynamic"):
        p["factor"] = rng.choice([2.0, 4.0])
    elif kind == "llama3":
        p.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    elif kind == "yarn":
        p.update(factor=8.0, original_max_position_embeddings=32)  # 256 / 32: the factor the positions imply
    return p


def _config(rng):
    family = rng.choice(["gpt2", "llama", "mistral", "qwen2", "gemma2", "gpt_oss"])
    if family == "gpt2":
        heads = rng.choice([1, 2, 4])
        return GPT2Config(n_layer=rng.randint(1, 3), n_head=heads, n_embd=heads * rng.choice([4, 8, 16]), vocab_size=V,
                          n_positions=256, activation_function=rng.choice(["gelu_new", "relu", "gelu", "silu"]),
                          scale_attn_weights=rng.random() < 0.8, n_inner=rng.choice([None, 24]),
                          layer_norm_epsilon=rng.choice([1e-5, 1e-3]), tie_word_embeddings=rng.random() < 0.8,
                          bos_token_id=0, eos_token_id=0)
    kv_heads = rng.choice([1, 2])
    heads, head_dim = kv_heads * rng.choice([1, 2, 3]), rng.choice([4, 8, 16])
    kw = dict(hidden_size=rng.choice([heads * head_dim, 24, 48]), intermediate_size=rng.choice([16, 40]),
              num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv_heads,
              head_dim=head_dim, vocab_size=V, max_position_embeddings=256, rms_norm_eps=rng.choice([1e-6, 1e-2]),
              tie_word_embeddings=rng.random() < 0.3, hidden_act=rng.choice(["silu", "gelu", "relu"]),
              rope_parameters=_rope(rng))
    if family == "llama":
        return LlamaConfig(attention_bias=rng.random() < 0.3, mlp_bias=rng.random() < 0.3, **kw)
    if family == "mistral":
        return MistralConfig(sliding_window=rng.choice([None, 3, 8, 30]), **kw)
    layer_types = [rng.choice(["sliding_attention", "full_attention"]) for _ in range(kw["num_hidden_layers"])]
    if family == "gemma2":
        kw.pop("hidden_act")
        return Gemma2Config(attn_logit_softcapping=rng.choice([None, 0.5, 3.0, 50.0]),
                            final_logit_softcapping=rng.choice([None, 2.0, 30.0]),
                            query_pre_attn_scalar=rng.choice([head_dim, 7]), sliding_window=rng.choice([2, 5, 30]),
                            layer_types=layer_types, **kw)
    if family == "gpt_oss":
        kw.pop("hidden_act")
        return GptOssConfig(num_local_experts=rng.choice([2, 4]), num_experts_per_tok=rng.choice([1, 2]),
                            sliding_window=rng.choice([2, 5, 30]), layer_types=layer_types, **kw)
    return Qwen2Config(use_sliding_window=rng.random() < 0.5, sliding_window=rng.choice([3, 8, 30]),
                       max_window_layers=rng.randint(0, 3), **kw)


def test_paged_models_of_random_configurations_match_transformers():
    rng = random.Random(SEED)
    for case in range(CASES):
        cfg, dtype = _config(rng), rng.choice([torch.float32, torch.float64])
        if isinstance(cfg, GptOssConfig):
            dtype = torch.float32  # (its experts' grouped matmul takes no float64)
        lean, block_size = rng.choice([True, False]), rng.choice([1, 2, 4, 16])
        capped = isinstance(cfg, (Gemma2Config, GptOssConfig))  # soft-capping or sinks
        lean = lean and not capped  # (families the lean forward has not)
        sharp = rng.choice([1.0, 10.0, 40.0]) if capped else 1.0
        where = (f"case {case}: {type(cfg).__name__} {cfg.to_diff_dict()} {dtype} lean={lean} block_size={block_size} "
                 f"sharpened x{sharp}")
        oracle, model = (m.to(dtype) for m in _pair(cfg, seed=case))
        if capped:  # scores a cap bites on; sinks of a spread that matters
            sharpen(oracle, sharp, torch.Generator().manual_seed(int(sharp)))
            model.load_state_dict(oracle.state_dict())
        pm = PagedModel(model, num_blocks=512, block_size=block_size, backend="reference", lean=lean)
        assert (pm.lean is not None) == lean, where
        # transformers' eager attention takes its softmax in float32, so float64 agrees to about 1e-8 only
        # (1e-5 for scores up to 1600 times larger, which that float32 rounding follows)
        tol = 1e-4 if dtype == torch.float32 else 1e-6 if sharp == 1 else 1e-5
        gen = torch.Generator().manual_seed(case)
        prompts = [torch.randint(0, V, (rng.randint(1, 40),), generator=gen).tolist() for _ in range(rng.randint(1, 3))]
        live = pm.blocks.new_sequences(len(prompts))
        history = dict(zip(live, [list(p) for p in prompts]))
        new = prompts
        for step in range(rng.randint(2, 10)):
            logits = pm(live, new)
            for s, tokens in zip(live, new):
                history[s] += [] if step == 0 else tokens
            for i, s in enumerate(live):
                diff = (logits[i].double() - _scratch(oracle, history[s]).double()).abs().max().item()
                assert diff <= tol, f"{where}: step {step}, row {i}: max |diff| {diff:.2e}"
            if rng.random() < 0.25:  # fork a row into one to three children, free the parent
                parent = rng.choice(live)
                kids = pm.blocks.fork(parent, rng.randint(1, 3))
                history.update({k: list(history[parent]) for k in kids})
                pm.blocks.free(parent)
                live = [s for s in live if s != parent] + kids
            new = [torch.randint(0, V, (rng.choice([1, 1, 1, 2, 5]),), generator=gen).tolist() for _ in live]
        pm.blocks.free_many(live)
        assert pm.blocks.num_free_blocks == pm.blocks.num_blocks, where

