"""The IVG decoder on the paged cache: every prompt, beam and model advances with one forward per model
per step; prompts are prefilled once and forked; chunk scores come from the sampler's outputs.

Each step: the fused sampler draws one token for every live row from the base logits plus the
weighted guide rows (weight 0 for models that only score), returning each input's log-prob and raw
value at the token; those update the implicit value (sum of beta * log-ratio) and the explicit value
(the token reward model's Q at the token) with no extra pass. At a chunk boundary each prompt keeps
its top W candidates; pruned rows free their blocks, kept ones fork K children that share every
block. Finished beams free their blocks and stay candidates.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

import ivg_kernels
from ivg_kernels.kv_pool import KVCache, KVCacheGroup

from .models import IVGModels
from .options import DecodeOptions
from .paged_model import PagedModel, local_kv_shape
from .search import Beam, StopChecker, expand, prompt_seed, rank, row_offset


@dataclass
class BeamResult:
    text: str
    tokens: list
    score: Optional[float]
    implicit_value: Optional[float]
    explicit_value: Optional[float]

    def as_dict(self):
        return dict(text=self.text, tokens=self.tokens, score=self.score, implicit_value=self.implicit_value,
                    explicit_value=self.explicit_value)


@dataclass
class GenerationResult:
    prompt: object
    beams: list  # BeamResult, best first

    def as_dict(self, with_beams: bool):
        out = dict(prompt=self.prompt, **self.beams[0].as_dict())
        if with_beams:
            out["beams"] = [b.as_dict() for b in self.beams]
        return out


@dataclass
class RunStats:
    prompts: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    steps: int = 0
    forwards: int = 0
    bytes_copied: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


def default_eos(models: IVGModels) -> tuple:
    ids = set()
    for src in (models.tokenizer, getattr(models.base, "generation_config", None), models.base.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return tuple(sorted(ids))


def model_positions(model) -> Optional[int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_prompts(models: IVGModels, prompts, options: DecodeOptions, roles) -> list[dict]:
    """Per prompt, the token ids each model sees; clear errors for empty or too long prompts."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of strings or token id lists")
    out = []
    for i, p in enumerate(prompts):
        ids = {name: models.prompt_ids(p, role, name) for name, _, role in roles}
        for name, model, _ in roles:
            n = len(ids[name])
            if n == 0:
                raise ValueError(f"prompts[{i}]: empty (after the {name} template); expected at least one token")
            limit = model_positions(model)
            if limit is not None and n + options.max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}]: {n} tokens + max_new_tokens {options.max_new_tokens} exceed {name}'s "
                    f"{limit} positions"
                )
        out.append(ids)
    return out


