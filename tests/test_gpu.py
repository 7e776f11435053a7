"""GPU-only checks: torch.compile(fullgraph=True) and CUDA-graph replay of the fused sampler.

Skipped without a CUDA device (the Triton interpreter cannot run under torch.compile). Every other
test file also runs on the GPU when one is present: parity tests move their inputs to CUDA.
"""
import pytest
import torch

import ivg_kernels

pytestmark = pytest.mark.gpu


def _inputs(n=16, v=50257):
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(n, v, device="cuda", generator=gen).bfloat16()  # noqa: E731
    return mk(), mk(), mk()


def _step(base, tune, ref, seed, offset):
    out = ivg_kernels.guided_sample(
        base, [(tune, 1.0), (ref, -1.0)], temperature=0.7, top_k=50, seed=seed, offset=offset, backend="triton"
    )
    return out.tokens, out.logprob, out.input_logprobs


def test_torch_compile_fullgraph_matches_eager():
    base, tune, ref = _inputs()
    seed = torch.arange(16, device="cuda")
    offset = torch.full((16,), 3, device="cuda")
    eager = _step(base, tune, ref, seed, offset)
    compiled = torch.compile(_step, fullgraph=True)(base, tune, ref, seed, offset)
    assert torch.equal(eager[0], compiled[0])
    torch.testing.assert_close(eager[1], compiled[1])


def test_cuda_graph_replay_follows_the_offset_tensor():
    base, tune, ref = _inputs()
    seed = torch.arange(16, device="cuda")
    offset = torch.zeros(16, dtype=torch.int64, device="cuda")
    _step(base, tune, ref, seed, offset)  # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(base, tune, ref, seed, offset)
    for step in range(1, 4):
        offset.fill_(step)
        graph.replay()
        expected = _step(base, tune, ref, seed, offset)
        assert torch.equal(captured[0], expected[0])


# --- The decoder and its CUDA graphs on the GPU -------------------------------------------------------------------

def _cuda_models(dtype):
    from .decoder_fixtures import ivg_models

    m = ivg_models("gpt2", dtype=dtype)
    for _, model, _ in m.roles():
        model.to("cuda")
    return m


def _decode(models, mode, **kw):
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    opts = DecodeOptions(mode=mode, width=2, successors=3, chunk_len=4, n=5, max_new_tokens=12, seed=3,
                         temperature=1.0, num_return=1)
    dec = IVGDecoder(models, **kw)
    return dec, dec.generate(["the movie was", "a", "it is a truly wonderful day, and"], opts)


@pytest.mark.parametrize("mode", ["eft", "ivg"])
def test_decoder_on_cuda_matches_the_cpu_result(mode):
    """float64 (the reference kernels on both devices): the same tokens and values."""
    from .decoder_fixtures import ivg_models

    _, cpu = _decode(ivg_models("gpt2", dtype=torch.float64), mode)
    _, gpu = _decode(_cuda_models(torch.float64), mode)
    for a, b in zip(cpu, gpu):
        assert a.beams[0].tokens == b.beams[0].tokens
        for f in ("score", "implicit_value", "explicit_value"):
            u, v = getattr(a.beams[0], f), getattr(b.beams[0], f)
            assert (u is None) == (v is None), f
            if u is not None:
                assert abs(u - v) <= 1e-9 * max(1.0, abs(u)), (f, u, v)


def test_paged_model_graph_replay_matches_eager():
    from ivg.paged_model import PagedModel

    from .decoder_fixtures import lm

    model = lm("gpt2", 7, dtype=torch.float32).to("cuda")
    eager = PagedModel(model, num_blocks=64, block_size=4)
    graphed = PagedModel(model, num_blocks=64, block_size=4, cuda_graphs=True)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [2, 2, 2, 2, 2, 2, 2], [5]]  # 5 rows: bucket 8, padded
    seqs = {}
    for pm in (eager, graphed):
        seqs[pm] = pm.blocks.new_sequences(len(prompts))
        pm(seqs[pm], prompts)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        new = [[int(t)] for t in torch.randint(2, 30, (len(prompts),), generator=gen)]
        want = eager(seqs[eager], new)
        # odd steps feed the tokens as a device tensor, as the decoder does between host reads
        fed = torch.tensor([t for (t,) in new], device="cuda") if step % 2 else new
        got = graphed(seqs[graphed], fed)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert graphed.graphs.captures >= 1 and graphed.graphs.replays == 6


