"""Hugging Face models on the paged cache against the same models with DynamicCache and from-scratch forwards."""
import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from ivg.models import cache_kwargs  # noqa: E402
from ivg.paged_model import PagedModel, kv_shape  # noqa: E402
from ivg_kernels.block_manager import KVCacheExhausted  # noqa: E402
from ivg_kernels.kv_pool import KVCache, KVCacheGroup  # noqa: E402

from .decoder_fixtures import lm  # noqa: E402
from .helpers import DEVICE  # noqa: E402

V = 101
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
             max_position_embeddings=256)
CONFIGS = {
    "gpt2": GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=256, bos_token_id=0,
                       eos_token_id=0),
    "llama-gqa": LlamaConfig(num_key_value_heads=2, **SMALL),
    "mistral-window": MistralConfig(num_key_value_heads=2, sliding_window=8, **SMALL),
    "qwen2": Qwen2Config(num_key_value_heads=1, **SMALL),
}
BACKENDS = ["reference"] + (["triton"] if importlib.util.find_spec("triton") else [])


def captures_nothing(pm) -> bool:
    """On CUDA the reference attention is never captured (it reads lengths on the host): it runs eagerly."""
    from ivg_kernels.attention import attention_backend

    return pm.device.type == "cuda" and attention_backend(pm.backend, pm.cache.pool.kv) == "reference"


def _pair(cfg, seed=0):
    """The same random weights twice: a plain eager model (oracle) and a paged one."""
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval().to(DEVICE)
    paged = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval().to(DEVICE)
    paged.load_state_dict(ref.state_dict())
    return ref, paged


@torch.no_grad()
def _scratch(model, tokens):
    return model(torch.tensor([tokens], device=DEVICE)).logits[0, -1]


def _close(a, b, what):
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"{what}: max |diff| {diff:.2e} > 1e-5"


# Shared-prefix decode attention (forced on: the forks below share blocks) on every family with the
# reference, and with Triton on the grouped-query and sliding-window families (the interpreter is slow).
CASES = [(f, b, False) for f in CONFIGS for b in BACKENDS] + [(f, "reference", True) for f in CONFIGS] + [
    (f, b, True) for f in ("llama-gqa", "mistral-window") for b in BACKENDS if b != "reference"]


@pytest.mark.parametrize("family,backend,shared", CASES,
                         ids=[f"{f}-{b}-{'shared-prefix' if s else 'per-row'}" for f, b, s in CASES])
def test_paged_matches_dynamic_cache_with_forks_and_prunes(family, backend, shared):
    ref, paged_hf = _pair(CONFIGS[family])
    pm = PagedModel(paged_hf, num_blocks=256, block_size=4, backend=backend, shared_prefix=shared)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    ids = pm.blocks.new_sequences(3)
    history = dict(zip(ids, [list(p) for p in prompts]))

    # The oracle for sequence ids[1]: the same model stepped with a DynamicCache.
    dyn = DynamicCache(config=ref.config)
    with torch.no_grad():
        dyn_logits = ref(torch.tensor([prompts[1]], device=DEVICE), use_cache=True, **cache_kwargs(ref, dyn)).logits[0, -1]

    logits = pm(ids, prompts)  # one ragged prefill of all prompts
    _close(logits[1], dyn_logits, "prefill vs DynamicCache")
    for i, s in enumerate(ids):
        _close(logits[i], _scratch(ref, history[s]), f"prefill seq {s}")

    live = list(ids)
    for step in range(64):
        if step == 20:  # fork the first sequence into 3 children, prune the parent
            bytes_before = pm.cache.pool.bytes_copied
            kids = pm.blocks.fork(live[0], 3)
            for k in kids:
                history[k] = list(history[live[0]])
            pm.blocks.free(live[0])
            live = kids + live[1:]
        if step == 41:  # prune a child, fork another mid-block into 2
            pm.blocks.free(live[0])
            twins = pm.blocks.fork(live[1], 2)
            for k in twins:
                history[k] = list(history[live[1]])
            live = live[1:] + twins
        new = [[int(torch.randint(0, V, (1,), generator=gen))] for _ in live]
        logits = pm(live, new)
        for s, t in zip(live, new):
            history[s] += t
        if ids[1] in live:
            with torch.no_grad():
                dyn_logits = ref(torch.tensor([new[live.index(ids[1])]], device=DEVICE), **cache_kwargs(ref, dyn),
                                 position_ids=torch.tensor([[len(history[ids[1]]) - 1]], device=DEVICE),
                                 use_cache=True).logits[0, -1]
            _close(logits[live.index(ids[1])], dyn_logits, f"step {step} vs DynamicCache")
        if step % 8 == 7 or step in (20, 21, 41, 42, 63):
            for i, s in enumerate(live):
                _close(logits[i], _scratch(ref, history[s]), f"step {step} seq {s} vs from-scratch")
        if step == 20:
            per_block = pm.cache.pool.bytes_per_block
            assert pm.cache.pool.bytes_copied - bytes_before <= 3 * per_block, "a fork copied more than a block per child"
    pm.blocks.free_many(live)
    assert pm.blocks.num_free_blocks == pm.blocks.num_blocks, "blocks leaked"


