"""A synthetic corpus of short movie-review-like texts with mixed sentiment, and the gold judge.

The gold reward is VADER's compound sentiment score (the ``vaderSentiment`` package): a published
lexicon scorer that nobody in this project wrote, so the demo cannot grade its own homework.
"""
from __future__ import annotations

import random

SUBJECTS = ["movie", "film", "plot", "acting", "story", "cast", "ending", "script", "music", "dialogue",
            "characters", "soundtrack", "director", "pacing", "camera work"]
POSITIVE = ["great", "wonderful", "brilliant", "excellent", "beautiful", "amazing", "enjoyable", "charming",
            "fantastic", "good", "superb", "delightful", "moving", "funny", "clever"]
NEGATIVE = ["terrible", "awful", "boring", "bad", "dull", "horrible", "weak", "poor", "disappointing", "stupid",
            "painful", "ugly", "mediocre", "bland", "annoying"]
NEUTRAL = ["long", "short", "slow", "loud", "quiet", "strange", "simple", "typical", "old", "new"]
ADVERBS = ["very", "really", "quite", "truly", "rather", "so", "incredibly", "a bit"]
OPENERS = ["honestly", "to be fair", "in the end", "at first", "overall", "sadly", "luckily", "i think"]
VERBS_POS = ["made me smile", "kept me hooked", "was worth the ticket", "stayed with me", "made me laugh"]
VERBS_NEG = ["put me to sleep", "was a waste of time", "made no sense", "fell apart", "made me cringe"]


def _sentence(rng: random.Random, mood: float) -> str:
    """One sentence; ``mood`` in [0, 1] is the chance that a sentiment word is positive."""
    def word():
        u = rng.random()
        if u < 0.15:
            return rng.choice(NEUTRAL)
        return rng.choice(POSITIVE) if rng.random() < mood else rng.choice(NEGATIVE)

    subject = rng.choice(SUBJECTS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"the {subject} was {word()} ."
    if kind == 1:
        return f"i thought the {subject} was {rng.choice(ADVERBS)} {word()} ."
    if kind == 2:
        verb = rng.choice(VERBS_POS) if rng.random() < mood else rng.choice(VERBS_NEG)
        return f"{rng.choice(OPENERS)} , the {subject} {verb} ."
    if kind == 3:
        return f"overall it was a {word()} {rng.choice(['movie', 'film', 'story'])} ."
    return f"the {subject} was {word()} and the {rng.choice(SUBJECTS)} was {word()} ."


def review(rng: random.Random) -> str:
    mood = rng.betavariate(0.8, 0.8)  # mixed: many reviews are torn
    return " ".join(_sentence(rng, mood) for _ in range(rng.randint(2, 4)))


def make_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


STARTS = ["the {s} was", "i thought the {s} was", "honestly , the {s}", "overall it was a", "the {s} and the {s2}"]


def _opening(rng: random.Random) -> str:
    return rng.choice(STARTS).format(s=rng.choice(SUBJECTS), s2=rng.choice(SUBJECTS))


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` openings drawn independently (repeats included: a fifth of them is "overall it was a"), neutral
    starts that a model must finish; the DPO stage's prompts. Evaluations take :func:`held_out_prompts`."""
    rng = random.Random(seed)
    return [_opening(rng) for _ in range(n)]


OPENINGS = len({s.format(s=a, s2=b) for s in STARTS for a in SUBJECTS for b in SUBJECTS})  # distinct openings: 271


def held_out_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct openings, in the order :func:`make_prompts`' draws first give them (each repeat skipped).

    The decoder's output depends only on prompt, options and seed, so a prompt that comes twice gives the same
    response twice: in a mean over prompts it counts twice as one sample, and its standard error understates the
    spread. The demo's 64 prompts were ``make_prompts(64, 999)`` until 2026-12-07: 34 distinct openings, "overall it
    was a" 16 times."""
    if type(n) is not int or not 1 <= n <= OPENINGS:
        raise ValueError(f"n={n!r}: expected 1 to {OPENINGS} (the distinct openings)")
    rng, seen = random.Random(seed), {}
    while len(seen) < n:
        seen.setdefault(_opening(rng), None)
    return list(seen)


class GoldReward:
    """VADER's compound score in [-1, 1] of a text."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def __call__(self, text: str) -> float:
        return float(self._vader.polarity_scores(text)["compound"])

    def scorer(self, prompts, responses):
        """The text-scorer interface of the decoder: (prompts, responses) -> rewards."""
        return [self(p + " " + r) for p, r in zip(prompts, responses)]
