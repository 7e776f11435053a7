"""Random-weight GPT-2 model sets with a synthetic tokenizer, for benchmarks at sizes the demo lacks.

Nothing comes from a model hub here, so the GPU benchmarks build their models: ``build(work, name,
dtype)`` saves a base, a tuned and a reference guide and a token reward model of ``RANDOM_MODELS[name]``'s
sizes under ``work`` (once; later calls reuse them), in this project's formats and, for the token RM,
also in the published code's (``GPT2ModelForTokenScore``: one state dict, no score-head bias). The
tokenizer is word level ("w0" .. "w{V-1}", one word per token), so decoding and re-tokenizing a response
gives back its ids, as the published code's prompt wrappers need.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

# Model sets: (layers, width, heads) of the base and of the small models
# (guides and token RM), and the vocabulary of a synthetic word-level tokenizer ("w0" .. "w{V-1}", one
# word per token, so decoding and re-tokenizing give the same ids, as the published wrappers need).
RANDOM_MODELS = {
    "tiny-random": dict(vocab=1024, base=(4, 128, 4), small=(2, 64, 2)),  # the GPU path, checked on a CPU
    "gpt2-xl": dict(vocab=50257, base=(48, 1600, 25), small=(12, 768, 12)),  # the GPU setting
    "host-probe": dict(vocab=64, base=(1, 8, 1), small=(1, 8, 1)),  # next to no compute: the loop's host work
}


def published_rm(body_state: dict, head, config: dict, dst: Path) -> None:
    """The token RM as the published ``GPT2ModelForTokenScore`` reads it: one state dict, body under
    ``transformer.``, the score head without bias."""
    import torch

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2ModelForTokenScore"])))
    state = {(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in body_state.items()}
    state["score_head.weight"] = head
    torch.save(state, dst / "pytorch_model.bin")


def build(work: Path, name: str, dtype: str) -> dict:
    """Random-weight GPT-2s of ``RANDOM_MODELS[name]``'s sizes, saved once in ``work`` in ``dtype``:
    ``{"ours": {role: path}, "published": {role: path}}`` (the same files but the token RM's)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    from ivg.models import TokenRewardModel

    spec = RANDOM_MODELS[name]
    root = work / f"random-{spec['vocab']}-{'x'.join(map(str, spec['base']))}-{dtype}"
    paths = {k: root / k for k in ("base", "tuned", "ref", "rm", "published-rm")}
    if not (root / "DONE").exists():
        vocab = spec["vocab"]
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok_cfg = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token="w0", bos_token="w0", unk_token="w0",
                       model_input_names=["input_ids", "attention_mask"])

        def config(layers, width, heads):
            return GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=1024,
                              bos_token_id=0, eos_token_id=0)

        def save_tokenizer(dst):
            tok.save(str(dst / "tokenizer.json"))
            (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

        for seed, name in enumerate(("base", "tuned", "ref")):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config(*spec["base" if name == "base" else "small"])).to(getattr(torch, dtype))
            model.save_pretrained(paths[name])
            save_tokenizer(paths[name])
        torch.manual_seed(3)
        body_cfg = config(*spec["small"])
        rm = TokenRewardModel(GPT2Model(body_cfg), torch.nn.Linear(body_cfg.n_embd, vocab, bias=False))
        torch.nn.init.normal_(rm.score_head.weight, std=0.02)
        rm = rm.to(getattr(torch, dtype))
        rm.save_pretrained(paths["rm"])
        save_tokenizer(paths["rm"])
        published_rm(rm.body.state_dict(), rm.score_head.weight.detach(), body_cfg.to_dict(), paths["published-rm"])
        save_tokenizer(paths["published-rm"])
        (root / "DONE").write_text("")
    ours = {k: str(paths[k]) for k in ("base", "tuned", "ref", "rm")}
    return {"ours": ours, "published": dict(ours, rm=str(paths["published-rm"]))}


def prompts(n: int, name: str, seed: int) -> list[str]:
    """Prompts of 8 to 24 words of the synthetic tokenizer (never its EOS word ``w0``)."""
    vocab = RANDOM_MODELS[name]["vocab"]
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(1, vocab)}" for _ in range(rng.randint(8, 24))) for _ in range(n)]


def latency_set(name: str, n: int, device: str, dtype: str | None = None, work: str | None = None,
                seed: int = 4242) -> tuple:
    """``(models, prompts, dtype)`` for the one-prompt-at-a-time benchmarks: the demo's trained models
    (``name`` "demo", built and cached by ``ivg demo``; ``dtype`` None) or the random-weight set ``name``
    (``dtype`` by default float32 on the CPU, bfloat16 on a GPU; saved under ``work``, by default a
    temporary folder), loaded on ``device``, ``n`` prompts, and the dtype asked for (None: the demo's own)."""
    import tempfile

    from ivg.demo.build import build as build_demo
    from ivg.demo.corpus import held_out_prompts
    from ivg.demo.run import load_demo_models

    if name == "demo":
        paths, texts = build_demo(progress=False), held_out_prompts(n, seed)
    else:
        dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
        folder = Path(work) if work else Path(tempfile.mkdtemp(prefix=f"ivg-{name}-"))
        paths, texts = build(folder, name, dtype)["ours"], prompts(n, name, seed)
    return load_demo_models(paths, device=device, dtype=dtype), texts, dtype