def test_multi_token_chunks_after_forks():
    """Chunks of several tokens per child (prefill/extend kernel on a shared, cached prefix)."""
    ref, paged_hf = _pair(CONFIGS["llama-gqa"], seed=3)
    pm = PagedModel(paged_hf, num_blocks=64, block_size=4)
    s = pm.blocks.new_sequence()
    prompt = list(range(10, 19))
    pm([s], [prompt])
    kids = pm.blocks.fork(s, 4)
    pm.blocks.free(s)
    chunks = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11], [12, 13]]
    logits = pm(kids, chunks)
    for i, k in enumerate(kids):
        _close(logits[i], _scratch(ref, prompt + chunks[i]), f"child {i}")


def test_group_forks_models_with_different_prompt_lengths():
    """Base and guide see different templates: per-model lengths, one fork and prune for both."""
    ref_a, hf_a = _pair(CONFIGS["gpt2"], seed=4)
    ref_b, hf_b = _pair(CONFIGS["qwen2"], seed=5)
    caches = {}
    for name, hf in (("base", hf_a), ("guide", hf_b)):
        layers, kvh, hd = kv_shape(hf.config)
        caches[name] = KVCache(layers, kvh, hd, num_blocks=64, block_size=4, device=DEVICE)
    group = KVCacheGroup(caches)
    base = PagedModel(hf_a, cache=group["base"])
    guide = PagedModel(hf_b, cache=group["guide"])
    (s,) = group.new_sequences(1)
    prompt_a, prompt_b = [5, 6, 7], [9, 9, 5, 6, 7, 8, 1]  # the guide's template is longer
    base([s], [prompt_a])
    guide([s], [prompt_b])
    kids = group.fork_many([s], 2)[0]
    group.free_many([s])
    for step in range(5):
        toks = [[step + 1], [step + 20]]
        la, lb = base(kids, toks), guide(kids, toks)
        if step == 0:
            prompt_a_hist = [prompt_a + t for t in toks]
            prompt_b_hist = [prompt_b + t for t in toks]
        else:
            prompt_a_hist = [h + t for h, t in zip(prompt_a_hist, toks)]
            prompt_b_hist = [h + t for h, t in zip(prompt_b_hist, toks)]
        for i in range(2):
            _close(la[i], _scratch(ref_a, prompt_a_hist[i]), "base")
            _close(lb[i], _scratch(ref_b, prompt_b_hist[i]), "guide")
    assert group["base"].blocks.seq_len(kids[0]) == 3 + 5 and group["guide"].blocks.seq_len(kids[0]) == 7 + 5