def test_decoder_with_cuda_graphs_matches_eager():
    models = _cuda_models(torch.float32)
    _, eager = _decode(models, "ivg")
    dec, graphed = _decode(models, "ivg", cuda_graphs=True)
    same = sum(a.beams[0].tokens == b.beams[0].tokens for a, b in zip(eager, graphed))
    assert same == len(eager), "float32 replay of the same kernels on a padded batch drew different tokens"


@pytest.mark.parametrize("mode", ["eft", "tokenrm", "ivg"])
def test_whole_steps_replay_as_one_graph(mode):
    """Between host reads a step is one captured graph (every model's forward, the sampler, the record):
    the tokens of per-model graphs and of eager steps; a second call captures nothing new; no leak."""
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _cuda_models(torch.float32)
    opts = DecodeOptions(mode=mode, width=2, successors=3, chunk_len=4, max_new_tokens=14, seed=3,
                         temperature=1.0, eos_token_ids=())
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    eager = IVGDecoder(models, cuda_graphs=False).generate(prompts, opts)
    per_model = IVGDecoder(models, cuda_graphs=True, step_graphs=False).generate(prompts, opts)
    dec = IVGDecoder(models, cuda_graphs=True, read_every=64)
    whole = dec.generate(prompts, opts)
    tokens = [[b.tokens for b in r.beams] for r in per_model]  # the same padded batches: the same bits
    assert [[b.tokens for b in r.beams] for r in whole] == tokens
    assert [r.beams[0].tokens for r in whole] == [r.beams[0].tokens for r in eager]
    st, captures = dec.last_stats, dec._steps.captures
    assert st.step_replays > 0 and captures >= 1, st
    again = dec.generate(prompts, opts)
    assert dec._steps.captures == captures and [[b.tokens for b in r.beams] for r in again] == tokens
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_whole_steps_with_and_without_the_side_stream(monkeypatch):
    """The guides' forwards on a second stream inside a step's and a round's graph: the same tokens as on
    one stream (a missing join would read logits the side stream has not written yet)."""
    from ivg import cuda_graphs
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _cuda_models(torch.float32)
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    for speculate in (0, 3):
        opts = DecodeOptions(mode="eft", max_new_tokens=12, seed=3, temperature=1.0, eos_token_ids=(),
                             speculate=speculate)
        got = {}
        for side in (False, True):
            monkeypatch.setattr(cuda_graphs, "SIDE_STREAM", side)
            dec = IVGDecoder(models, cuda_graphs=True, read_every=64)
            got[side] = [r.beams[0].tokens for r in dec.generate(prompts, opts)]
            assert dec.last_stats.step_replays > 0
        assert got[True] == got[False], speculate


def test_a_forward_that_cannot_be_captured_leaves_the_other_captures_working():
    """A tuned guide whose forward raises inside a capture (as transformers' expert loops do at ``nonzero``; it runs
    on the side stream): the whole steps fall back, warned, with the eager decoder's tokens, and the other models'
    graphs still capture and replay. Before the side stream was joined on errors, the unjoined capture could not
    end, its pool stayed recording, and every later capture failed ("already recording to mempool_id")."""
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _cuda_models(torch.float32)
    opts = DecodeOptions(mode="eft", max_new_tokens=12, seed=3, temperature=1.0, eos_token_ids=())
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    want = [r.beams[0].tokens for r in IVGDecoder(models, cuda_graphs=False).generate(prompts, opts)]

    def refuse(module, args):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a data-dependent forward")

    hook = models.guides[0].tuned.transformer.h[0].register_forward_pre_hook(refuse)
    try:
        with pytest.warns(UserWarning, match="capture"):
            dec = IVGDecoder(models, cuda_graphs=True, read_every=64)
            got = [r.beams[0].tokens for r in dec.generate(prompts, opts)]
        assert got == want
        st = dec.last_stats
        assert st.step_replays == 0 and st.graph_replays > 0, st  # the base's and the reference's graphs
    finally:
        hook.remove()
    dec = IVGDecoder(models, cuda_graphs=True, read_every=64)
    assert [r.beams[0].tokens for r in dec.generate(prompts, opts)] == want
    assert dec.last_stats.step_replays > 0


