"""Chunk-level beam search bookkeeping shared by the paged decoder and the naive baseline.

Both decoders follow these rules, so their results can be compared token for token:
* candidate ``j`` of a prompt draws token ``t`` with the key ``(prompt_seed, t * 2**16 + j)``;
* at a chunk boundary the candidates are ranked by score (ties: lower ``j`` first), the top W kept,
  each kept unfinished beam replaced by K children and each kept finished beam carried over, and the
  new candidates numbered in that order.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

OFFSET_STRIDE = 1 << 16  # candidates per prompt and chunk stay below this


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A 63-bit stream key from the run's seed and the prompt's tokens (not its place in the batch)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in prompt_ids))
    return int.from_bytes(h.digest(), "little") >> 1


def row_offset(t: int, j: int) -> int:
    return t * OFFSET_STRIDE + j


def sampler_guides(logits: dict, guides, eft: bool, w_rm: float) -> list:
    """The ``(rows, weight)`` pairs ``guided_sample`` takes besides ``logits["base"]``: each guide pair's
    tuned and reference rows (``+-beta`` with EFT guidance, else 0: they only score) and the token RM's."""
    pairs = [pair for i, beta in guides for pair in ((logits[f"tune{i}"], beta if eft else 0.0),
                                                     (logits[f"ref{i}"], -beta if eft else 0.0))]
    return pairs + ([(logits["rm"], w_rm)] if "rm" in logits else [])


@dataclass(slots=True)
class Beam:
    """One candidate response of one prompt."""

    cand: int  # j: its index among the prompt's candidates in the current chunk
    tokens: list = field(default_factory=list)
    implicit: float = 0.0  # sum over tokens of sum_i beta_i (log pi_tune_i - log pi_ref_i)
    explicit: float = math.nan  # Q(s_{t-1}, y_t) at the last token
    logprob: float = 0.0  # sum of the sampler's log-probs
    finished: bool = False
    slot: Optional[int] = None  # the decoder's handle: a KV sequence id or a cache row
    rm_read: int = 0  # tokens (prompt, then response) a lazily fed token RM has read into its cache
    twin: int = -1  # the decoder's class of candidates of its prompt with the same response so far (ivg.twins)

    def child(self, cand: int, slot=None) -> "Beam":
        return Beam(cand, list(self.tokens), self.implicit, self.explicit, self.logprob, self.finished, slot,
                    self.rm_read, self.twin)


def rank(beams: Sequence[Beam], scores: Sequence[float], keep: str) -> list[int]:
    """Indices of ``beams`` best first (highest score, or lowest for keep='min'); ties by candidate index."""
    sign = -1.0 if keep == "max" else 1.0
    return sorted(range(len(beams)), key=lambda i: (sign * scores[i], beams[i].cand))


def expand(kept: Sequence[Beam], successors: int) -> list[tuple[Beam, bool]]:
    """The next chunk's candidates, numbered in order: ``(parent, is_child)`` pairs."""
    out = []
    for b in kept:
        if b.finished:
            out.append((b, False))
        else:
            out.extend((b, True) for _ in range(successors))
    return out


def chunk_scores(prompt, beams, opts, stopper) -> list[float]:
    """The scores ``opts.scorer`` gives the candidates ``beams`` of ``prompt``."""
    return chunk_scores_many([(prompt, beams)], opts, stopper)[0]


def chunk_scores_many(groups, opts, stopper) -> list[list[float]]:
    """The scores of each ``(prompt, beams)`` group; an external scorer is called once for all of them
    (every candidate of every prompt ranked at a chunk boundary: one batch for a reward model, not one
    call per prompt)."""
    if opts.scorer == "explicit":
        return [[b.explicit for b in beams] for _, beams in groups]
    if opts.scorer == "implicit":
        return [[b.implicit for b in beams] for _, beams in groups]
    if callable(opts.scorer):
        prompts, texts = [], []
        for prompt, beams in groups:
            prompts += [prompt if isinstance(prompt, str) else ""] * len(beams)
            texts += [stopper.text(b.tokens) for b in beams]
        if not texts:
            return [[] for _ in groups]
        returned = opts.scorer(prompts, texts)
        try:
            scores = list(returned)
        except TypeError:
            raise ValueError(f"scorer: returned {type(returned).__name__}; expected a sequence of {len(texts)} "
                             "numbers, one per response") from None
        if len(scores) != len(texts):
            raise ValueError(f"scorer: returned {len(scores)} scores for {len(texts)} candidates")
        out, start = [], 0
        for prompt, beams in groups:
            out.append([_score(x, texts[start + j], j, prompt) for j, x in enumerate(scores[start:start + len(beams)])])
            start += len(beams)
        return out
    return [[b.logprob for b in beams] for _, beams in groups]