def test_exhaustion_and_bad_tokens_leave_the_cache_unchanged():
    ref, hf = _pair(CONFIGS["gpt2"])
    pm = PagedModel(hf, num_blocks=3, block_size=4)
    a, b = pm.blocks.new_sequences(2)
    pm([a], [[1, 2, 3, 4, 5, 6]])
    snapshot = (pm.blocks.num_free_blocks, pm.blocks.seq_len(a), pm.blocks.seq_len(b))
    with pytest.raises(KVCacheExhausted, match="2 blocks needed, 1 free"):
        pm([a, b], [[7], [1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="tokens"):
        pm([a], [[V + 5]])
    with pytest.raises(ValueError, match="tokens"):
        pm([a, b], [[1]])
    with pytest.raises(ValueError, match=r"tokens: expected an int64 tensor \[2\]"):
        pm([a, b], torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"tokens: expected an int64 tensor \[2\]"):
        pm([a, b], torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="seq_ids: expected at least one sequence"):
        pm([], [])
    # arguments of the wrong kind failed with Python's own TypeError ("object is not iterable", "has no len()")
    with pytest.raises(ValueError, match="seq_ids=None: expected a sequence of the cache's sequence ids"):
        pm(None, [[1]])
    with pytest.raises(ValueError, match="tokens=float: expected one list of ids per sequence"):
        pm([a], 1.5)
    with pytest.raises(ValueError, match=r"counts=\[1.5, 1\]: expected 2 ints >= 1"):
        pm([a, b], torch.tensor([1, 2]), counts=[1.5, 1])
    with pytest.raises(ValueError, match="model=NoneType: expected a loaded transformers model"):
        PagedModel(None, num_blocks=3)
    assert (pm.blocks.num_free_blocks, pm.blocks.seq_len(a), pm.blocks.seq_len(b)) == snapshot
    pm.blocks.check_invariants()
    _close(pm([a], [[7]])[0], _scratch(ref, [1, 2, 3, 4, 5, 6, 7]), "after the errors")


def test_one_token_per_sequence_as_a_tensor_equals_the_lists():
    """A decode step fed from a tensor (the sampler's tokens, left on the device) gives the logits of
    the same tokens fed as lists, and of from-scratch forwards."""
    ref, hf = _pair(CONFIGS["llama-gqa"])
    pm = PagedModel(hf, num_blocks=16, block_size=4)
    a, b, c, d = pm.blocks.new_sequences(4)
    pm([a, c], [[1, 2, 3], [4, 5, 6, 7, 8]])
    pm([b, d], [[1, 2, 3], [4, 5, 6, 7, 8]])
    from_lists = pm([a, c], [[9], [10]])
    from_tensor = pm([b, d], torch.tensor([9, 10], device=DEVICE))
    _close(from_tensor, from_lists, "tensor vs lists")
    _close(from_tensor[1], _scratch(ref, [4, 5, 6, 7, 8, 10]), "tensor vs scratch")
    # several tokens per sequence: the flat tensor and the counts (an extend, every position)
    lists = pm([a, c], [[11, 12], [13]], every_position=True)
    flat = pm([b, d], torch.tensor([11, 12, 13], device=DEVICE), counts=[2, 1], every_position=True)
    _close(flat, lists, "flat tensor with counts vs lists")
    with pytest.raises(ValueError, match=r"counts: expected 2 counts >= 1"):
        pm([b, d], torch.tensor([1, 2], device=DEVICE), counts=[2, 0])
    with pytest.raises(ValueError, match=r"tokens: expected an int64 tensor \[3\]"):
        pm([b, d], torch.tensor([1, 2], device=DEVICE), counts=[2, 1])
    with pytest.raises(ValueError, match="counts: only with a tensor"):
        pm([b, d], [[1], [2]], counts=[1, 1])
    assert pm.blocks.seq_len(b) == pm.blocks.seq_len(a)  # the refused calls appended nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", [*CONFIGS, "token-rm-gpt2", "token-rm-llama"])
def test_lean_forward_gives_the_transformers_logits_bit_for_bit(family, dtype):
    """ivg.lean_models against the transformers forward on the same paged cache: prompts, decode steps,
    multi-token extends after forks (every position), ragged batches; identical logits."""
    from ivg.models import TokenRewardModel

    def make():
        torch.manual_seed(3)
        if family.startswith("token-rm"):
            cfg = CONFIGS["gpt2" if family.endswith("gpt2") else "llama-gqa"]
            return TokenRewardModel.from_body_config(copy.deepcopy(cfg)).to(DEVICE, dtype).eval()
        return AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[family])).to(DEVICE, dtype).eval()

    lean, full = PagedModel(make(), num_blocks=64, block_size=4, lean=True), PagedModel(make(), num_blocks=64,
                                                                                          block_size=4, lean=False)
    assert lean.lean is not None and full.lean is None
    gen = torch.Generator().manual_seed(5)
    seqs = {}
    for pm in (lean, full):
        seqs[pm] = pm.blocks.new_sequences(3)
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (9, 2, 14)]
    steps = [(prompts, {}), ([[t] for t in torch.randint(0, V, (3,), generator=gen).tolist()], {}),
             ([torch.randint(0, V, (n,), generator=gen).tolist() for n in (3, 1, 5)], dict(every_position=True))]
    for tokens, kw in steps:
        got, want = lean(seqs[lean], tokens, **kw), full(seqs[full], tokens, **kw)
        assert torch.equal(got, want), (family, kw, (got - want).abs().max())
    kids = {pm: pm.blocks.fork(seqs[pm][2], 2) for pm in (lean, full)}
    for step in range(3):
        tok = torch.randint(0, V, (2,), generator=gen)
        assert torch.equal(lean(kids[lean], tok.to(DEVICE)), full(kids[full], tok.to(DEVICE))), step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_lean_gpt2_activation_is_transformers_gelu_new_bit_for_bit(dtype):
    """The lean GPT-2 forward's in-place ``gelu_new`` against transformers' ``NewGELUActivation``: the same bits on
    random and special values; any other activation, or one whose forward was replaced, is called as it is."""
    from transformers.activations import ACT2FN

    from ivg.lean_models import _activation, _new_gelu

    gen = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(3000, generator=gen) * 4, torch.randn(1000, generator=gen) * 1e-3,
                   torch.tensor([0.0, -0.0, 1e30, -1e30, 20.0, -20.0, float("inf"), float("-inf"), float("nan")])])
    x = x.to(dtype).view(-1, 1)[: len(x) // 7 * 7].view(-1, 7)
    act = ACT2FN["gelu_new"]
    assert _activation(act) is _new_gelu
    before = x.clone()
    want, got = act(x), _new_gelu(x)
    assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0, 1.0, -1.0), want.nan_to_num(0.0, 1.0, -1.0))
    assert torch.equal(x.nan_to_num(0.0), before.nan_to_num(0.0))  # the input is not written
    other = ACT2FN["gelu"]
    assert _activation(other) == other.forward
    act.forward = lambda t: t  # (as a hub kernel or a patch would replace it): the module's own forward
    assert _activation(act) is act.forward


