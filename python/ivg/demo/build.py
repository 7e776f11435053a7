"""Build the demo's models from nothing, deterministically on a given machine, and cache them.

Makes, under ``~/.cache/ivg/<version>-<config hash>/`` (or ``$IVG_CACHE``):
* ``tokenizer``: a byte-level BPE trained on a synthetic corpus of mixed-sentiment reviews;
* ``base``: the largest LM, trained on the corpus;
* ``ref``: a smaller LM trained on the same corpus (the untuned guide);
* ``tuned``: ``ref`` tuned with DPO on pairs of its own samples ranked by the gold reward;
* ``rm``: a token reward model (small LM body + ``score_head`` over the vocabulary) trained so that
  ``Q(s_{t-1}, y_t)`` predicts the gold reward of the text so far.
Every model is saved in Hugging Face format with its tokenizer and loads through ``ivg``'s normal path.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..progress import progress_bar
from .corpus import GoldReward, make_corpus, make_prompts

VERSION = "demo-v1"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class BuildConfig:
    corpus_size: int = 6000
    vocab_size: int = 800
    base: tuple = (4, 128, 4)  # layers, hidden, heads
    guide: tuple = (2, 64, 2)
    seq_len: int = 48
    batch: int = 32
    base_steps: int = 500
    guide_steps: int = 400
    lr: float = 3e-3
    dpo_prompts: int = 384
    dpo_samples: int = 4
    dpo_steps: int = 150
    dpo_beta: float = 0.2
    dpo_lr: float = 1e-3
    rm_texts: int = 1500
    rm_alternatives: int = 7
    rm_steps: int = 500
    max_new_tokens: int = 24
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return f"{VERSION}-{hashlib.sha256(blob).hexdigest()[:10]}"


REDUCED = BuildConfig(corpus_size=400, vocab_size=280, base=(2, 32, 2), guide=(1, 32, 2), seq_len=32, batch=8,
                      base_steps=30, guide_steps=20, dpo_prompts=16, dpo_samples=2, dpo_steps=5, rm_texts=50, rm_alternatives=2,
                      rm_steps=20, max_new_tokens=8)


class _Steps:
    """The build's bar: ``step(what, k)`` advances it by ``k`` and names the current stage."""

    def __init__(self, bar):
        self.bar = bar

    def step(self, what: str, k: int = 1):
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(k)

    def close(self):
        self.bar.close()


def cache_root() -> Path:
    return Path(os.environ.get("IVG_CACHE", Path.home() / ".cache" / "ivg"))


def _tokenizer(corpus, cfg):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=cfg.vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def _lm(dims, vocab, seed, n_positions=128):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    layers, hidden, heads = dims
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=n_positions,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")


def _train_lm(model, stream, cfg, steps, seed, bar, what):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        x = torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.step(what)
    return model.eval()


