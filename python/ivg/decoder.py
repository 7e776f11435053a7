"""The IVG decoder on the paged cache: every prompt, beam and model advances with one forward per model
per step; prompts are prefilled once and forked; chunk scores come from the sampler's outputs.

Each step: the fused sampler draws one token for every live row from the base logits plus the
weighted guide rows (weight 0 for models that only score), returning each input's log-prob and raw
value at the token; those update the implicit value (sum of beta * log-ratio) and the explicit value
(the token reward model's Q at the token) with no extra pass. At a chunk boundary each prompt keeps
its top W candidates; pruned rows free their blocks, kept ones fork K children that share every
block. Finished beams free their blocks and stay candidates. A step reads the device once (one
packed copy of tokens, log-probs, values and flags).

``IVGDecoder.generate`` is the loop: schedule (admit waiting prompts into free rows), run (the fused
draw), update (tokens, values, flags), schedule (rank, prune, plan forks), run (one forward per model,
then fork). The units and the run's state are in :mod:`ivg.decode_loop`.
"""
from __future__ import annotations

import numbers
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ivg_kernels.kv_pool import KVCache, KVCacheGroup

from .decode_loop import DecodeLoop, Request
from .draw import decoder_backend
from .speculative_loop import SpeculativeLoop
from .models import IVGModels, model_positions, require_models
from .options import DecodeOptions, resolve
from .model_families import check_family, local_kv_shape
from .paged_model import ForwardTimer, PagedModel
from .progress import progress_bar
from .search import StopChecker, prompt_seed

STEP_GRAPHS_ENV = "IVG_STEP_GRAPHS"  # "0": IVGDecoder(step_graphs=None) keeps per-model steps


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


class RepeatedPromptsWarning(UserWarning):
    """Prompts of one ``generate`` call repeat (:func:`warn_repeats`); a caller that repeats them on purpose
    filters this category."""


def warn_repeats(ids: list) -> None:
    """Warn (once per call) when prompts repeat: a result depends only on prompt, options and seed, so a repeat
    gets the very response of its first occurrence. Repeats are no error (an evaluation file may hold them), but a
    caller who meant them as several samples of a prompt, or a mean over prompts that counts them, is misled."""
    seen = {tuple(d["base"]) for d in ids}
    if len(seen) < len(ids):
        warnings.warn(f"prompts: {len(ids) - len(seen)} of {len(ids)} repeat an earlier prompt, and each repeat gets "
                      f"the same response (a result depends only on prompt, options and seed); for several samples "
                      f"of a prompt use num_return or other seeds", RepeatedPromptsWarning,
                      stacklevel=4)  # (warn_repeats, generate, its inference_mode wrapper, the caller)


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
    drafted: int = 0  # speculative decoding: tokens the draft proposed
    accepted: int = 0  # and of those, kept
    gammas: list = field(default_factory=list)  # speculative decoding: the most drafts per row, round by round
    host_reads: int = 0  # device-to-host reads of the decode loop (one per read of drawn tokens or values)
    # time inside the models' forwards (device time on a GPU: ivg.paged_model.ForwardTimer); a step replayed whole
    # (step_replays) counts whole, its draw included
    forward_s: float = 0.0
    graph_replays: int = 0  # forwards replayed from CUDA graphs (ivg.cuda_graphs); the others ran eagerly
    step_replays: int = 0  # decode steps replayed whole, every forward and the draw in one graph (ivg.step_graphs)
    twin_rows: int = 0  # rows not computed in a step: each got a twin's keys, values and logits (ivg.twins)

    @property
    def outside_forwards(self) -> float:
        """The share of the wall time spent outside the models' forwards (sampling, bookkeeping, host); a step
        or round replayed whole counts inside, its draws included (``step_replays``)."""
        return 1.0 - self.forward_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

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