def test_lean_forward_is_refused_or_skipped_for_unsupported_settings():
    cfg = copy.deepcopy(CONFIGS["gpt2"])
    cfg.scale_attn_by_inverse_layer_idx = True  # a GPT-2 variant the lean forward does not cover
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert PagedModel(model, num_blocks=8, block_size=4).lean is None  # auto: the transformers forward
    with pytest.raises(ValueError, match="lean=True: GPT2LMHeadModel is not a family"):
        PagedModel(model, num_blocks=8, block_size=4, lean=True)
    with pytest.raises(ValueError, match="lean='yes': expected None, True or False"):
        PagedModel(model, num_blocks=8, block_size=4, lean="yes")
    # A transformers version without an attribute the lean forward reads: its own forward instead.
    llama = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["llama-gqa"])).eval()
    assert PagedModel(llama, num_blocks=8, block_size=4).lean is not None
    del llama.model.layers[0].self_attn.scaling
    assert PagedModel(llama, num_blocks=8, block_size=4).lean is None
    # Modules the lean forward would not call as modules: hooks (accelerate's offloading loads weights in
    # one), or a projection replaced by a wrapper or subclass whose forward may differ.
    gpt2 = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["gpt2"])).eval()
    with torch.no_grad():  # transformers installs its (inert) output-capturing hooks: still lean
        gpt2(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert any(m._forward_hooks or m._forward_pre_hooks for m in gpt2.modules()), "precondition: hooks installed"
    assert PagedModel(gpt2, num_blocks=8, block_size=4).lean is not None
    handle = gpt2.transformer.h[1].mlp.c_fc.register_forward_pre_hook(lambda m, args: None)
    assert PagedModel(gpt2, num_blocks=8, block_size=4).lean is None
    handle.remove()
    conv = gpt2.transformer.h[0].attn.c_proj
    gpt2.transformer.h[0].attn.c_proj = type("LoRAConv1D", (type(conv),), {})(conv.nf, conv.weight.shape[0])
    assert PagedModel(gpt2, num_blocks=8, block_size=4).lean is None
    # Embeddings that renormalise their rows on lookup (max_norm): the lean forward's F.embedding would not.
    gpt2 = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["gpt2"])).eval()
    gpt2.transformer.wpe.max_norm = 1.0
    assert PagedModel(gpt2, num_blocks=8, block_size=4).lean is None
    llama = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["llama-gqa"])).eval()
    llama.model.layers[1].mlp.up_proj = torch.nn.Sequential(llama.model.layers[1].mlp.up_proj)
    assert PagedModel(llama, num_blocks=8, block_size=4).lean is None


def test_group_exhaustion_in_one_model_changes_no_model():
    caches = {"a": KVCache(1, 1, 4, num_blocks=8, block_size=4), "b": KVCache(1, 1, 4, num_blocks=2, block_size=4)}
    group = KVCacheGroup(caches)
    (s,) = group.new_sequences(1)
    with pytest.raises(KVCacheExhausted, match="model 'b'"):
        group.append([s], 12)
    assert group["a"].blocks.seq_len(s) == 0 and group["a"].blocks.num_free_blocks == 8


