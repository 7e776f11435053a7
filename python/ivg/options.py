"""Decoding options: the modes of IVG.md as presets over one general setting.

A setting is: which token-wise guidance is added to the base logits (``eft``: the guide pairs'
log-ratios; ``tokenrm``: the token reward model's values), which chunk scorer ranks candidates
(``explicit``, ``implicit``, or a Python callable on texts), and the beam shape W, K, L.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

from ivg_kernels._args import check_scalar_param

from .search import OFFSET_STRIDE

MODES = ("plain", "eft", "tokenrm", "cbs", "ivg", "bon", "won")
TextScorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class DecodeOptions:
    """Everything a decoder needs besides the models and the prompts.

    Attributes
    ----------
    mode : one of ``plain, eft, tokenrm, cbs, ivg, bon, won`` (a preset; see :meth:`resolved`)
    tokenwise : guidance added token by token, a subset of ``("eft", "tokenrm")`` (one kind may be given as a string);
        None: from the mode
    scorer : ``"explicit"``, ``"implicit"``, a callable ``(prompts, responses) -> scores`` (numbers; a NaN is an
        error: it has no rank), or None
    width, successors, chunk_len : W, K, L of chunk-level beam search (``chunk_len=None``: infinity)
    n : N of best-of-N / worst-of-N
    keep : ``"max"`` keeps the highest scores, ``"min"`` the lowest (worst-of-N)
    temperature, top_k, top_p, min_p : the sampler's warpers (temperature 0: greedy)
    seed : the run's seed; each prompt's random stream is keyed by (seed, prompt tokens)
    max_new_tokens : response length limit
    stop : stop strings (one string is one stop string); eos_token_ids : token ids that end a response (one
        int or several; None: from the tokenizer/config; () for none)
    num_return : beams returned per prompt (at most W for chunk search)
    speculate : tokens the draft model drafts per round of speculative decoding (0: off); the
        tokens keep exactly the sampler's distribution (``ivg.speculative_loop``)
    speculate_adapt : the drafts per round adapt between 1 and ``speculate`` to how many were kept: one
        more after a round that kept every draft, one fewer after a round that kept fewer than half. The
        tokens are those of any fixed ``speculate`` >= 1 (every position is decided by the same rule), so
        only the speed changes; ``RunStats.gammas`` lists the drafts per round
    draft : the draft model of speculative decoding: ``"tune"``, the first tuned guide, ``"ref"``, its
        reference, or ``"auto"``: the tuned guide where the sampler adds the guide pair (EFT token-wise
        guidance, which leans the distribution towards it), else the reference, which stays closest to
        the base (``benchmarks/draft_acceptance.py``: per-token acceptance 0.88-0.89 against 0.72 with EFT,
        0.94-0.95 against 0.51-0.70 without, on the demo's models). Any draft keeps the distribution; a
        better one is accepted more often
    """

    mode: str = "plain"
    tokenwise: Optional[tuple] = None
    scorer: Union[str, TextScorer, None] = None
    width: int = 4
    successors: int = 4
    chunk_len: Optional[int] = 5
    n: int = 16
    keep: str = "max"
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    max_new_tokens: int = 64
    stop: tuple = field(default_factory=tuple)
    eos_token_ids: Optional[tuple] = None
    num_return: int = 1
    speculate: int = 0
    draft: str = "auto"
    speculate_adapt: bool = False

    def resolved(self, *, have_guides: bool, have_token_rm: bool) -> "DecodeOptions":
        """The general setting of this mode, checked: W, K, L, token-wise guidance, scorer, keep."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("width", "successors", "n", "max_new_tokens", "num_return"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an int >= 1")
        if self.chunk_len is not None and (
            isinstance(self.chunk_len, bool) or not isinstance(self.chunk_len, numbers.Integral) or self.chunk_len < 1
        ):
            raise ValueError(f"chunk_len={self.chunk_len!r}: expected an int >= 1 or None (infinity)")
        if isinstance(self.speculate, bool) or not isinstance(self.speculate, numbers.Integral) or self.speculate < 0:
            raise ValueError(f"speculate={self.speculate!r}: expected an int >= 0 (0 turns speculation off)")
        if not isinstance(self.speculate_adapt, bool):
            raise ValueError(f"speculate_adapt={self.speculate_adapt!r}: expected True or False")
        if self.speculate_adapt and not self.speculate:
            raise ValueError("speculate_adapt=True: expected speculate >= 1 (the most drafts per round)")
        if self.draft not in ("auto", "tune", "ref"):
            raise ValueError(f"draft={self.draft!r}: expected 'auto', 'tune' (the first tuned guide) or 'ref' (its "
                             "reference)")
        if self.speculate and not have_guides:
            raise ValueError(f"speculate={self.speculate}: needs a (tuned, ref) guide pair (one of them drafts)")
        if self.keep not in ("max", "min"):
            raise ValueError(f"keep={self.keep!r}: expected 'max' or 'min'")
        if isinstance(self.scorer, str) and self.scorer not in ("explicit", "implicit"):
            raise ValueError(f"scorer={self.scorer!r}: expected 'explicit', 'implicit' or a callable")

        mode, w, k, chunk, keep, scorer = self.mode, self.width, self.successors, self.chunk_len, self.keep, self.scorer
        default_tokenwise = {"plain": (), "eft": ("eft",), "tokenrm": ("tokenrm",), "cbs": (), "ivg": ("eft",),
                             "bon": (), "won": ()}[mode]
        if self.tokenwise is None:
            tokenwise = default_tokenwise
        elif isinstance(self.tokenwise, str):  # one kind, as one stop string is one (not its characters)
            tokenwise = (self.tokenwise,)
        else:
            try:
                tokenwise = tuple(self.tokenwise)
            except TypeError:  # (not iterable)
                tokenwise = (self.tokenwise,)
        for tw in tokenwise:
            if not isinstance(tw, str) or tw not in ("eft", "tokenrm"):
                raise ValueError(f"tokenwise={self.tokenwise!r}: expected a subset of ('eft', 'tokenrm')")
        if mode in ("plain", "eft", "tokenrm"):
            w = k = 1
            chunk = None
        elif mode == "ivg" and scorer is None:
            scorer = "explicit"
        elif mode in ("bon", "won"):
            w, k, chunk = 1, self.n, None
            keep = "max" if mode == "bon" else "min"
        if scorer is None and mode in ("cbs", "bon", "won"):
            scorer = "explicit" if have_token_rm else "implicit" if have_guides else None
            if scorer is None:
                raise ValueError(f"mode={mode!r}: needs a scorer: a token reward model, a guide pair, or a callable")
        if "eft" in tokenwise or scorer == "implicit":
            if not have_guides:
                raise ValueError(f"mode={mode!r}: needs at least one (tuned, ref) guide pair")
        if "tokenrm" in tokenwise or scorer == "explicit":
            if not have_token_rm:
                raise ValueError(f"mode={mode!r}: needs a token reward model")
        most = k if mode in ("bon", "won") else w  # best-of-N ranks all N; chunk search keeps W
        if self.num_return > most:
            raise ValueError(f"num_return={self.num_return}: expected at most {most} for mode {mode!r}")
        # the sampler's own checks, now rather than at the first draw (after the models have loaded); values as
        # Python ints and floats (a NumPy integer W went on into the KV pool's sizes, which refused it)
        warpers = {name: check_scalar_param(name, getattr(self, name), integer)
                   for name, integer in (("temperature", False), ("top_k", True), ("top_p", False),
                                         ("min_p", False), ("seed", True))}
        if not -(1 << 63) <= self.seed < 1 << 63:
            raise ValueError(f"seed={self.seed}: expected an int64 (-2**63 <= seed < 2**63)")
        if w * k > OFFSET_STRIDE:  # candidate j's key is (seed, t * OFFSET_STRIDE + j): past it, keys repeat
            shape = f"n={k}" if mode in ("bon", "won") else f"width * successors = {w * k}"
            raise ValueError(f"{shape}: expected at most {OFFSET_STRIDE} candidates per prompt (each draws with its "
                             "own random key)")
        return replace(self, tokenwise=tokenwise, scorer=scorer, width=int(w), successors=int(k),
                       chunk_len=None if chunk is None else int(chunk), keep=keep, n=int(self.n),
                       max_new_tokens=int(self.max_new_tokens), num_return=int(self.num_return),
                       speculate=int(self.speculate), stop=_stop_strings(self.stop),
                       eos_token_ids=_eos_ids(self.eos_token_ids), **warpers)

    @property
    def uses_guides(self) -> bool:
        return "eft" in self.tokenwise or self.scorer == "implicit"

    @property
    def draft_model(self) -> str:
        """The decoder's name of the draft model, ``tune0`` or ``ref0`` (of resolved options)."""
        if self.draft == "auto":
            return "tune0" if "eft" in self.tokenwise else "ref0"
        return f"{self.draft}0"

    @property
    def uses_token_rm(self) -> bool:
        return "tokenrm" in self.tokenwise or self.scorer == "explicit"