@pytest.mark.parametrize("mode", ["eft", "ivg"])
def test_speculative_verifications_replay_from_cuda_graphs(mode):
    """Speculating 3, the draft steps and every full-width verification (4 tokens per row, logits at every
    position) replay CUDA graphs: the tokens of the same forwards run eagerly."""
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _cuda_models(torch.float32)
    opts = DecodeOptions(mode=mode, width=2, successors=3, chunk_len=4, max_new_tokens=12, seed=3,
                         temperature=1.0, speculate=3)
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    eager = IVGDecoder(models, cuda_graphs=False).generate(prompts, opts)
    dec = IVGDecoder(models, cuda_graphs=True, step_graphs=False)  # per-model graphs, an eager verification
    graphed = dec.generate(prompts, opts)
    keys = {n: set(pm.graphs._graphs) for n, pm in dec._paged.items()}
    assert any(k[3] == 4 for n, ks in keys.items() if n != "tune0" for k in ks), keys
    assert [r.beams[0].tokens for r in graphed] == [r.beams[0].tokens for r in eager]
    assert sum(dec.kv_blocks_in_use().values()) == 0
    # every round as one graph (ivg.round_graphs): the draft's forwards and draws, the extends, the verification
    whole = IVGDecoder(models, cuda_graphs=True)
    rounds = whole.generate(prompts, opts)
    assert whole.last_stats.step_replays == whole.last_stats.steps > 0, whole.last_stats
    assert [r.beams[0].tokens for r in rounds] == [r.beams[0].tokens for r in eager]
    assert sum(whole.kv_blocks_in_use().values()) == 0


def test_decoder_graphs_with_beam_groups_match_eager():
    """Shared-prefix attention inside the CUDA graphs (the groups are graph inputs, padded to the
    bucket): the tokens of the same attention run eagerly."""
    models = _cuda_models(torch.float32)
    _, eager = _decode(models, "ivg", cuda_graphs=False, shared_prefix=True, block_size=4)
    dec, grouped = _decode(models, "ivg", cuda_graphs=True, shared_prefix=True, block_size=4)
    assert any(key[2] for pm in dec._paged.values() for key in pm.graphs._graphs), "no graph with beam groups"
    same = sum(a.beams[0].tokens == b.beams[0].tokens for a, b in zip(eager, grouped))
    assert same == len(eager)


@pytest.mark.parametrize("speculate", [0, 3])
def test_decoder_waits_for_the_device_only_when_it_reads(speculate):
    """No step synchronises with the device except the host's reads (torch's sync debug mode counts
    every synchronising call): a search without EOS reads once per chunk boundary (the lazy token RM's
    values with the tokens), a speculative round once. Counted on a second call, whose graphs exist."""
    import warnings

    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _cuda_models(torch.float32)
    dec = IVGDecoder(models, read_every=64)
    opts = DecodeOptions(mode="ivg", width=2, successors=3, chunk_len=4, max_new_tokens=14, seed=3,
                         eos_token_ids=(), speculate=speculate)
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    dec.generate(prompts, opts)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            dec.generate(prompts, opts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "called a synchronizing" in str(w.message)]  # (not the mode's prototype notice)
    reads = dec.last_stats.host_reads
    assert speculate or reads == 4, reads  # t = 4, 8, 12, 14
    assert len(syncs) <= reads + 4, (len(syncs), reads, [str(w.message)[:120] for w in syncs[:6]])