def test_an_error_in_the_copies_or_the_transfer_leaves_every_cache_as_it_was(monkeypatch):
    """Copy-on-write copies run before the block tables change, and a failed transfer of the slots (or
    a failure in a later model of a group) takes the appends back: no half-written state, no leaked
    blocks, and every sequence still reads back what it held."""
    import ivg_kernels.kv_pool as kv_pool

    def make():
        return KVCacheGroup({name: KVCache(1, 1, 2, num_blocks=16, block_size=4) for name in ("a", "b")})

    def state(group):
        return {name: (c.blocks.block_table(live).tolist(), c.blocks.seq_lens(live).tolist(),
                       c.blocks.num_free_blocks, c.pool.kv.clone())
                for name, c in group.caches.items() for live in [c.blocks.live_sequences]}

    group = make()
    (p,) = group.new_sequences(1)
    for name, c in group.caches.items():  # a partly filled last block, holding distinct values
        slots = c.append([p], 6)
        c.pool.kv[0, :, :].view(2, -1, 2)[:, slots] = torch.arange(24.0).view(2, 6, 2)
    kids = group.fork_many([p], 3)[0]
    group.free_many([p])
    before = state(group)

    real_copy = kv_pool.KVPool.copy_blocks

    def copy_blocks(self, copies, backend="auto"):  # model b's copies fail after model a appended (and copied)
        if self is group["b"].pool:
            raise RuntimeError("copy failed")
        return real_copy(self, copies, backend)

    with monkeypatch.context() as m:
        m.setattr(kv_pool.KVPool, "copy_blocks", copy_blocks)
        with pytest.raises(RuntimeError, match="copy failed"):
            group.append(kids, 1)
    after = state(group)
    assert after["b"][:3] == before["b"][:3], "model b's copies failed: nothing may have changed there"
    assert after["a"][1] == before["a"][1], "model a's lengths back to before the append"
    for name in ("a", "b"):  # (model a's children keep the copies they made: each a copy of the shared block)
        group[name].blocks.check_invariants()
        for k in kids:  # every child still reads the parent's six tokens (in its own copy, for model a)
            table, pool = group[name].blocks.block_table([k])[0], group[name].pool.kv[0]
            pos = torch.arange(6)
            slots = table[pos // 4].long() * 4 + pos % 4
            assert torch.equal(pool.view(2, -1, 2)[:, slots], torch.arange(24.0).view(2, 6, 2)), (name, k)

    with monkeypatch.context() as m:  # the slots' transfer fails in model a
        m.setattr(kv_pool, "to_device", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("transfer failed")))
        with pytest.raises(RuntimeError, match="transfer failed"):
            group.append(kids, 1)
    now = state(group)
    for name in ("a", "b"):
        assert now[name][1:3] == after[name][1:3], name
        group[name].blocks.check_invariants()
    group.free_many(kids)
    assert all(c.blocks.num_free_blocks == 16 for c in group.caches.values()), "blocks leaked"


def test_model_from_config_leaves_the_config_untouched():
    from ivg.paged_model import ATTN_IMPLEMENTATION, model_from_config

    cfg = CONFIGS["llama-gqa"]
    before = cfg._attn_implementation
    model = model_from_config(cfg)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert cfg._attn_implementation == before


def test_cuda_graph_buckets_cover_the_default_batch_of_beams():
    """Decode steps are padded to a bucket; 64 prompts of W*K = 16 rows (the decoder's default batch
    in a search) still get a graph, and a larger batch runs eagerly (None)."""
    from ivg.cuda_graphs import bucket_for

    assert [bucket_for(n) for n in (1, 3, 16, 17, 1000, 1024)] == [1, 4, 16, 32, 1024, 1024]
    assert bucket_for(64 * 16) == 1024 and bucket_for(1025) is None


