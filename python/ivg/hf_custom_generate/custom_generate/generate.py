"""IVG as a custom generation method of transformers' ``generate()`` (loaded from this folder by
``model.generate(..., custom_generate=ivg.CUSTOM_GENERATE, trust_remote_code=True)``).

The model ``generate`` is called on is the base. Extra keyword arguments: ``guides`` (a list of
``(tuned, ref, beta)``), ``token_rm`` and ``token_rm_weight``, ``mode`` (default ``"ivg"`` with a token
RM and guides, ``"eft"`` with guides only, ``"tokenrm"`` with a token RM only), ``width``,
``successors``, ``chunk_len``, ``n``, ``scorer``, ``seed`` (by default, when sampling, drawn from torch's
global generator, so that as with transformers' own sampling each call draws anew and ``torch.manual_seed``
repeats a call; the output depends only on the prompts, the options and the seed); and from the usual ones
``max_new_tokens`` (or ``max_length``, prompt width included, when no ``max_new_tokens`` is set), ``temperature``
(``do_sample=False`` means greedy), ``top_k``, ``top_p``, ``min_p``, ``eos_token_id``, ``pad_token_id`` and
``num_return_sequences`` (the best k beams of each prompt, at most ``width`` for a chunk search and ``n``
for best-of-N; 1 for the token-wise modes). Returns a LongTensor ``[B * k, prompt + new]``: each row's
(left-padded) prompt followed by one of its best beams' tokens, best first, prompt after prompt as
transformers orders them, right-padded with ``pad_token_id``. Limits: no transformers beam search
(``num_beams`` > 1 is refused: the search here is ``width``/``successors``/``chunk_len``), no streamer, no
logits processors or stopping criteria of transformers (``stop_strings`` with ``tokenizer=`` are the IVG
decoder's stop strings), no assistant model; those a generation config sets (``repetition_penalty`` in a model's
``generation_config.json``, say) are not applied, with a warning naming them.

The decoder (its KV pools, and on a GPU its CUDA graphs) is kept on the base model from one call to the next
while the guides, the token RM and the tokenizer stay the same (``ivg.hf_custom_generate.HeldDecoder``), as
transformers keeps a static cache there; ``del model._ivg_decoder`` frees it.
"""
import warnings

import torch

# Logits processors and criteria of transformers that a generation config may set (a model's
# generation_config.json often does) and this method does not apply, with each one's neutral value.
_NOT_APPLIED = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                "min_length": 0, "min_new_tokens": 0, "bad_words_ids": None, "suppress_tokens": None,
                "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                "exponential_decay_length_penalty": None, "sequence_bias": None, "guidance_scale": 1.0,
                "watermarking_config": None}

_UNSUPPORTED = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
                "negative_prompt_ids", "negative_prompt_attention_mask")