def _response_logp(model, ids, mask):
    """Sum of log-probs of the tokens where ``mask`` is 1 (mask[:, t] marks token t)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (logp * mask[:, 1:]).sum(1)


def _pad(seqs, pad):
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (n - len(s)) for s in seqs])


def _dpo(ref, tokenizer, gold, cfg, bar):
    """Tune a copy of ``ref`` with DPO on pairs of its own samples ranked by the gold reward."""
    from ..decoder import IVGDecoder, RepeatedPromptsWarning
    from ..models import IVGModels
    from ..options import DecodeOptions

    # Independent draws, repeats included (a repeat's pair is its first occurrence's, so it weighs that pair
    # more): the recipe the cached models were built by, kept as it is
    prompts = make_prompts(cfg.dpo_prompts, cfg.seed + 101)
    dec = IVGDecoder(IVGModels(ref, tokenizer=tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepeatedPromptsWarning)
        res = dec.generate(prompts, DecodeOptions(mode="bon", n=cfg.dpo_samples, num_return=cfg.dpo_samples,
                                                  scorer=gold.scorer, temperature=1.0, seed=cfg.seed,
                                                  max_new_tokens=cfg.max_new_tokens))
    bar.step("dpo: sampling pairs", 1)
    pairs = []
    for p, r in zip(prompts, res):
        best, worst = r.beams[0], r.beams[-1]
        if best.score > worst.score:
            pairs.append((tokenizer(p)["input_ids"], best.tokens, worst.tokens))
    policy = copy.deepcopy(ref).train()
    frozen = ref.eval()
    if not pairs:  # every sample tied (only in tiny test builds): nothing to prefer
        bar.step("dpo: tuning", cfg.dpo_steps)
        return policy.eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.dpo_lr)
    rng = random.Random(cfg.seed)
    pad = tokenizer.eos_token_id
    for _ in range(cfg.dpo_steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(min(cfg.batch, len(pairs)))]
        seqs, masks = [], []
        for prompt, good, bad in batch:
            for resp in (good, bad):
                seqs.append(prompt + resp)
                masks.append([0] * len(prompt) + [1] * len(resp))
        ids, mask = _pad(seqs, pad), _pad(masks, 0).float()
        with torch.no_grad():
            ref_lp = _response_logp(frozen, ids, mask)
        lp = _response_logp(policy, ids, mask)
        margin = (lp - ref_lp).view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(cfg.dpo_beta * (margin[:, 0] - margin[:, 1])).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        bar.step("dpo: tuning")
    return policy.eval()


def _token_rm(corpus, tokenizer, gold, cfg, bar):
    """Train ``Q(s_{t-1}, v)`` to predict the gold reward of the text so far followed by ``v``.

    Labels cover the token that the text has and ``rm_alternatives`` random other tokens per position,
    so that ``Q`` ranks candidate next tokens (token-wise guidance), not only the observed ones.
    """
    from ..models import TokenRewardModel

    rng = random.Random(cfg.seed + 9)
    vocab = len(tokenizer)
    rows, cand_rows, target_rows = [], [], []
    for text in corpus[: cfg.rm_texts]:
        ids = tokenizer(text)["input_ids"][: cfg.seq_len]
        cands, targets = [], []
        for t in range(1, len(ids)):
            options = [ids[t]] + [rng.randrange(vocab) for _ in range(cfg.rm_alternatives)]
            cands.append(options)
            targets.append([gold(tokenizer.decode(ids[:t] + [v])) for v in options])
        rows.append(ids)
        cand_rows.append(cands)
        target_rows.append(targets)
    bar.step("reward model: labels", 1)
    width = max(len(r) for r in rows)
    k = cfg.rm_alternatives + 1
    ids_all = _pad(rows, tokenizer.eos_token_id)
    cand_all = torch.zeros(len(rows), width - 1, k, dtype=torch.long)
    tgt_all = torch.zeros(len(rows), width - 1, k)
    mask_all = torch.zeros(len(rows), width - 1)
    for i, (cands, targets) in enumerate(zip(cand_rows, target_rows)):
        if cands:
            cand_all[i, : len(cands)] = torch.tensor(cands)
            tgt_all[i, : len(cands)] = torch.tensor(targets)
            mask_all[i, : len(cands)] = 1.0
    torch.manual_seed(cfg.seed + 7)
    body = _lm(cfg.guide, vocab, cfg.seed + 7).transformer
    rm = TokenRewardModel(body, torch.nn.Linear(cfg.guide[1], vocab)).train()
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.rm_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 8)
    for _ in range(cfg.rm_steps):
        pick = torch.randint(0, len(rows), (cfg.batch,), generator=gen)
        q = rm(input_ids=ids_all[pick, :-1]).logits  # (B, T-1, V): Q(s_{t-1}, .)
        chosen = q.gather(2, cand_all[pick])  # (B, T-1, K)
        mask = mask_all[pick].unsqueeze(-1)
        loss = (((chosen - tgt_all[pick]) ** 2) * mask).sum() / (mask.sum() * k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.step("reward model: training")
    return rm.eval()


def build(cfg: BuildConfig = BuildConfig(), *, root: Path | None = None, force: bool = False,
          progress: bool = True) -> Path:
    """Build (or find cached) demo models; returns their folder."""
    out = (root or cache_root()) / cfg.key()
    if (out / "DONE").exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(out.parent / f"{cfg.key()}.lock", "w") as lock:  # one builder per cache entry at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "DONE").exists() and not force:
            return out
        return _build(cfg, out, progress)


def _build(cfg: BuildConfig, out: Path, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    total = cfg.base_steps + cfg.guide_steps + cfg.dpo_steps + cfg.rm_steps + 4
    bar = _Steps(progress_bar(total, desc="ivg demo: building models", unit="step", enabled=progress))
    gold = GoldReward()
    corpus = make_corpus(cfg.corpus_size, cfg.seed)
    tokenizer = _tokenizer(corpus, cfg)
    bar.step("tokenizer", 1)
    eos = tokenizer.eos_token_id
    stream = torch.tensor([t for text in corpus for t in tokenizer(text)["input_ids"] + [eos]])
    vocab = len(tokenizer)
    base = _train_lm(_lm(cfg.base, vocab, cfg.seed + 1), stream, cfg, cfg.base_steps, cfg.seed + 1, bar, "base LM")
    ref = _train_lm(_lm(cfg.guide, vocab, cfg.seed + 2), stream, cfg, cfg.guide_steps, cfg.seed + 2, bar,
                    "reference guide")
    tuned = _dpo(ref, tokenizer, gold, cfg, bar)
    rm = _token_rm(corpus, tokenizer, gold, cfg, bar)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, model in (("base", base), ("ref", ref), ("tuned", tuned), ("rm", rm)):
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    (tmp / "DONE").write_text(VERSION)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    bar.close()
    return out
