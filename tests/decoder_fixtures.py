"""Tiny models and a character tokenizer, built in memory for the decoder tests."""
from __future__ import annotations

import string

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

from ivg.models import GuidePair, IVGModels, TokenRewardModel  # noqa: E402

CHARS = string.ascii_lowercase + " .,!?"
EOS = 1


def char_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    """One token per character; id 0 <unk>, 1 <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1}
    for ch in CHARS + extra:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


VOCAB = len(CHARS) + 2


def _config(family: str, layers: int):
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=96,
                          eos_token_id=EOS, bos_token_id=EOS)
    return LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=96, eos_token_id=EOS,
                       bos_token_id=EOS)


def lm(family: str, seed: int, layers: int = 2, scale: float = 12.0, dtype=torch.float64):
    """A random causal LM whose logits are large enough for guidance to change the draws."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, layers)).to(dtype).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def token_rm(family: str, seed: int, scale: float = 12.0, dtype=torch.float64) -> TokenRewardModel:
    torch.manual_seed(seed)
    rm = TokenRewardModel.from_body_config(_config(family, 2)).to(dtype).eval()
    with torch.no_grad():
        rm.score_head.weight.mul_(scale)
    return rm


def ivg_models(family: str = "gpt2", dtype=torch.float64, **kw) -> IVGModels:
    return IVGModels(
        base=lm(family, 1, layers=3, dtype=dtype),
        guides=[GuidePair(lm(family, 2, dtype=dtype), lm(family, 3, dtype=dtype), 1.5)],
        token_rm=token_rm(family, 4, dtype=dtype),
        token_rm_weight=0.7,
        tokenizer=char_tokenizer(),
        **kw,
    )


def save_model_dirs(root, base_family: str = "gpt2") -> dict:
    """The test models saved to disk (base of ``base_family``, gpt2 guide pair and token RM), each with the
    character tokenizer; returns their paths by role."""
    tok = char_tokenizer()
    dirs = {}
    layers = 3 if base_family == "gpt2" else 2
    for name, model in (("base", lm(base_family, 1, layers=layers)), ("tuned", lm("gpt2", 2)),
                        ("ref", lm("gpt2", 3)), ("rm", token_rm("gpt2", 4))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def with_graph_buffers(monkeypatch) -> None:
    """Every PagedModel built from now on runs its decode steps and full-width extends through
    ``ivg.cuda_graphs`` (off CUDA: the graphs' static, padded buffers, run eagerly)."""
    from ivg.cuda_graphs import DecodeGraphs
    from ivg.paged_model import PagedModel

    real = PagedModel.__init__

    def with_graphs(self, *a, **k):
        real(self, *a, **k)
        self.graphs = DecodeGraphs(self)

    monkeypatch.setattr(PagedModel, "__init__", with_graphs)