def test_decoder_keeps_its_cuda_graphs_from_call_to_call():
    """A second call (the latency regime calls once per prompt) replays the graphs the first one captured
    (its pools fit), and draws the same tokens."""
    models = _cuda_models(torch.float32)
    dec, first = _decode(models, "ivg", cuda_graphs=True)
    captures = {n: pm.graphs.captures for n, pm in dec._paged.items()}
    assert all(c for n, c in captures.items() if n != "rm"), captures  # the lazy token RM only extends
    opts_prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    from ivg.options import DecodeOptions

    opts = DecodeOptions(mode="ivg", width=2, successors=3, chunk_len=4, n=5, max_new_tokens=12, seed=3,
                         temperature=1.0, num_return=1)
    again = dec.generate(opts_prompts, opts)
    assert {n: pm.graphs.captures for n, pm in dec._paged.items()} == captures, "graphs were captured again"
    assert [r.beams[0].tokens for r in again] == [r.beams[0].tokens for r in first]


def test_custom_generate_keeps_its_cuda_graphs_from_call_to_call():
    """A loop of ``model.generate(custom_generate=ivg.CUSTOM_GENERATE)`` calls captures the decoder's graphs in
    the first call only (the decoder stays on the base model) and draws the same tokens for the same seed."""
    import ivg

    models = _cuda_models(torch.float32)
    g = models.guides[0]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device="cuda")
    kw = dict(custom_generate=ivg.CUSTOM_GENERATE, trust_remote_code=True, guides=[(g.tuned, g.ref, g.beta)],
              token_rm=models.token_rm, width=2, successors=2, chunk_len=3, max_new_tokens=8, do_sample=True,
              temperature=1.0, seed=1, eos_token_id=None, pad_token_id=0)
    first = models.base.generate(ids, **kw)
    dec = models.base._ivg_decoder.decoder
    captures = {n: pm.graphs.captures for n, pm in dec._paged.items() if pm.graphs is not None}
    assert any(captures.values()), captures
    again = models.base.generate(ids, **kw)
    assert models.base._ivg_decoder.decoder is dec
    assert {n: pm.graphs.captures for n, pm in dec._paged.items() if pm.graphs is not None} == captures
    assert torch.equal(first, again)


def test_decoder_reading_every_few_steps_matches_reading_every_step():
    """On a GPU the host reads the drawn tokens every 8 steps by default (and at chunk boundaries):
    rows that drew EOS run on between reads, from graph replays fed with the device's tokens."""
    from ivg.decoder import IVGDecoder
    from ivg.options import DecodeOptions

    models = _cuda_models(torch.float32)
    prompts = ["the movie was", "a", "it is a truly wonderful day, and"]
    for mode in ("eft", "ivg"):
        opts = DecodeOptions(mode=mode, width=2, successors=3, chunk_len=4, max_new_tokens=20, seed=3,
                             temperature=2.0, eos_token_ids=(12,))
        every = IVGDecoder(models, read_every=1)
        want = every.generate(prompts, opts)
        dec = IVGDecoder(models)
        got = dec.generate(prompts, opts)
        assert [r.beams[0].tokens for r in got] == [r.beams[0].tokens for r in want]
        assert dec.last_stats.host_reads < every.last_stats.host_reads
        assert sum(dec.kv_blocks_in_use().values()) == 0


def test_shared_prefix_attention_replays_from_a_cuda_graph():
    """The shared-prefix decode attention captured once follows new queries, lengths and groups written
    into its input buffers (what a decode graph does every step)."""
    from ivg_kernels import BlockManager, shared_prefix_decode_attention

    bm = BlockManager(256, 16)
    (root,) = bm.new_sequences(1)
    bm.append([root], 300)
    rows = bm.fork(root, 8)
    bm.free(root)
    bm.append(rows, 5)
    kc = torch.randn(256, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(8, 8, 64, device="cuda", dtype=torch.bfloat16)
    bt = torch.zeros(8, 24, dtype=torch.int32, device="cuda")
    sl = torch.zeros(8, dtype=torch.int32, device="cuda")
    st = torch.zeros(3, dtype=torch.int32, device="cuda")  # up to 2 groups
    sh = torch.zeros(2, dtype=torch.int32, device="cuda")

    def fill(step):
        table = bm.block_table(rows)
        bt.zero_()
        bt[:, :table.shape[1]] = table.cuda()
        sl.copy_(bm.seq_lens(rows).cuda())
        starts, shared = bm.shared_prefix_groups(rows)
        starts = starts + [len(rows)] * (3 - len(starts))  # pad with empty trailing groups
        st.copy_(torch.tensor(starts, dtype=torch.int32))
        sh.copy_(torch.tensor(shared + [0] * (2 - len(shared)), dtype=torch.int32))
        q.copy_(torch.randn(8, 8, 64, generator=torch.Generator().manual_seed(step)).to(q))

    def call():
        return shared_prefix_decode_attention(q, kc, vc, bt, sl, st, sh, max_group_rows=8, scale=0.125,
                                              backend="triton")

    fill(0)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for step in range(1, 4):
        bm.append(rows, [step] * len(rows))
        fill(step)
        graph.replay()
        want = ivg_kernels.paged_decode_attention(q, kc, vc, bt, sl, scale=0.125, backend="triton")
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)