@pytest.mark.parametrize("lean", [True, False])
def test_logits_at_chosen_places(lean):
    """``logits_at`` returns the logits after the new tokens at those places of the flat order: the rows
    ``every_position`` gives there (the head runs only there); bad values are named."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["gpt2"])).eval().to(DEVICE)
    pms = [PagedModel(model, num_blocks=32, block_size=4, lean=lean) for _ in range(2)]
    seqs = {}
    for pm in pms:
        seqs[pm] = pm.blocks.new_sequences(3)
        pm(seqs[pm], [[3, 4, 5], [6], [7, 8, 9, 10, 11]])
    flat = torch.tensor([12, 13, 14, 15, 16, 17], device=DEVICE)
    at = torch.tensor([5, 0, 2, 3], device=DEVICE)
    every = pms[0](seqs[pms[0]], flat, counts=[2, 1, 3], every_position=True)
    some = pms[1](seqs[pms[1]], flat, counts=[2, 1, 3], logits_at=at)
    torch.testing.assert_close(some, every[at], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_at: give it or every_position"):
        pms[1](seqs[pms[1]], flat[:3], logits_at=at, every_position=True)
    with pytest.raises(ValueError, match="logits_at: expected a 1-D int64 tensor"):
        pms[1](seqs[pms[1]], flat[:3], logits_at=at.int())
    assert [pms[1].blocks.seq_len(s) for s in seqs[pms[1]]] == [5, 2, 8], "a refused call appended tokens"


def test_padded_groups_cover_every_row():
    from ivg.cuda_graphs import groups_for, padded_groups

    # two real groups over 5 rows, a graph of 8: rows 5, 6, 7 alone, then empty groups
    assert padded_groups([0, 3, 5], [8, 4], 5, 8) == ([0, 3, 5, 6, 7, 8, 8, 8, 8], [8, 4, 0, 0, 0, 0, 0, 0])
    assert padded_groups([0, 4], [12], 4, 4) == ([0, 4, 4, 4, 4], [12, 0, 0, 0])
    assert [groups_for(m) for m in (1, 2, 3, 16, 17)] == [2, 2, 4, 16, 32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_prefix", [False, True], ids=["per-row", "beam-groups"])
def test_graph_buffers_give_the_eager_logits(backend, shared_prefix):
    """What a CUDA graph replays, run eagerly over its static buffers (off CUDA ``DecodeGraphs`` does
    not capture): the batch padded to its bucket, the block table to its width and, with beam groups,
    the groups to the graph's slots. Its logits are those of the plain forward. Five beams forked from one
    prompt and one more prompt: 6 rows in a graph of 8, two groups sharing 2 and 1 blocks."""
    from ivg.cuda_graphs import DecodeGraphs

    cfg = copy.deepcopy(CONFIGS["gpt2"])
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg).eval().to(DEVICE)
    plain = PagedModel(model, num_blocks=64, block_size=4, backend=backend, shared_prefix=shared_prefix)
    graphed = PagedModel(model, num_blocks=64, block_size=4, backend=backend, shared_prefix=shared_prefix)
    graphed.graphs = graphed.graphs or DecodeGraphs(graphed)
    seqs = {}
    for pm in (plain, graphed):
        a, b = pm.blocks.new_sequences(2)
        pm([a, b], [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
        seqs[pm] = pm.blocks.fork(a, 5) + [b]
        pm.blocks.free(a)
    if shared_prefix:
        lists = graphed._group_lists(graphed.blocks.block_table(seqs[graphed]), graphed.blocks.seq_lens(seqs[graphed]))
        assert lists is not None and lists[2] == 5, "precondition: the five beams form one group"
    gen = torch.Generator().manual_seed(0)
    for step in range(7):  # across a block boundary (copy-on-write of the shared last block)
        new = [[int(t)] for t in torch.randint(2, 30, (6,), generator=gen)]
        want = plain(seqs[plain], new)
        got = graphed(seqs[graphed], torch.tensor([t for (t,) in new], device=DEVICE) if step % 2 else new)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not captures_nothing(graphed):
        assert graphed.graphs.replays == 7 and graphed.graphs.captures >= 1
    assert all(key[0] == 8 and key[2] == (8 if shared_prefix else 0) for key in graphed.graphs._graphs), \
        list(graphed.graphs._graphs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gpt2", "mistral-window"])
def test_extend_graph_buffers_give_the_eager_logits(backend, name):
    """Extends that feed every row the same number of tokens and keep the logits at every position (a
    speculative round's verification) go through graph buffers too, one per tokens-per-row: 5 rows in a
    graph of 8 (three padding rows of q tokens each), 3 and then 4 tokens per row, across block
    boundaries and the sliding window, between decode steps; an extend of uneven counts, and one that keeps
    only the last logits, run eagerly. Every logit as the plain forward's."""
    from ivg.cuda_graphs import DecodeGraphs

    _, model = _pair(CONFIGS[name], seed=5)
    plain = PagedModel(model, num_blocks=64, block_size=4, backend=backend)
    graphed = PagedModel(model, num_blocks=64, block_size=4, backend=backend)
    graphed.graphs = graphed.graphs or DecodeGraphs(graphed)
    seqs = {}
    prompts = [[3, 4, 5, 6, 7, 8, 9], [12, 13], [20, 21, 22, 23, 24], [30], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    for pm in (plain, graphed):
        seqs[pm] = pm.blocks.new_sequences(len(prompts))
        pm(seqs[pm], prompts)
    gen = torch.Generator().manual_seed(1)
    replays = 0
    for step, q in enumerate([3, 1, 4, 3, 1, 4]):
        new = torch.randint(2, V, (len(prompts) * q,), generator=gen)
        counts = [q] * len(prompts)
        want = plain(seqs[plain], new, counts=counts, every_position=True)
        got = graphed(seqs[graphed], new.to(DEVICE), counts=counts, every_position=True)
        assert got.shape == (len(prompts) * q, V)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        replays += 0 if captures_nothing(graphed) else 1
        assert graphed.graphs.replays == replays
    for kwargs in (dict(counts=[2, 1, 3, 1, 2], every_position=True), dict(counts=[2] * 5)):
        new = torch.randint(2, V, (sum(kwargs["counts"]),), generator=gen)
        want = plain(seqs[plain], new, **kwargs)
        torch.testing.assert_close(graphed(seqs[graphed], new.to(DEVICE), **kwargs), want, rtol=1e-5, atol=1e-5)
        assert graphed.graphs.replays == replays, "an uneven extend, or one keeping only last logits, replayed"
    if not captures_nothing(graphed):
        assert sorted({key[0] for key in graphed.graphs._graphs}) == [8]
        assert sorted({key[3] for key in graphed.graphs._graphs}) == [1, 3, 4]


def test_extends_too_large_for_a_graph_run_eagerly(monkeypatch):
    """An extend whose padded batch holds more than ``MAX_EXTEND_TOKENS`` tokens is not captured."""
    from ivg import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_EXTEND_TOKENS", 8)
    _, model = _pair(CONFIGS["gpt2"])
    pm = PagedModel(model, num_blocks=32, block_size=4)
    pm.graphs = pm.graphs or cuda_graphs.DecodeGraphs(pm)
    seqs = pm.blocks.new_sequences(3)
    pm(seqs, [[3, 4], [5], [6, 7, 8]])
    pm(seqs, torch.arange(9, 18, device=DEVICE), counts=[3, 3, 3], every_position=True)  # 4 rows x 3 > 8
    assert pm.graphs.replays == 0
    pm(seqs, torch.arange(9, 15, device=DEVICE), counts=[2, 2, 2], every_position=True)  # 4 x 2 = 8
    assert pm.graphs.replays == 1


def test_a_dropped_paged_model_frees_its_pool_at_once():
    """No reference cycle (the lean forward takes the batch as an argument): the KV pool goes with the
    last reference to its PagedModel, without waiting for the garbage collector."""
    import gc
    import weakref

    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS["gpt2"])).eval().to(DEVICE)
    pm = PagedModel(model, num_blocks=8, block_size=4)
    assert pm.lean is not None
    (s,) = pm.blocks.new_sequences(1)
    pm([s], [[1, 2, 3]])
    pool, lean = weakref.ref(pm.cache.pool.kv), weakref.ref(pm.lean)
    gc.disable()
    try:
        del pm
        assert pool() is None and lean() is None
    finally:
        gc.enable()


