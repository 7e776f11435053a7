"""Chunk-level beam search ranked by your own Python scorer over texts: every L tokens each prompt's
W*K candidates are scored and the best W continue, K children each (the explicit-value slot of IVG,
filled by any function of the texts).

    python examples/custom_scorer.py       # CPU, a tiny random model and a character tokenizer

The scorer takes the prompts and the responses decoded so far (lists of strings, one per candidate)
and returns one number per candidate; the paged decoder calls it once per chunk boundary with the
candidates of every prompt ranked there. From the command line the same function is
`ivg generate ... --mode cbs --scorer MODULE:FUNCTION` (MODULE importable, e.g. on PYTHONPATH).
"""
import json
import os
import string
import subprocess
import sys
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import ivg

CHARS = string.ascii_lowercase + " .,!?"


def vowel_share(prompts, responses):
    """The scorer: the share of vowels in each response (a stand-in for a reward model or a classifier)."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def char_tokenizer():
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def main():
    torch.manual_seed(0)
    tok = char_tokenizer()
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tok), n_positions=128, bos_token_id=1,
                     eos_token_id=1)
    base = GPT2LMHeadModel(cfg).eval()
    prompts = ["the film was", "i think"]
    common = dict(base=base, tokenizer=tok, max_new_tokens=24, temperature=1.0, seed=3, eos_token_ids=())
    sampled = ivg.generate(prompts, mode="plain", **common)
    searched = ivg.generate(prompts, mode="cbs", scorer=vowel_share, width=2, successors=4, chunk_len=4,
                            num_return=2, **common)
    for p, s, c in zip(prompts, sampled, searched):
        print(f"{p!r}")
        print(f"  sampled:              {s.beams[0].text!r} vowel share {vowel_share([p], [s.beams[0].text])[0]:.2f}")
        for b in c.beams:
            print(f"  searched (score {b.score:.2f}): {b.text!r}")

    # The same search from the command line: the scorer as MODULE:FUNCTION, importable from PYTHONPATH.
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                           os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "ivg", "generate", "--base", tmp, "--mode", "cbs", "--scorer",
               "custom_scorer:vowel_share", "-W", "2", "-K", "4", "-L", "4", "--max-new-tokens", "24",
               "--temperature", "1.0", "--seed", "3", "--ignore-eos", "--prompt", prompts[0]]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = json.loads(res.stdout.splitlines()[0])
    same = line["tokens"] == searched[0].beams[0].tokens
    print(f"ivg generate --scorer custom_scorer:vowel_share: {line['text']!r} ({'same' if same else 'DIFFERENT'} "
          "as the Python call)")


if __name__ == "__main__":
    main()