def generate(model, inputs=None, generation_config=None, **kwargs):
    from ivg.models import GuidePair, IVGModels, _finite, guide_triples
    from ivg.options import DecodeOptions

    for name in _UNSUPPORTED:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"{name}: not supported by the IVG custom generation method")
    kwargs.pop("synced_gpus", None)
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids: expected a LongTensor [batch, prompt length]")
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(input_ids) if mask is None else mask
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected a tensor of input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    cfg = generation_config if generation_config is not None else model.generation_config

    def option(name, default=None):
        value = kwargs.pop(name, None)
        return value if value is not None else getattr(cfg, name, None) if getattr(cfg, name, None) is not None \
            else default

    guides = [GuidePair(t, r, b) for t, r, b in guide_triples(kwargs.pop("guides", ()))]
    token_rm = kwargs.pop("token_rm", None)
    rm_weight = _finite("token_rm_weight", kwargs.pop("token_rm_weight", 1.0))
    mode = kwargs.pop("mode", None) or ("ivg" if guides and token_rm is not None else "eft" if guides else
                                        "tokenrm" if token_rm is not None else "plain")
    eos = kwargs.pop("eos_token_id") if "eos_token_id" in kwargs else cfg.eos_token_id  # an explicit None: no EOS
    eos = _ids("eos_token_id", eos)
    pad = _int("pad_token_id", option("pad_token_id", eos[0] if eos else 0))
    if not 0 <= pad < 1 << 63:
        raise ValueError(f"pad_token_id={pad}: expected a token id (an int >= 0 below 2**63)")
    do_sample = option("do_sample", True)
    temperature = _finite("temperature", option("temperature", 1.0))
    search = {k: kwargs.pop(k) for k in ("width", "successors", "chunk_len", "n", "scorer", "seed", "keep")
              if k in kwargs}
    # None: the default, as for transformers' own arguments (but chunk_len=None is infinity, as in DecodeOptions)
    search = {k: v for k, v in search.items() if v is not None or k == "chunk_len"}
    beams = kwargs.pop("num_beams", None)
    if beams is not None and beams != 1:
        raise ValueError(f"num_beams={beams!r}: transformers' beam search does not apply to the IVG method, whose "
                         "search is width, successors and chunk_len; leave num_beams at 1")
    k = kwargs.pop("num_return_sequences", None)
    k = 1 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_return_sequences={k!r}: expected an int >= 1")
    new_tokens = option("max_new_tokens")
    new_tokens = None if new_tokens is None else _int("max_new_tokens", new_tokens)
    longest = kwargs.pop("max_length", None)
    if new_tokens is None and longest is not None:  # (an explicit max_new_tokens wins, as in transformers)
        new_tokens = _int("max_length", longest) - input_ids.shape[1]
        if new_tokens < 1:
            raise ValueError(f"max_length={longest!r}: expected more than the prompts' {input_ids.shape[1]} "
                             "positions (it counts the prompt and the new tokens)")
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer={type(tokenizer).__name__}: expected a loaded tokenizer (with decode)")
    stop = option("stop_strings")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
        raise ValueError(f"stop_strings={stop!r}: expected a string or a list of strings")
    if stop and tokenizer is None:
        raise ValueError("stop_strings: needs tokenizer= (the tokenizer that decodes the responses), as transformers' "
                         "generate does")
    if do_sample and "seed" not in search:  # a fresh key per call, as transformers' sampling draws anew
        search["seed"] = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    opts = DecodeOptions(mode=mode, temperature=temperature if do_sample else 0.0,
                         top_k=_int("top_k", option("top_k", 0)),
                         top_p=_finite("top_p", option("top_p", 1.0)), min_p=_finite("min_p", option("min_p", 0.0)),
                         max_new_tokens=20 if new_tokens is None else new_tokens,
                         eos_token_ids=eos, stop=stop, num_return=k, **search)
    for name in ("use_cache", "return_dict_in_generate", "output_scores", "output_logits", "trust_remote_code"):
        kwargs.pop(name, None)  # handled by the method itself or meaningless here
    if kwargs:
        raise ValueError(f"{', '.join(sorted(kwargs))}: not understood by the IVG custom generation method")
    ignored = [f"{k}={getattr(cfg, k)!r}" for k, neutral in _NOT_APPLIED.items()
               if getattr(cfg, k, None) not in (None, neutral, [], ())]
    if ignored:  # (given as arguments they are refused above, as not understood)
        warnings.warn(f"generation config: {', '.join(ignored)} not applied by the IVG custom generation method "
                      "(its warpers: temperature, top_k, top_p, min_p)", stacklevel=2)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    models = IVGModels(model, guides, token_rm, rm_weight, tokenizer)
    try:
        opts.resolved(have_guides=bool(guides), have_token_rm=token_rm is not None)  # the decoder's own check
    except ValueError as e:
        if str(e).startswith("num_return="):  # in the name this method's caller gave it
            raise ValueError(f"num_return_sequences={k}: {str(e).split(': ', 1)[1]}") from None
        raise
    results = _decoder(model, models).generate(prompts, opts)
    new = [b.tokens for r in results for b in r.beams]  # each prompt's k best, prompt after prompt
    assert len(new) == k * len(results), "a prompt returned fewer beams than num_return_sequences"
    width = max(len(t) for t in new)
    tail = torch.full((len(new), width), int(pad), dtype=input_ids.dtype, device=input_ids.device)
    for i, t in enumerate(new):
        tail[i, :len(t)] = torch.tensor(t, dtype=input_ids.dtype)
    return torch.cat([input_ids.repeat_interleave(k, dim=0), tail], dim=1)


def _int(name: str, value) -> int:
    """An int argument (a one-element tensor as its value), or the sampler's ValueError naming it."""
    from ivg_kernels._args import _scalar

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return _scalar(name, value, integer=True)


def _ids(name: str, ids) -> tuple:
    """Token ids given as None (none), one int, or a sequence or tensor of ints, as a tuple of ints (the decoder's own
    conversion, ``ivg.options``), or a ValueError naming ``name``."""
    from ivg.options import _eos_ids

    try:
        out = _eos_ids(ids)
    except ValueError:
        raise ValueError(f"{name}={ids!r}: expected a token id (an int >= 0 below 2**63) or a list of them") from None
    return () if out is None else out


def _decoder(model, models):
    """The decoder of ``models``, kept on the base model from one call to the next while the call's guides, token
    RM, tokenizer and the base's device and dtype stay the same (``ivg.hf_custom_generate.HeldDecoder``)."""
    from ivg.decoder import IVGDecoder
    from ivg.hf_custom_generate import HeldDecoder

    param = next(model.parameters())
    key = (tuple((id(g.tuned), id(g.ref), g.beta) for g in models.guides), id(models.token_rm),
           models.token_rm_weight, id(models.tokenizer), param.device, param.dtype)  # (the decoder holds each one)
    held = model.__dict__.get("_ivg_decoder")
    if isinstance(held, HeldDecoder) and held.key == key:
        return held.decoder
    model.__dict__["_ivg_decoder"] = HeldDecoder()  # the previous decoder's pools go before new ones are made
    decoder = IVGDecoder(models)
    model.__dict__["_ivg_decoder"] = HeldDecoder(key, decoder)
    return decoder