def test_free_all_realigns_ids_split_by_a_group_operation_that_failed_part_way(monkeypatch):
    """One model's manager forks (or makes sequences), the next one's raises: the group's ids part. After
    ``free_all`` every sequence is free and the group names new sequences alike again."""
    from ivg_kernels.block_manager import BlockManager

    group = KVCacheGroup({name: KVCache(1, 1, 2, num_blocks=8, block_size=4) for name in ("a", "b")})
    (p,) = group.new_sequences(1)
    group.append([p], 5)
    real, calls = BlockManager.fork_many, []

    def fork_many(self, *a, **k):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt  # (an interrupt between two models)
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(BlockManager, "fork_many", fork_many)
        with pytest.raises(KeyboardInterrupt):
            group.fork_many([p], 3)
    assert group["a"].blocks.next_id != group["b"].blocks.next_id
    group.free_all()
    for c in group.caches.values():
        assert c.blocks.live_sequences == [] and c.blocks.num_used_blocks == 0
        c.blocks.check_invariants()
    assert group.new_sequences(2) == [4, 5]  # model a had handed out 0 .. 3
    with pytest.raises(ValueError, match=r"next_id=3: expected an int >= 6, the next id now"):
        group["a"].blocks.skip_ids(3)


def test_a_paged_model_names_a_wrong_cache_backend_tokens_and_length():
    """A cache of another shape or dtype, an unknown backend, tokens that are not lists, and a sequence
    past the model's positions: each named (the last was an IndexError in the position embedding), and a
    failed forward leaves the sequences as they were."""
    model = lm("gpt2", 1)
    with pytest.raises(ValueError, match=r"cache: holds 1 layers of 1 KV heads of 4 .*GPT2LMHeadModel needs"):
        PagedModel(model, cache=KVCache(1, 1, 4, num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match=r"backend='cudnn': expected one of"):
        PagedModel(model, num_blocks=8, backend="cudnn")
    pm = PagedModel(model, num_blocks=64, block_size=4)
    with pytest.raises(ValueError, match=r"num_blocks=64: give the pool size or cache=, not both"):  # (was ignored)
        PagedModel(model, num_blocks=64, cache=pm.cache)
    (s,) = pm.blocks.new_sequences(1)
    with pytest.raises(ValueError, match=r"tokens: expected one list of ids per sequence"):
        pm([s], [3])
    v = pm.config_vocab
    for bad in (v, -1):  # the first id past the vocabulary, and a negative one
        with pytest.raises(ValueError, match=rf"tokens: ids must lie in \[0, {v}\)"):
            pm([s], [[3, bad]])
    (e,) = pm.blocks.new_sequences(1)
    with pytest.raises(ValueError, match=r"tokens: expected at least one new token per sequence"):
        pm([s, e], [[3], []])
    assert pm.blocks.seq_len(s) == pm.blocks.seq_len(e) == 0 and pm.blocks.num_used_blocks == 0
    pm.blocks.free(e)
    pm([s], [[3] * 90])
    with pytest.raises(ValueError, match=r"tokens: sequence 0 would hold 100 tokens, past GPT2LMHeadModel's 96"):
        pm([s], [[3] * 10])
    assert pm.blocks.seq_len(s) == 90
    (t,) = pm.blocks.new_sequences(1)
    pm([t], [[3] * 90])
    free = pm.blocks.num_free_blocks
    with pytest.raises(ValueError, match=r"tokens: sequence 0 would hold 100 tokens"):
        pm([s], [[3] * 10], twins=([t], [0]))  # the twin's slots, appended with the row's, go back too
    assert [pm.blocks.seq_len(x) for x in (s, t)] == [90, 90] and pm.blocks.num_free_blocks == free
    pm.blocks.check_invariants()
    assert pm([s], [[3] * 6]).shape[0] == 1  # up to the limit itself


@pytest.mark.parametrize("family,lean,backend", [("gpt2", None, "reference"), ("gpt2", False, "reference"),
                                                 ("llama-gqa", None, "reference"), ("llama-gqa", False, "reference")]
                         + [("llama-gqa", None, b) for b in BACKENDS if b != "reference"])
def test_twins_get_the_keys_and_values_of_the_row_they_read_with(family, lean, backend):
    """``twins=``: sequences holding the same tokens as a computed one, reading the same new token, get its
    keys and values (and no logits): every later forward of a twin gives the logits of a from-scratch forward
    and of a twin that was computed itself. Bad twins are refused by name, leaving every sequence as it was."""
    ref, hf = _pair(CONFIGS[family])
    pm = PagedModel(hf, num_blocks=64, block_size=4, lean=lean, backend=backend)
    a, b, t1, t2, t3 = pm.blocks.new_sequences(5)
    pm([a, b, t1, t2, t3], [[1, 2, 3], [4, 5, 6, 7, 8], [1, 2, 3], [4, 5, 6, 7, 8], [1, 2, 3]])
    # t1 and t3 read 9 with a, t2 reads 10 with b: only a and b are computed
    out = pm([a, b], [[9], [10]], twins=([t1, t2, t3], [0, 1, 0]))
    assert out.shape[0] == 2
    _close(out[0], _scratch(ref, [1, 2, 3, 9]), "a")
    _close(out[1], _scratch(ref, [4, 5, 6, 7, 8, 10]), "b")
    assert [pm.blocks.seq_len(s) for s in (a, b, t1, t2, t3)] == [4, 6, 4, 6, 4]
    # the twins part: each reads on from its own keys and values
    nxt = pm([t1, t2, t3, a], [[11], [12], [13], [14]])
    for row, toks in zip(nxt, ([1, 2, 3, 9, 11], [4, 5, 6, 7, 8, 10, 12], [1, 2, 3, 9, 13], [1, 2, 3, 9, 14])):
        _close(row, _scratch(ref, toks), f"twin {toks}")
    kv = pm.cache.pool.kv
    for twin, of in ((t1, a), (t3, a)):  # the keys and values at the twins' shared token: the same bits
        (blk_t, blk_a), pos = (pm.blocks.blocks_of(s)[3 // 4] for s in (twin, of)), 3 % 4
        assert torch.equal(kv[:, :, blk_t, pos], kv[:, :, blk_a, pos])

    lens = [pm.blocks.seq_len(s) for s in (a, b, t1, t2, t3)]
    free = pm.blocks.num_free_blocks
    with pytest.raises(ValueError, match="twins: a twin sequence holds another number of tokens"):
        pm([a, b], [[1], [2]], twins=([t2], [0]))  # t2 is longer than a
    with pytest.raises(ValueError, match=r"twins: expected \(twin_ids, of\) of one length with each of in \[0, 2\)"):
        pm([a, b], [[1], [2]], twins=([t1], [2]))
    with pytest.raises(ValueError, match=r"twins: expected \(twin_ids, of\)"):
        pm([a, b], [[1], [2]], twins=[t1])
    with pytest.raises(ValueError, match="twins: expected each twin once, and none of them in seq_ids"):
        pm([a, b], [[1], [2]], twins=([b], [0]))
    with pytest.raises(ValueError, match="twins: expected each twin once"):
        pm([a, b], [[1], [2]], twins=([t1, t1], [0, 0]))
    with pytest.raises(ValueError, match="twins: seq_ids: 999 is not a live sequence"):
        pm([a, b], [[1], [2]], twins=([999], [0]))
    assert [pm.blocks.seq_len(s) for s in (a, b, t1, t2, t3)] == lens and pm.blocks.num_free_blocks == free
    pm.blocks.check_invariants()

    # several new tokens each (a token RM reading a chunk): tb reads c's 3, u1 and u2 u's 2
    c, tb, u, u1, u2 = pm.blocks.new_sequences(5)
    pm([c, tb, u, u1, u2], [[4, 5], [4, 5], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    out = pm([c, u], [[21, 22, 23], [24, 25]], twins=([tb, u1, u2], [0, 1, 1]), every_position=True)
    assert out.shape[0] == 5
    _close(out[2], _scratch(ref, [4, 5, 21, 22, 23]), "c's last")
    _close(out[4], _scratch(ref, [1, 2, 3, 24, 25]), "u's last")
    nxt = pm([tb, u1, u2], [[31], [32], [33]])
    for row, toks in zip(nxt, ([4, 5, 21, 22, 23, 31], [1, 2, 3, 24, 25, 32], [1, 2, 3, 24, 25, 33])):
        _close(row, _scratch(ref, toks), f"twin {toks}")
