"""An error raised inside any unit of a decoding run leaves nothing behind: every KV block free, the block
managers' invariants intact, every model's attention given back, and the same decoder object then decodes
exactly what a fresh one does. Each case makes one unit raise on its n-th call (the block manager's
operations, a model forward, a planned draft step, the sampler, the speculative draws and verification, and each
step of the decode loop), in a configuration that reaches it, and checks that the error did come from there."""
import pytest

from ivg import decode_loop, paged_model, planned_steps, round_graphs, speculative_loop
from ivg.decoder import IVGDecoder
from ivg.options import DecodeOptions
from ivg_kernels import block_manager

import ivg_kernels

from .decoder_fixtures import ivg_models, with_graph_buffers
from .test_decoder import _same

PROMPTS = ["the movie was", "a", "it is a truly wonderful day, and"]
IVG = dict(mode="ivg", width=2, successors=2, chunk_len=3, max_new_tokens=8, seed=3, temperature=1.0, num_return=2,
           eos_token_ids=())
SPECULATIVE = dict(IVG, speculate=2)

# (owner, attribute, n-th call that raises, options, decoder arguments)
UNITS = [
    (block_manager.BlockManager, "new_sequences", 2, IVG, dict(max_batch_prompts=1)),  # a later admission
    (block_manager.BlockManager, "append", 5, IVG, {}),
    (block_manager.BlockManager, "fork_many", 3, IVG, {}),  # at a chunk boundary (1, 2: the admission's)
    (block_manager.BlockManager, "free_many", 2, IVG, {}),
    (block_manager.BlockManager, "tables", 6, IVG, {}),
    (block_manager.BlockManager, "truncate_many", 2, SPECULATIVE, {}),
    (paged_model.PagedModel, "__call__", 9, IVG, {}),
    (ivg_kernels, "guided_sample", 4, IVG, {}),
    (speculative_loop, "draft_sample", 3, SPECULATIVE, {}),
    (planned_steps.PlannedSteps, "__call__", 4, SPECULATIVE, {}),  # a draft forward in the middle of a round
    (round_graphs, "speculative_verify", 2, SPECULATIVE, {}),
    (decode_loop.DecodeLoop, "admit", 2, IVG, dict(max_batch_prompts=1)),
    (decode_loop.DecodeLoop, "read", 2, IVG, dict(read_every=4)),
    (decode_loop.DecodeLoop, "prune", 2, IVG, {}),
    (decode_loop.DecodeLoop, "fork", 1, IVG, {}),
    (decode_loop.DecodeLoop, "feed_drawn", 2, IVG, {}),
    (decode_loop.DecodeLoop, "score_rm_before_read", 2, IVG, {}),
]


class Injected(Exception):
    pass


@pytest.fixture(scope="module")
def models():
    return ivg_models("gpt2")


@pytest.mark.parametrize("graph_buffers", [False, True])
@pytest.mark.parametrize("owner,name,nth,options,decoder", UNITS,
                         ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, *_ in UNITS])
def test_an_error_in_a_unit_leaves_nothing_behind(models, monkeypatch, owner, name, nth, options, decoder,
                                                  graph_buffers):
    if graph_buffers:
        if owner is planned_steps.PlannedSteps:
            pytest.skip("a model with graph buffers plans its own draft steps")
        with_graph_buffers(monkeypatch)
    opts = DecodeOptions(**options)
    want = IVGDecoder(models, **decoder).generate(PROMPTS, opts)
    real, calls = getattr(owner, name), []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == nth:
            raise Injected(f"{name} call {nth}")
        return real(*a, **k)

    dec = IVGDecoder(models, **decoder)
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, failing)
        with pytest.raises(Injected, match=f"{name} call {nth}"):
            dec.generate(PROMPTS, opts)
    assert set(dec.kv_blocks_in_use().values()) == {0}
    for cache in dec._group.caches.values():
        assert not cache.blocks.live_sequences
        cache.blocks.check_invariants()
    for _, module, _ in models.roles():
        assert module.config._attn_implementation != "ivg_paged", "a model's attention was not given back"
    _same(dec.generate(PROMPTS, opts), want)  # the same decoder, its caches reused, decodes as a fresh one
    assert set(dec.kv_blocks_in_use().values()) == {0}