def test_attention_ops_compile_fullgraph_and_match_eager():
    """Under torch.compile the attention functions go through their torch ops (eager calls launch directly)."""
    from ivg_kernels import BlockManager, paged_decode_attention, shared_prefix_decode_attention

    bm = BlockManager(64, 16)
    (root,) = bm.new_sequences(1)
    bm.append([root], 100)
    rows = bm.fork(root, 4)
    bm.free(root)
    bm.append(rows, [1, 2, 3, 4])
    kc = torch.randn(64, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    bt, sl = bm.block_table(rows).cuda(), bm.seq_lens(rows).cuda()
    starts, shared = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in bm.shared_prefix_groups(rows))

    def both(q):
        return (paged_decode_attention(q, kc, vc, bt, sl, scale=0.125, backend="triton"),
                shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, max_group_rows=4, scale=0.125,
                                               backend="triton"))

    eager = both(q)
    compiled = torch.compile(both, fullgraph=True)(q)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_remembered_attention_calls_by_address_match_the_reference(num_splits, monkeypatch):
    """``launch.POINTERS_AS_INTS``: remembered ``paged_decode_attention`` and ``shared_prefix_decode_attention`` calls
    pass their tensors' addresses (and the partial buffers' at their offsets) and give the reference's output, with
    one split and with several, with sinks; device memory stays flat over 200 calls."""
    from ivg_kernels import BlockManager, paged_decode_attention, shared_prefix_decode_attention
    from ivg_kernels._triton import launch

    monkeypatch.setattr(launch, "POINTERS_AS_INTS", True)
    bm = BlockManager(64, 16)
    (root,) = bm.new_sequences(1)
    bm.append([root], 100)
    rows = bm.fork(root, 4)  # one beam group over a shared 96-token prefix, own suffixes
    bm.free(root)
    bm.append(rows, [1, 37, 16, 150])
    kc = torch.randn(64, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    sinks = torch.randn(8, device="cuda")
    bt, sl = bm.block_table(rows).cuda(), bm.seq_lens(rows).cuda()
    starts, shared = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in bm.shared_prefix_groups(rows))
    kw = dict(scale=0.125, num_splits=num_splits, sinks=sinks)
    calls = {
        "decode": lambda backend: paged_decode_attention(q, kc, vc, bt, sl, backend=backend, **kw),
        "shared": lambda backend: shared_prefix_decode_attention(q, kc, vc, bt, sl, starts, shared, max_group_rows=4,
                                                                 backend=backend, **kw),
    }
    for name, call in calls.items():
        want = paged_decode_attention(q, kc, vc, bt, sl, backend="reference", **kw)
        call("triton")  # binds the kernels (tensors)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(200):
            got = call("triton")
        torch.cuda.synchronize()
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0, msg=name)
        del got
        assert torch.cuda.memory_allocated() == before, name


def test_several_host_tensors_reach_the_device_in_one_copy():
    from ivg_kernels._transfer import to_device_many

    host = [torch.arange(6, dtype=torch.int32).view(2, 3), torch.tensor([7, 8], dtype=torch.int64),
            torch.tensor([], dtype=torch.int32)]
    moved = to_device_many(host, "cuda")
    for h, m in zip(host, moved):
        assert m.device.type == "cuda" and m.dtype == h.dtype and m.shape == h.shape and m.is_contiguous()
        assert torch.equal(m.cpu(), h)