class IVGDecoder:
    """Batched IVG decoding on the paged KV cache.

    Parameters
    ----------
    models : IVGModels
    block_size : tokens per KV block
    backend : kernel backend for sampling and attention (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``)
    max_batch_prompts : prompts decoded together (the KV pools are sized for one such batch); results
        do not depend on it
    cuda_graphs : replay every model's decode steps from CUDA graphs (:mod:`ivg.cuda_graphs`), captured
        once per batch of prompts and batch-size bucket. Default: on for models on CUDA (13x faster
        steps for a gpt2-sized model on an H100, benchmarks/RESULTS.md) unless the backend is the
        reference, the models are float64 or the base is tensor-parallel; off the GPU it does nothing
    """

    def __init__(self, models: IVGModels, *, block_size: int = 16, backend: str = "auto",
                 max_batch_prompts: int = 64, cuda_graphs: bool | None = None):
        if isinstance(max_batch_prompts, bool) or not isinstance(max_batch_prompts, int) or max_batch_prompts < 1:
            raise ValueError(f"max_batch_prompts={max_batch_prompts!r}: expected an int >= 1")
        self.models = models
        self.block_size = block_size
        self.backend = backend
        self.max_batch_prompts = max_batch_prompts
        if cuda_graphs is None:  # on where the kernels that run are the graph-safe Triton ones
            param = next(models.base.parameters())
            cuda_graphs = (param.device.type == "cuda" and backend != "reference"
                           and param.dtype in (torch.float32, torch.bfloat16, torch.float16)
                           and (getattr(models.base, "tp_size", None) or 1) == 1)  # not proven with NCCL inside
        self.cuda_graphs = bool(cuda_graphs)
        self.last_stats = RunStats()
        self._group = None
        models.check()

    def kv_blocks_in_use(self) -> dict:
        """Blocks in use per model after the last ``generate`` (0 unless something leaked)."""
        if self._group is None:
            return {}
        return {name: c.blocks.num_used_blocks for name, c in self._group.caches.items()}

    def _paged_models(self, roles, num_blocks):
        caches, paged = {}, {}
        for name, model, _ in roles:
            layers, kv_heads, head_dim = local_kv_shape(model)
            param = next(model.parameters())
            caches[name] = KVCache(layers, kv_heads, head_dim, num_blocks=num_blocks, block_size=self.block_size,
                                   dtype=param.dtype, device=param.device)
        group = KVCacheGroup(caches)
        for name, model, _ in roles:
            paged[name] = PagedModel(model, cache=group[name], backend=self.backend, cuda_graphs=self.cuda_graphs)
        return group, paged

    @torch.inference_mode()
    def generate(self, prompts, options: DecodeOptions = DecodeOptions(), *, progress: bool = False):
        """Decode every prompt; returns one :class:`GenerationResult` per prompt, in order."""
        m = self.models
        opts = options.resolved(have_guides=bool(m.guides), have_token_rm=m.token_rm is not None)
        roles = [r for r in m.roles() if r[0] == "base" or (r[0].startswith(("tune", "ref")) and opts.uses_guides)
                 or (r[0] == "rm" and opts.uses_token_rm)]
        ids = check_prompts(m, prompts, opts, roles)
        eos = opts.eos_token_ids if opts.eos_token_ids is not None else default_eos(m)
        stopper = StopChecker(m.tokenizer, opts.stop, eos)
        start = time.perf_counter()
        stats = RunStats(prompts=len(ids))
        results = []
        step = self.max_batch_prompts
        for lo in range(0, len(ids), step):
            results += self._batch(prompts[lo:lo + step], ids[lo:lo + step], opts, roles, stopper, stats, progress)
        stats.wall_s = time.perf_counter() - start
        self.last_stats = stats
        return results

    def _batch(self, prompts, ids, opts, roles, stopper, stats, progress):
        beams_per_prompt = opts.width * opts.successors
        bs = self.block_size
        num_blocks = sum(
            beams_per_prompt * (-(-(max(len(x) for x in d.values()) + opts.max_new_tokens) // bs) + 1) for d in ids
        ) + len(ids)
        group, paged = self._paged_models(roles, num_blocks)
        self._group = group
        try:
            return self._run(prompts, ids, opts, roles, group, paged, stopper, stats, progress)
        finally:
            for pm in paged.values():
                pm.release()
            for name, cache in group.caches.items():
                stats.bytes_copied[name] = stats.bytes_copied.get(name, 0) + cache.pool.bytes_copied
                live = cache.blocks.live_sequences
                if live:
                    cache.blocks.free_many(live)

    def _run(self, prompts, ids, opts, roles, group, paged, stopper, stats, progress):
        names = [r[0] for r in roles]
        m = self.models
        guides = [(i, g.beta) for i, g in enumerate(m.guides)] if opts.uses_guides else []
        eft = "eft" in opts.tokenwise
        w_rm = m.token_rm_weight if "tokenrm" in opts.tokenwise else 0.0
        device = paged["base"].device
        n_prompts = len(ids)
        seeds = [prompt_seed(opts.seed, d["base"]) for d in ids]
        search = opts.width * opts.successors > 1

        # Prefill every prompt once per model (one ragged forward each), then fork into W*K rows.
        roots = group.new_sequences(n_prompts)
        first = {name: paged[name](roots, [d[name] for d in ids]) for name in names}
        stats.forwards += len(names)
        kids = group.fork_many(roots, opts.width * opts.successors)
        group.free_many(roots)
        cands = [[Beam(j, slot=kids[p][j]) for j in range(len(kids[p]))] for p in range(n_prompts)]
        live = [(p, b) for p in range(n_prompts) for b in cands[p]]
        rows = torch.tensor([p for p, _ in live], device=device)
        cur = {name: first[name].index_select(0, rows) for name in names}
        chunk_start = [0] * n_prompts
        done: list = [None] * n_prompts
        bar = _Progress(opts.max_new_tokens, enabled=progress)

        for t in range(opts.max_new_tokens):
            if not live:
                break
            sample = ivg_kernels.guided_sample(
                cur["base"],
                [pair for i, beta in guides for pair in ((cur[f"tune{i}"], beta if eft else 0.0),
                                                         (cur[f"ref{i}"], -beta if eft else 0.0))]
                + ([(cur["rm"], w_rm)] if "rm" in cur else []),
                temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p,
                seed=torch.tensor([seeds[p] for p, _ in live], device=device),
                offset=torch.tensor([row_offset(t, b.cand) for _, b in live], device=device),
                backend=self.backend,
            )
            stats.steps += 1
            ok = sample.ok.tolist()
            if not all(ok):
                bad = [i for i, v in enumerate(ok) if not v]
                raise RuntimeError(f"step {t}: rows {bad[:8]} had NaN/inf logits or no finite candidate")
            tokens = sample.tokens.tolist()
            logprob = sample.logprob.tolist()
            lp = sample.input_logprobs.double()
            implicit = torch.zeros(len(live), dtype=torch.float64, device=lp.device)
            for k, (i, beta) in enumerate(guides):
                implicit += beta * (lp[:, 1 + 2 * k] - lp[:, 2 + 2 * k])
            implicit = implicit.tolist()
            explicit = sample.input_logits[:, -1].double().tolist() if "rm" in cur else None
            for r, (p, b) in enumerate(live):
                b.tokens.append(tokens[r])
                b.logprob += logprob[r]
                b.implicit += implicit[r]
                if explicit is not None:
                    b.explicit = explicit[r]
                b.finished = stopper.finished(b.tokens) or t + 1 == opts.max_new_tokens
            stats.new_tokens += len(live)

            # Chunk boundaries: rank, prune, and plan the forks.
            boundary = set()
            for p in {p for p, _ in live}:
                alive = [b for b in cands[p] if not b.finished]
                at_chunk = opts.chunk_len is not None and (t + 1 - chunk_start[p]) % opts.chunk_len == 0
                if not alive or (search and at_chunk):
                    boundary.add(p)
            plans = {}
            to_free = []
            for p in boundary:
                scores = self._scores(prompts[p], cands[p], opts, stopper)
                order = rank(cands[p], scores, opts.keep)
                alive = [b for b in cands[p] if not b.finished]
                if not alive:
                    done[p] = self._result(prompts[p], [cands[p][i] for i in order], [scores[i] for i in order],
                                           opts, stopper)
                    continue
                kept = [cands[p][i] for i in order[: opts.width]]
                kept_ids = {id(b) for b in kept}
                to_free += [b.slot for b in cands[p] if not b.finished and id(b) not in kept_ids]
                plans[p] = expand(kept, opts.successors)
                chunk_start[p] = t + 1
            to_free += [b.slot for _, b in live if b.finished and b.slot is not None]
            for _, b in live:
                if b.finished:
                    b.slot = None
            if to_free:
                group.free_many(to_free)

            # Feed the new token of every continuing row: one forward per model.
            feed = [(p, b) for p, b in live if not b.finished and (p not in boundary or any(
                par is b for par, child in plans.get(p, []) if child))]
            if not feed:
                live = []
                break
            feed_seq = [b.slot for _, b in feed]
            out = {name: paged[name](feed_seq, [[b.tokens[-1]] for _, b in feed]) for name in names}
            stats.forwards += len(names)
            index = {id(b): i for i, (_, b) in enumerate(feed)}

            # Forks: each kept unfinished parent becomes K children sharing its blocks.
            new_live, pick = [], []
            parents = [b for p in plans for b, child in plans[p] if child]
            unique_parents = list({id(b): b for b in parents}.values())
            forks = dict(zip([id(b) for b in unique_parents],
                             group.fork_many([b.slot for b in unique_parents], opts.successors)))
            if unique_parents:
                group.free_many([b.slot for b in unique_parents])
            for p in range(n_prompts):
                if done[p] is not None:
                    continue
                if p in plans:
                    taken = {}
                    new = []
                    for j, (par, child) in enumerate(plans[p]):
                        if child:
                            k = taken.get(id(par), 0)
                            taken[id(par)] = k + 1
                            nb = par.child(j, slot=forks[id(par)][k])
                            new_live.append((p, nb))
                            pick.append(index[id(par)])
                        else:
                            nb = par.child(j, slot=None)
                        new.append(nb)
                    cands[p] = new
                else:
                    for q, b in feed:
                        if q == p:
                            new_live.append((p, b))
                            pick.append(index[id(b)])
            live = new_live
            sel = torch.tensor(pick, device=device)
            cur = {name: out[name].index_select(0, sel) for name in names}
            bar.update(t + 1)
        bar.close()
        for p in range(n_prompts):
            if done[p] is None:  # max_new_tokens ended the search
                scores = self._scores(prompts[p], cands[p], opts, stopper)
                order = rank(cands[p], scores, opts.keep)
                done[p] = self._result(prompts[p], [cands[p][i] for i in order], [scores[i] for i in order],
                                       opts, stopper)
        return done

    def _scores(self, prompt, beams, opts, stopper) -> list[float]:
        return chunk_scores(prompt, beams, opts, stopper)

    def _result(self, prompt, beams, scores, opts, stopper) -> GenerationResult:
        return make_result(prompt, beams, scores, opts, stopper, self.models)


def chunk_scores(prompt, beams, opts, stopper) -> list[float]:
    if opts.scorer == "explicit":
        return [b.explicit for b in beams]
    if opts.scorer == "implicit":
        return [b.implicit for b in beams]
    if callable(opts.scorer):
        texts = [stopper.text(b.tokens) for b in beams]
        prompt_text = prompt if isinstance(prompt, str) else ""
        scores = list(opts.scorer([prompt_text] * len(beams), texts))
        if len(scores) != len(beams):
            raise ValueError(f"scorer: returned {len(scores)} scores for {len(beams)} candidates")
        return [float(s) for s in scores]
    return [b.logprob for b in beams]


def make_result(prompt, beams, scores, opts, stopper, models) -> GenerationResult:
    out = []
    for b, s in list(zip(beams, scores))[: opts.num_return]:
        out.append(BeamResult(
            text=stopper.text(b.tokens), tokens=list(b.tokens),
            score=float(s) if opts.scorer is not None else None,
            implicit_value=b.implicit if (models.guides and opts.uses_guides) else None,
            explicit_value=b.explicit if (models.token_rm is not None and opts.uses_token_rm) else None,
        ))
    return GenerationResult(prompt=prompt, beams=out)


class _Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total, enabled):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, n):
        if self.enabled:
            frac = n / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {n}/{self.total} tokens  {time.perf_counter() - self.start:.1f}s")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")