def token_ids(prompt, i: int) -> list:
    """A prompt given as token ids (a sequence of ints or a 1-D integer tensor) as a list of ints."""
    if isinstance(prompt, (torch.Tensor, np.ndarray)):
        not_ints = prompt.dtype.is_floating_point or prompt.dtype == torch.bool if isinstance(prompt, torch.Tensor) \
            else prompt.dtype.kind not in "iu"
        if prompt.ndim != 1 or not_ints:
            raise ValueError(f"prompts[{i}]: expected a 1-D integer tensor of token ids, got {prompt.dtype} "
                             f"{list(prompt.shape)}")
        return prompt.tolist()
    if not isinstance(prompt, Sequence):
        raise ValueError(f"prompts[{i}]: expected a string or a list of token ids, got {type(prompt).__name__}")
    wrong = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
    if wrong is not None:
        raise ValueError(f"prompts[{i}]: token id {wrong!r} is not an int")
    return [int(t) for t in prompt]


def check_prompts(models: IVGModels, prompts, options: DecodeOptions, roles) -> list[dict]:
    """Per prompt, the token ids each model sees; clear errors for empty or too long prompts."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of strings or token id lists")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            p = token_ids(p, i)
        ids = {name: models.prompt_ids(p, role, name) for name, _, role in roles}
        for name, model, _ in roles:
            n = len(ids[name])
            if n == 0:
                raise ValueError(f"prompts[{i}]: empty (after the {name} template); expected at least one token")
            vocab = model.config.get_text_config().vocab_size
            wrong = next((t for t in ids[name] if not 0 <= t < vocab), None)
            if wrong is not None:
                raise ValueError(f"prompts[{i}]: token id {wrong} outside {name}'s vocabulary [0, {vocab})")
            limit = model_positions(model)
            if limit is not None and n + options.max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}]: {n} tokens + max_new_tokens {options.max_new_tokens} exceed {name}'s "
                    f"{limit} positions"
                )
        out.append(ids)
    return out


# The decoder's KV block on the CPU (``IVGDecoder(block_size=None)``). bench_published's IVG setting (16 prompts,
# W = K = 4, L = 5, 32 new tokens; one thread), the same process taking turns, the same tokens: 1.06-1.27 s per run
# at 16, 0.98-1.17 s at 8 (8% less), 1.02 at 4; one prompt at a time 7% less at 8; chunk search of 16 prompts 3%,
# IVG with 900-token prompts 3%, EFT and best-of-N within 1%. The gain is the forks' copies (a fork copies the
# shared last block: half as much) and pools a quarter smaller there.
CPU_BLOCK_SIZE = 8


class IVGDecoder:
    """Batched IVG decoding on the paged KV cache.

    Parameters
    ----------
    models : IVGModels
    block_size : tokens per KV block. Default ``None``: 16 (the Triton kernels' tiles were measured with it), or
        ``CPU_BLOCK_SIZE`` for models on the CPU, whose plain-torch attention reads slots, not blocks: there a
        smaller block halves what a copy-on-write fork copies and lets the pools hold fewer unused slots (the
        same tokens and values; the measurements are at ``CPU_BLOCK_SIZE``)
    backend : kernel backend for sampling and attention (``"auto"``, ``"reference"``, ``"triton"``; neither has
        a CUDA kernel: ``ivg.draw.decoder_backend``)
    max_batch_prompts : prompts decoded at once (the KV pools are sized for that many, or for fewer, with a
        warning, where the device's memory cannot hold them); when one finishes, the next waiting prompt takes
        its rows (continuous batching). Results do not depend on it
    cuda_graphs : replay every model's decode steps from CUDA graphs (:mod:`ivg.cuda_graphs`), captured
        once per batch-size bucket and block-table width, and kept from call to call while the KV pools
        are (see ``_paged_models``). Default: on for models on CUDA (13x faster
        steps for a gpt2-sized model on an H100, benchmarks/RESULTS.md) unless the backend is the
        reference, the models are float64 or the base is tensor-parallel; off the GPU it does nothing
    shared_prefix : decode attention reads the blocks a prompt's beams share once per prompt
        (``ivg_kernels.shared_prefix_decode_attention``): ``True``, ``False``, or ``None`` for where it was
        measured to pay (see ``ivg.PagedModel``)
    read_every : the most steps between two reads of the drawn tokens by the host when an EOS token may
        end rows (the host also reads at chunk boundaries, at the length limit, and every step when stop
        strings are set; :mod:`ivg.decode_loop`). Between reads the step runs without waiting for the
        device, and a row that drew EOS runs on until the read (its extra tokens are dropped: results do
        not depend on ``read_every``). Above 1, a chunk search admits waiting prompts only at the active
        prompts' chunk boundary (when ``chunk_len <= read_every`` and no stop string is set), so that one
        read serves every prompt's boundary. Default ``None``: 1 on the CPU, 8 on a GPU
    step_graphs : where decode steps replay CUDA graphs, a step between host reads (every row reading the
        token it drew, then the next draw) replays one graph holding every model's forward and the
        sampler (:mod:`ivg.step_graphs`) instead of one graph per model and an eager sampler call, and a
        speculative round without filters is one graph too (:mod:`ivg.round_graphs`). Default ``None``: on
        unless the environment sets ``IVG_STEP_GRAPHS=0``; the same tokens either way. Beam-group attention
        (``shared_prefix``) keeps per-model graphs
    merge_twins : where the host reads every step's tokens (``read_every`` 1, no step graphs: the CPU by
        default), candidates of one prompt with the same response so far (twins) are computed as one row: the
        others get its keys and values, written into their own KV sequences, and its logits (:mod:`ivg.twins`).
        The same tokens, and values up to the rounding any other batch gives; ``False`` computes every row
    """

    def __init__(self, models: IVGModels, *, block_size: int | None = None, backend: str = "auto",
                 max_batch_prompts: int = 64, cuda_graphs: bool | None = None, shared_prefix: bool | None = None,
                 read_every: int | None = None, step_graphs: bool | None = None, merge_twins: bool = True):
        require_models(models)
        if isinstance(max_batch_prompts, bool) or not isinstance(max_batch_prompts, int) or max_batch_prompts < 1:
            raise ValueError(f"max_batch_prompts={max_batch_prompts!r}: expected an int >= 1")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size={block_size!r}: expected None or an int >= 1")
        self.models = models
        param = next(models.base.parameters())
        if block_size is None:
            block_size = CPU_BLOCK_SIZE if param.device.type == "cpu" else 16
        self.block_size = block_size
        self.backend = decoder_backend(backend)
        self.max_batch_prompts = max_batch_prompts
        if cuda_graphs is None:  # on where the kernels that run are the graph-safe Triton ones
            cuda_graphs = (param.device.type == "cuda" and backend != "reference"
                           and param.dtype in (torch.float32, torch.bfloat16, torch.float16)
                           and (getattr(models.base, "tp_size", None) or 1) == 1)  # not proven with NCCL inside
        self.cuda_graphs = bool(cuda_graphs)
        if shared_prefix not in (None, True, False):
            raise ValueError(f"shared_prefix={shared_prefix!r}: expected None, True or False")
        self.shared_prefix = shared_prefix
        if read_every is not None and (isinstance(read_every, bool) or not isinstance(read_every, int)
                                       or read_every < 1):
            raise ValueError(f"read_every={read_every!r}: expected None or an int >= 1")
        self.read_every = read_every
        if step_graphs not in (None, True, False):
            raise ValueError(f"step_graphs={step_graphs!r}: expected None, True or False")
        self.step_graphs = os.environ.get(STEP_GRAPHS_ENV, "1") != "0" if step_graphs is None else step_graphs
        if merge_twins not in (True, False):
            raise ValueError(f"merge_twins={merge_twins!r}: expected True or False")
        self.merge_twins = merge_twins
        self._steps = None  # the StepGraphs of the paged models in _paged (kept with them)
        self.last_stats = RunStats()
        self._group = None
        self._paged: dict = {}  # model name -> the PagedModel over its cache in _group (kept from call to call)
        self._no_fit: dict = {}  # the models' names -> the fewest blocks per model whose pools failed to allocate
        models.check()

    def kv_blocks_in_use(self) -> dict:
        """Blocks in use per model after the last ``generate`` (0 unless something leaked)."""
        if self._group is None:
            return {}
        return {name: c.blocks.num_used_blocks for name, c in self._group.caches.items()}

    def _pools(self, roles, ids, opts, capacity: int) -> tuple:
        """``(group, paged models, capacity)``: KV pools for ``capacity`` prompts at once, or, where the
        device's memory cannot hold pools that large, for as many as it can (halving; a warning says so):
        results do not depend on how many prompts decode together. When one prompt's pools do not fit,
        ``torch.OutOfMemoryError`` says how large they were. Pools of a size that failed for these models are
        not tried again in later calls (they would fail again, and the pools that fit, with their CUDA graphs,
        would be let go to try them)."""
        asked, names = capacity, tuple(name for name, _, _ in roles)
        while True:
            blocks = self._pool_blocks(ids, opts, capacity)
            if capacity > 1 and blocks >= self._no_fit.get(names, blocks + 1):
                capacity //= 2
                continue
            try:
                group, paged = self._paged_models(roles, blocks)
                break
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                self._no_fit[names] = min(blocks, self._no_fit.get(names, blocks))
                if capacity == 1:
                    raise torch.OutOfMemoryError(
                        f"the KV caches of one prompt do not fit in memory: {blocks} blocks of {self.block_size} "
                        f"tokens per model ({len(roles)} models), for {opts.width * opts.successors} candidates of up "
                        f"to {opts.max_new_tokens} new tokens after the longest prompt; lower max_new_tokens, the "
                        f"candidates per prompt or the prompt's length ({str(e).splitlines()[0]})") from e
                capacity //= 2
        if capacity < asked:
            warnings.warn(f"max_batch_prompts: the KV caches of {asked} prompts at once do not fit in memory; "
                          f"decoding {capacity} at a time (the same results)", stacklevel=4)
        return group, paged, capacity

    def _paged_models(self, roles, num_blocks):
        """One KV cache per model and the paged models over them. The previous call's caches are kept
        (they stay allocated anyway, see ``kv_blocks_in_use``) and reused when every model's is large
        enough and holds no sequence (sequence ids must agree across the group: all or none); pools that
        are too small are replaced by ones at least half as large again, or, where that much memory is
        not free, by ones of what the call needs."""
        old = self._group.caches if self._group is not None else {}
        shapes = {}
        for name, model, _ in roles:
            param = next(model.parameters())
            pm = self._paged.get(name)
            if pm is not None and pm.model is model:
                # the previous call's model: its cache has the shape (local_kv_shape walks every module, 1.5 ms
                # per call for the demo's four models on one CPU thread: 4% of a one-prompt response)
                kv = pm.cache.pool.kv  # [layers, 2, blocks, block size, KV heads, head dim]
                shape = (kv.shape[0], kv.shape[4], kv.shape[5])
            else:
                shape = local_kv_shape(model)
            shapes[name] = (shape, param.dtype, param.device)

        def fits(name):
            prev = old.get(name)
            if prev is None or prev.blocks.live_sequences or prev.blocks.num_used_blocks:
                return False
            (layers, kv_heads, head_dim), dtype, device = shapes[name]
            kv = prev.pool.kv
            return (kv.shape[0] == layers and kv.shape[2] >= num_blocks and kv.dtype == dtype
                    and tuple(kv.shape[3:]) == (self.block_size, kv_heads, head_dim) and kv.device == device)

        if set(old) == set(shapes) and all(fits(name) for name in shapes):
            caches = dict(old)
            for cache in caches.values():
                cache.pool.bytes_copied = 0
        else:
            grown = num_blocks
            if old and set(old) == set(shapes):  # the same models, a pool too small: grow it by half at least,
                # so that calls whose needs creep up (one prompt at a time) reallocate, and recapture, rarely
                grown = max(num_blocks, 3 * max(c.pool.kv.shape[2] for c in old.values()) // 2)
            self._group = old = None  # let the previous pools go before allocating
            self._paged = {}  # and the paged models (and CUDA graphs) over them
            self._steps = None
            try:
                caches = self._new_caches(shapes, grown)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if grown == num_blocks or not out_of_memory(e):
                    raise
                caches = self._new_caches(shapes, num_blocks)  # the headroom does not fit: what this call needs
        paged = {}
        group = KVCacheGroup(caches)
        try:
            for name, model, _ in roles:
                pm = self._paged.get(name)
                if pm is not None and pm.model is model and pm.cache is group[name]:
                    pm.attach()  # the previous call's, over the same pool: its CUDA graphs replay as they are
                else:
                    pm = PagedModel(model, cache=group[name], backend=self.backend, cuda_graphs=self.cuda_graphs,
                                    shared_prefix=self.shared_prefix)
                paged[name] = pm
        except BaseException:
            for pm in paged.values():  # the models made so far get their own attention back
                pm.release()
            raise
        self._paged = paged
        return group, paged

    def _new_caches(self, shapes: dict, num_blocks: int) -> dict:
        return {name: KVCache(*shape, num_blocks=num_blocks, block_size=self.block_size, dtype=dtype, device=device)
                for name, (shape, dtype, device) in shapes.items()}

    def check(self, prompts, options: DecodeOptions = DecodeOptions()) -> None:
        """Raise the ``ValueError`` that ``generate(prompts, options)`` would raise for its options or prompts,
        without decoding (the prompts are tokenised): a long run can refuse a bad prompt before it starts."""
        self._plan(prompts, options)

    def _plan(self, prompts, options: DecodeOptions) -> tuple:
        """``(resolved options, the models that run as (name, module, role), each prompt's ids per model)``."""
        m = self.models
        opts = resolve(options, have_guides=bool(m.guides), have_token_rm=m.token_rm is not None)
        roles = [r for r in m.roles() if r[0] == "base" or (r[0].startswith(("tune", "ref")) and opts.uses_guides)
                 or (r[0] == "rm" and opts.uses_token_rm) or (r[0] == opts.draft_model and opts.speculate)]
        for name, model, _ in roles:  # a model the paged cache cannot serve: before anything is allocated
            pm = self._paged.get(name)
            if pm is None or pm.model is not model:
                check_family(model)
        return opts, roles, check_prompts(m, prompts, opts, roles)

    @torch.inference_mode()
    def generate(self, prompts, options: DecodeOptions = DecodeOptions(), *, progress: bool = False):
        """Decode every prompt; returns one :class:`GenerationResult` per prompt, in order.

        Up to ``max_batch_prompts`` prompts are decoded together; when one finishes, the next waiting
        prompt is prefilled into the rows it freed (continuous batching)."""
        m = self.models
        opts, roles, ids = self._plan(prompts, options)
        warn_repeats(ids)
        eos = opts.eos_token_ids if opts.eos_token_ids is not None else default_eos(m)
        stopper = StopChecker(m.tokenizer, opts.stop, eos)
        stats = RunStats(prompts=len(ids))
        start = time.perf_counter()
        group, paged, capacity = self._pools(roles, ids, opts, min(len(ids), self.max_batch_prompts))
        self._group = group
        timer = ForwardTimer()
        for pm in paged.values():
            pm.timer = timer
        loop = (SpeculativeLoop if opts.speculate else DecodeLoop)(self, opts, roles, group, paged, stopper, stats)
        replays = self._graph_replays()
        steps = self._steps.steps if self._steps is not None else 0
        waiting = deque(Request(i, p, d, prompt_seed(opts.seed, d["base"])) for i, (p, d) in enumerate(zip(prompts, ids)))
        results: list = [None] * len(ids)
        bar = progress_bar(len(ids), desc="ivg generate", unit="prompt", enabled=progress)
        try:
            while waiting or loop.rows:
                loop.admit(waiting, capacity)  # schedule: prefill waiting prompts into free rows
                finished = []
                if opts.speculate:
                    loop.round()  # run: draft, verify; update: the kept tokens, their values and flags
                    plans, finished = loop.prune()  # schedule: rank at chunk boundaries, free, plan forks
                    loop.regroup(plans)  # schedule: fork the kept beams (their children read on in the next round)
                elif loop.record(loop.sample()):  # run the fused draw; update (the host reads when it must)
                    plans, finished = loop.prune()  # schedule: rank at chunk boundaries, free, plan forks
                    loop.feed(plans)  # run: one forward per model over the continuing rows, then fork
                else:
                    loop.feed_drawn()  # run: every row reads the token it drew, straight from the device
                for req in finished:
                    results[req.index] = req.result
                bar.update(len(finished))
        finally:
            bar.close()
            loop.release()
        stats.forward_s = timer.total()
        stats.graph_replays = self._graph_replays() - replays
        stats.step_replays = (self._steps.steps if self._steps is not None else 0) - steps
        stats.wall_s = time.perf_counter() - start
        self.last_stats = stats
        return results

    def _graph_replays(self) -> int:
        per_model = sum(pm.graphs.replays for pm in self._paged.values() if pm.graphs is not None)
        return per_model + (self._steps.forwards if self._steps is not None else 0)

    def step_graphs_for(self, paged: dict):
        """The :class:`~ivg.step_graphs.StepGraphs` of these paged models (kept while they are), or None
        where steps run per model (``step_graphs`` off, or no model replays graphs)."""
        if not self.step_graphs or all(pm.graphs is None for pm in paged.values()):
            return None
        from .step_graphs import StepGraphs

        old = self._steps
        if old is None or set(old.paged) != set(paged) or any(old.paged[n] is not pm for n, pm in paged.items()):
            self._steps = StepGraphs(paged)
        return self._steps

    def _pool_blocks(self, ids, opts, capacity: int) -> int:
        """KV blocks per model for any ``capacity`` prompts at once; the pool holds the ``capacity`` largest
        needs (:func:`prompt_blocks`)."""
        rows = opts.width * opts.successors
        # (a round drafts at most the tokens left: a speculate past max_new_tokens reads no further)
        most = opts.max_new_tokens + min(opts.speculate, opts.max_new_tokens)
        needs = sorted((max(prompt_blocks(len(x), rows, most, self.block_size) for x in d.values()) for d in ids),
                       reverse=True)
        return sum(needs[:capacity])

    def _result(self, prompt, beams, scores, opts, stopper) -> GenerationResult:
        return make_result(prompt, beams, scores, opts, stopper, self.models)


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed for lack of memory: CUDA's ``OutOfMemoryError``, or the CPU allocator's
    ``RuntimeError``."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def prompt_blocks(prompt_len: int, rows: int, most: int, block_size: int) -> int:
    """The most KV blocks one prompt of ``prompt_len`` tokens holds in a model's pool while its ``rows``
    candidates draw up to ``most`` tokens each.

    The rows are forks of the prompt's sequence, so they share its blocks by reference; a row copies a block
    only when it writes into a shared, partly filled last block (copy-on-write), and beams fork by reference
    again at every chunk boundary. The full blocks before the one that holds the prompt's last token (which a
    speculative round reads in each row) are therefore held once, and from that block on each row holds at
    most the blocks of its own positions, up to ``prompt_len + most``; one block more per row and one per
    prompt are headroom. (Counting the whole prompt once per row, as this did before, sized a 2,048-token
    prompt with W*K = 16 rows and 32 new tokens at 11 times its need.)"""
    shared = (prompt_len - 1) // block_size
    own = -(-(prompt_len + most) // block_size) - shared
    return shared + rows * (own + 1) + 1


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