def _score(x, text: str, j: int, prompt) -> float:
    """An external scorer's score of candidate ``j`` (response ``text``) as a float to rank by, or the
    ValueError that names it: not a number, or NaN (which has no rank: the order would be arbitrary)."""
    try:
        score = float(x)
    except (TypeError, ValueError):
        score = None
    if score is None or math.isnan(score):
        raise ValueError(f"scorer: returned {'NaN' if score is not None else repr(x)} for the response {text!r} "
                         f"(candidate {j}) of the prompt {prompt!r}; expected a number to rank it by")
    return score


def _skipped_token(tokenizer, text: str) -> Optional[int]:
    """The id of the token spelt ``text`` if it is one that decoding without special tokens skips, else None."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    tid = convert(text) if convert is not None else None
    if not isinstance(tid, int) or tokenizer.convert_ids_to_tokens(tid) != text:
        return None
    return tid if tokenizer.decode([tid], skip_special_tokens=True) == "" else None


class StopChecker:
    """EOS ids and stop strings; a stop string may span tokens. Decodes only a short tail per step.

    A response finishes at the first token after which its text (``text``'s decode, special tokens
    skipped) holds a stop string. Checked every token, so a new occurrence ends in the last token's
    bytes: it lies in the last ``b`` tokens that have text, ``b`` its UTF-8 bytes (a token holds at least
    one byte: with byte-level vocabularies a character can take several tokens), and special tokens
    (no text) widen the tail by one each. Two more tokens of slack absorb a leading space that
    SentencePiece drops from a decoded tail; a tail that starts inside a character (its text starts with
    U+FFFD) takes up to three more tokens, back to the character's first byte (a byte-fallback decoder
    replaces a whole run of byte tokens when one of them is cut off). A stop string that is one special token
    (``"<|im_end|>"``), which the text never shows, ends a response at that token as an EOS id does."""

    def __init__(self, tokenizer, stop: Sequence[str], eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        if self.stop and tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer to decode the responses")
        self.eos = set(int(e) for e in eos_token_ids)
        # a stop string that is one special token ("<|im_end|>") never shows in the text, decoded without special
        # tokens: it ends a response at that token, as an EOS id does
        skipped = {s: _skipped_token(tokenizer, s) for s in self.stop}
        self.eos.update(t for t in skipped.values() if t is not None)
        self.stop = [s for s in self.stop if skipped[s] is None]
        self.tail = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 2  # tokens (class docstring)
        self.special = set(getattr(tokenizer, "all_special_ids", None) or ())

    def finished(self, tokens: Sequence[int]) -> bool:
        if tokens and tokens[-1] in self.eos:
            return True
        if self.stop:
            text = self._tail_text(tokens)
            return any(s in text for s in self.stop)
        return False

    def _tail_text(self, tokens: Sequence[int]) -> str:
        """The text of the response's last tokens (class docstring)."""
        n = self.tail
        while True:  # the last ``tail`` tokens with text, and the special tokens among them
            wanted = self.tail + sum(1 for t in tokens[-n:] if t in self.special)
            if wanted <= n or n >= len(tokens):
                break
            n = wanted
        text = self.tokenizer.decode(tokens[-n:], skip_special_tokens=True)
        back = 0
        while text.startswith("\ufffd") and n < len(tokens) and back < 3:  # back to the character's first byte
            n += 1
            back += tokens[-n] not in self.special
            text = self.tokenizer.decode(tokens[-n:], skip_special_tokens=True)
        return text

    def text(self, tokens: Sequence[int]) -> str:
        """The response text, cut before the first stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text