def resolve(options, *, have_guides: bool, have_token_rm: bool) -> DecodeOptions:
    """``options.resolved(...)`` of a decoder's ``options`` argument, which must be a :class:`DecodeOptions` (a dict or
    None named here, not by an AttributeError)."""
    if not isinstance(options, DecodeOptions):
        raise ValueError(f"options={options!r}: expected an ivg.DecodeOptions")
    return options.resolved(have_guides=have_guides, have_token_rm=have_token_rm)


def _stop_strings(stop) -> tuple:
    """``stop`` as a tuple of strings: None is none, one string is one stop string (not its characters)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(x, str) for x in stop):
        raise ValueError(f"stop={stop!r}: expected a string or a sequence of strings")
    return tuple(stop)


def _eos_ids(eos) -> Optional[tuple]:
    """``eos_token_ids`` as a tuple of ints (one int is one id); None stays None (the tokenizer's)."""
    if eos is None:
        return None
    if hasattr(eos, "tolist") and not isinstance(eos, numbers.Integral):  # a NumPy or torch array of ids
        eos = eos.tolist()
    if isinstance(eos, numbers.Integral) and not isinstance(eos, bool):
        eos = (eos,)
    if (isinstance(eos, str) or not isinstance(eos, Sequence)
            or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < 1 << 63 for e in eos)):
        raise ValueError(f"eos_token_ids={eos!r}: expected token ids (ints >= 0 below 2**63), one or a sequence, "
                         "or None for the tokenizer's")
    return tuple(int(e) for e in eos)
