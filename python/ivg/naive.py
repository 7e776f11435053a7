"""The naive baseline: what the published IVG code does, with the same sampler and seeds.

* one prompt at a time;
* the prompt replicated W*K times and prefilled W*K times, a ``DynamicCache`` per model;
* at every chunk boundary, every model's whole cache reordered with ``index_select``;
* chunk scorers re-run from scratch over prompt + whole response, batched over the candidates (which
  all have the same length), and only the value the ranking uses (explicit: the token reward model's
  Q at the last token; implicit: the guides' summed log-ratio over the response); the values a
  result reports are computed once more for the final candidates;
* finished rows keep decoding (their tokens are ignored);
* a token reward model that only scores (sampler weight 0) runs only in those rescoring forwards.

It is the test oracle of the paged decoder and the baseline of ``benchmarks/bench_decode.py``.
"""
from __future__ import annotations

import time

import torch

import ivg_kernels

from .decoder import GenerationResult, RunStats, check_prompts, default_eos, make_result
from .draw import decoder_backend
from .models import IVGModels, cache_kwargs, require_models
from .options import DecodeOptions, resolve
from .search import Beam, StopChecker, chunk_scores, expand, prompt_seed, rank, row_offset, sampler_guides


class NaiveDecoder:
    def __init__(self, models: IVGModels, *, backend: str = "reference"):
        self.models = require_models(models)
        self.backend = decoder_backend(backend)
        self.last_stats = RunStats()
        models.check()

    def check(self, prompts, options: DecodeOptions = DecodeOptions()) -> None:
        """As :meth:`ivg.decoder.IVGDecoder.check`: the errors of ``generate``'s checks, without decoding."""
        self._plan(prompts, options)

    def _plan(self, prompts, options: DecodeOptions) -> tuple:
        m = self.models
        opts = resolve(options, have_guides=bool(m.guides), have_token_rm=m.token_rm is not None)
        if opts.speculate:
            raise ValueError(f"speculate={opts.speculate}: the naive baseline does not speculate (use the paged decoder)")
        roles = [r for r in m.roles() if r[0] == "base" or (r[0].startswith(("tune", "ref")) and opts.uses_guides)
                 or (r[0] == "rm" and opts.uses_token_rm)]
        return opts, roles, check_prompts(m, prompts, opts, roles)

    @torch.inference_mode()
    def generate(self, prompts, options: DecodeOptions = DecodeOptions(), *, progress: bool = False):
        m = self.models
        opts, roles, ids = self._plan(prompts, options)
        eos = opts.eos_token_ids if opts.eos_token_ids is not None else default_eos(m)
        stopper = StopChecker(m.tokenizer, opts.stop, eos)
        stats = RunStats(prompts=len(ids))
        start = time.perf_counter()
        out = [self._one(prompts[i], ids[i], opts, roles, stopper, stats) for i in range(len(ids))]
        stats.wall_s = time.perf_counter() - start
        self.last_stats = stats
        return out

    def _one(self, prompt, ids, opts, roles, stopper, stats) -> GenerationResult:
        from transformers import DynamicCache

        m = self.models
        model = {r[0]: r[1] for r in roles}
        device = next(m.base.parameters()).device
        guides = [(i, g.beta) for i, g in enumerate(m.guides)] if opts.uses_guides else []
        eft = "eft" in opts.tokenwise
        w_rm = m.token_rm_weight if "tokenrm" in opts.tokenwise else 0.0
        names = [r[0] for r in roles if not (r[0] == "rm" and w_rm == 0.0)]  # run every step
        seed = prompt_seed(opts.seed, ids["base"])
        rows = opts.width * opts.successors
        caches = {n: DynamicCache(config=model[n].config) for n in names}
        logits = {}
        for n in names:  # the prompt, W*K times
            x = torch.tensor([ids[n]] * rows, device=device)
            logits[n] = self._forward(model[n], x, caches[n], 0)
        stats.forwards += len(names)
        vocab = min(model[n].get_output_embeddings().weight.shape[0] for n in model)
        cands = [Beam(j, slot=j) for j in range(rows)]
        chunk_start = 0
        for t in range(opts.max_new_tokens):
            sample = ivg_kernels.guided_sample(
                logits["base"],
                sampler_guides(logits, guides, eft, w_rm),
                temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p,
                seed=seed, offset=torch.tensor([row_offset(t, b.cand) for b in cands], device=device),
                vocab_size=vocab, backend=self.backend,
            )
            tokens = sample.tokens.tolist()
            for r, b in enumerate(cands):
                if b.finished:
                    continue  # finished rows keep decoding; their draws are ignored
                b.tokens.append(tokens[r])
                b.logprob += float(sample.logprob[r])
                b.finished = stopper.finished(b.tokens) or t + 1 == opts.max_new_tokens
                stats.new_tokens += 1
            alive = [b for b in cands if not b.finished]
            at_chunk = opts.chunk_len is not None and (t + 1 - chunk_start) % opts.chunk_len == 0
            if not alive or (rows > 1 and at_chunk):
                self._rescore(ids, cands, opts, model, device, vocab, final=not alive)
                scores = chunk_scores(prompt, cands, opts, stopper)
                order = rank(cands, scores, opts.keep)
                if not alive:
                    return make_result(prompt, [cands[i] for i in order], [scores[i] for i in order], opts,
                                       stopper, m)
                plan = expand([cands[i] for i in order[: opts.width]], opts.successors)
                beam_idx = torch.tensor([par.slot for par, _ in plan], device=device)
                for n in names:
                    caches[n].reorder_cache(beam_idx)  # copies every layer of every cache
                cands = [par.child(j, slot=j) for j, (par, _) in enumerate(plan)]
                for n in names:
                    logits[n] = logits[n].index_select(0, beam_idx)
                chunk_start = t + 1
            step_tokens = torch.tensor([[b.tokens[-1]] for b in cands], device=device)
            for n in names:
                logits[n] = self._forward(model[n], step_tokens, caches[n], len(ids[n]) + t)
            stats.forwards += len(names)
        raise AssertionError("unreachable: the last step finishes every beam")

    @staticmethod
    def _forward(model, input_ids, cache, past):
        pos = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return model(input_ids=input_ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]

    def _rescore(self, ids, beams, opts, model, device, vocab, final):
        """Recompute values from scratch over prompt + whole response, one batched forward per model (what
        the published code does): the ranked value at every chunk, both values for the final candidates.
        Rows are right-padded (finished candidates are shorter): causal models ignore what follows."""
        explicit = "rm" in model and (final or opts.scorer == "explicit")
        implicit = opts.uses_guides and (final or opts.scorer == "implicit")
        lens = torch.tensor([len(b.tokens) for b in beams], device=device)  # [R], each >= 1
        width = int(lens.max())
        tokens = torch.tensor([b.tokens + [0] * (width - len(b.tokens)) for b in beams], device=device)  # [R, T]
        rows = torch.arange(len(beams), device=device)

        def padded(pre):  # [R, len(pre) + T]: the prefix, then the right-padded response
            return torch.cat([torch.tensor(pre, device=device).expand(len(beams), -1), tokens], dim=1)

        if explicit:
            pre = ids["rm"]
            q = model["rm"](input_ids=padded(pre)).logits  # Q(s_{t-1}, .) at every position
            at = len(pre) + lens - 2  # the state before the last token
            vals = q[rows, at].gather(1, tokens[rows, lens - 1][:, None]).squeeze(1)
            for b, v in zip(beams, vals.tolist()):
                b.explicit = v
        if implicit:
            mask = torch.arange(width, device=device)[None, :] < lens[:, None]  # [R, T]
            total = torch.zeros(len(beams), dtype=torch.float64, device=device)
            for i, g in enumerate(self.models.guides):
                lp = {}
                for role in ("tune", "ref"):
                    pre = ids[f"{role}{i}"]
                    out = model[f"{role}{i}"](input_ids=padded(pre)).logits[:, len(pre) - 1:-1, :vocab]
                    logp = torch.log_softmax(out.double(), -1).gather(2, tokens[:, :, None]).squeeze(2)  # [R, T]
                    lp[role] = (logp * mask).sum(1)
                total += g.beta * (lp["tune"] - lp["ref"])
            for b, v in zip(beams, total.tolist()):
                b.implicit = v
