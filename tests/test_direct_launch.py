"""Direct launches (ivg_kernels/_triton/launch.py) pass the compiled kernel what Triton's own launch passes.

No GPU here: the kernels compile for sm_90 and a stand-in driver records each launch's grid and
arguments (benchmarks/compile_offline.py), so the direct path and Triton's path can be compared call by
call, and a new specialisation (a misaligned pointer) must not reuse a kernel compiled for another."""
import textwrap
from pathlib import Path

from .helpers import requires_ptxas, run_compiled

pytestmark = requires_ptxas

PRELUDE = """
import torch, triton, triton.language as tl
import compile_offline as co
from ivg_kernels._triton import launch

KNOWN = set()  # data pointers of the callers' tensors; others (scratch, outputs) are new on every call

def norm(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", x.data_ptr() if x.data_ptr() in KNOWN else "new", x.dtype, tuple(x.shape), x.stride())
    if isinstance(x, (tuple, list)):
        return tuple(norm(y) for y in x)
    return x

def triton_launches(fn, launches):  # what fn launches through Triton's own kernel[grid], normalised
    from ivg_kernels._triton import sampling_kernels as sk, attention_kernels as ak, speculative_kernels as spk
    sk.direct = ak.direct = spk.direct = co.via_triton
    try:
        del launches[:]
        fn()
    finally:
        sk.direct = ak.direct = spk.direct = launch.direct
    return norm(launches)
"""


def _run(code: str, tmp_path: Path) -> str:
    res = run_compiled(textwrap.dedent(PRELUDE) + textwrap.dedent(code), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_direct_launch_matches_triton_and_respects_specialisation(tmp_path):
    out = _run("""
        @triton.jit
        def add(x, y, out, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out + i, tl.load(x + i, mask=i < n) + tl.load(y + i, mask=i < n), mask=i < n)

        x, y, o = torch.zeros(64), torch.zeros(64), torch.zeros(64)
        launches = []
        with co.offline_target(90, launches) as compiled:
            add[(4,)](x, y, o, 64, BLOCK=16)                  # Triton's own path
            launch.direct(add)[(4,)](x, y, o, 64, BLOCK=16)   # first direct call: Triton's path, kernel cached
            n_compiled = len(compiled)
            launch.direct(add)[(4,)](x, y, o, 64, BLOCK=16)   # the direct path
            print("direct path skipped Triton:", len(compiled) == n_compiled)
            print("same launch:", norm(launches[0]) == norm(launches[2]), len(launches))
            aligned = launch.direct(add).kernels
            k_aligned = list(aligned.values())[0]
            launch.direct(add)[(4,)](x[1:], y, o, 63, BLOCK=16)  # x no longer 16-byte aligned, n not a multiple of 16
            print("misaligned compiled anew:", len(compiled) == n_compiled + 1,
                  compiled[-1][1].hash != k_aligned.hash, len(launch.direct(add).kernels))
            launch.direct(add)[(4,)](x[1:], y, o, 63, BLOCK=16)
            print("misaligned reused:", len(compiled) == n_compiled + 1, norm(launches[-1]) == norm(launches[-2]))
            launch.direct(add)[(2,)](x, y, o, 64, BLOCK=32)    # another constexpr
            print("constexpr compiled anew:", len(compiled) == n_compiled + 2, launches[-1][1])
    """, tmp_path)
    assert "direct path skipped Triton: True" in out, out
    assert "same launch: True 3" in out, out
    assert "misaligned compiled anew: True True 2" in out, out
    assert "misaligned reused: True True" in out, out
    assert "constexpr compiled anew: True (2, 1, 1)" in out, out


def test_sampler_attention_and_draft_launch_as_triton_would(tmp_path):
    """Each launcher's kernels get the same grids and arguments through the direct path as through
    ``kernel[grid]`` (the launchers' ``direct`` replaced by the identity)."""
    out = _run("""
        from ivg_kernels._triton import sampling_kernels as sk, attention_kernels as ak

        v = 4096
        x = [torch.zeros(4, v, dtype=torch.bfloat16) for _ in range(3)]

        def sample():
            return sk.launch_guided_sample(x[0], x[1:], [1.0, -1.0], None, None, 0.7, None, 50, None, 0.9, None, 0.0,
                                           None, 1, None, 3, v, True, 0)

        kc = torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16)
        q = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
        table, lens = torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 60, dtype=torch.int32)

        def attend():
            return ak.launch_paged_decode_attention(q, kc, kc, table, lens, 0.125, 0, 2)

        from ivg_kernels._triton import speculative_kernels as spk

        keys = torch.arange(4)

        def draft():
            return spk.launch_draft_sample(x[0], 0.7, keys, keys, v)

        KNOWN.update(t.data_ptr() for t in [*x, kc, q, table, lens, keys])
        for name, fn in (("sampler", sample), ("attention", attend), ("draft", draft)):
            launches = []
            with co.offline_target(90, launches) as compiled:
                fn(), fn()  # the second call takes the direct path
                direct_calls = norm(launches[len(launches) // 2:])
                via_triton = triton_launches(fn, launches)
            print(name, "kernels:", [c[0] for c in direct_calls], "same:", direct_calls == via_triton)
    """, tmp_path)
    assert "sampler kernels: ['_stage1_kernel', '_stage2_kernel'] same: True" in out, out
    assert "attention kernels: ['_decode_split_kernel', '_decode_reduce_kernel'] same: True" in out, out
    assert "draft kernels: ['_draft_kernel'] same: True" in out, out


def test_launch_keys_stand_for_one_specialisation_each(tmp_path):
    """The sampler, attention and KV-write launchers pass keys that let a repeated call skip Triton's
    binder (DirectLaunch.key). Over calls that differ in every way a specialisation can (dtypes, a misaligned
    start, tensor or scalar parameters, integers of another type, equal to 1 or divisible by 16, filters,
    shapes, splits), each checked against the binder (CHECK_KEYS), no key stands for two
    specialisations; and without the check the keyed launches pass what Triton's own launch passes."""
    out = _run("""
        from ivg_kernels._triton import sampling_kernels as sk, attention_kernels as ak

        v = 512
        base = {dt: [torch.zeros(4, v + 1, dtype=dt) for _ in range(3)] for dt in (torch.bfloat16, torch.float32)}
        tk = torch.full((5,), 5, dtype=torch.int64)

        wb = torch.ones(2 * 4 + 1)

        def sample(dtype=torch.bfloat16, shift=0, n=4, top_k=50, k_tensor=False, k_shift=0, seed=1, offset=3,
                   filters=True, w_shift=None, w_rows=True):
            x = [t[:n, shift:shift + v] for t in base[dtype]]
            k = tk[k_shift:k_shift + n] if k_tensor else None
            w = None if w_shift is None else (wb[w_shift:w_shift + 2 * n].view(n, 2) if w_rows
                                              else wb[w_shift:w_shift + 2].expand(n, 2))  # stride 0, like no weights
            return lambda: sk.launch_guided_sample(x[0], x[1:], [] if w is not None else [1.0, -1.0], w, None, 0.7,
                                                   k, top_k, None, 0.9, None, 0.0, None, seed, None, offset, v,
                                                   filters, 0)

        qs = {dt: torch.zeros(4 * 8 * 64 + 1, dtype=dt) for dt in (torch.bfloat16, torch.float32)}
        kc = {dt: torch.zeros(64, 16, 2, 64, dtype=dt) for dt in (torch.bfloat16, torch.float32)}
        table, lens = torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 60, dtype=torch.int32)

        def attend(dtype=torch.bfloat16, shift=0, window=0, splits=2, width=4):
            q = qs[dtype][shift:shift + 4 * 8 * 64].view(4, 8, 64)
            return lambda: ak.launch_paged_decode_attention(q, kc[dtype], kc[dtype], table[:, :width], lens, 0.125,
                                                           window, splits)

        samples = [sample(), sample(shift=1), sample(dtype=torch.float32), sample(k_tensor=True), sample(seed=2 ** 40),
                   sample(offset=1), sample(offset=16), sample(offset=-2 ** 40), sample(filters=False), sample(n=1),
                   sample(top_k=2 ** 33), sample(k_tensor=True, k_shift=1), sample(top_k=0),
                   sample(w_shift=0), sample(w_shift=1), sample(w_shift=1, w_rows=False)]
        attends = [attend(), attend(shift=1), attend(dtype=torch.float32), attend(window=24), attend(window=1),
                   attend(splits=1), attend(width=2)]

        def write(dtype=torch.bfloat16, shift=0, slot_dtype=torch.int64):
            kv = qs[dtype][shift:shift + 4 * 2 * 64].view(4, 2, 64)
            slots = torch.arange(4, dtype=slot_dtype)
            return lambda: ak.launch_write_kv(kc[dtype], kc[dtype], kv, kv, slots)

        cu, qp = torch.tensor([0, 2, 4, 6, 8], dtype=torch.int32), torch.zeros(8 * 8 * 64 + 1, dtype=torch.bfloat16)

        def prefill(shift=0, window=0, dtype=torch.bfloat16):
            q = qp[shift:shift + 8 * 8 * 64].view(8, 8, 64)
            return lambda: ak.launch_paged_prefill_attention(q, kc[dtype], kc[dtype], table, lens, cu, 2, 0.125, window)

        starts, shared = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([32, 16], dtype=torch.int32)

        def share(dtype=torch.bfloat16, shift=0):
            q = qs[dtype][shift:shift + 4 * 8 * 64].view(4, 8, 64)
            return lambda: ak.launch_shared_prefix_decode_attention(q, kc[dtype], kc[dtype], table, lens, starts, shared,
                                                                   2, 0.125, 0, 2)

        attends += [write(), write(shift=1), write(dtype=torch.float32), write(slot_dtype=torch.int32),
                    prefill(), prefill(shift=1), prefill(window=3), share(), share(shift=1)]

        from ivg_kernels._triton import speculative_kernels as spk

        keys64 = torch.arange(5, dtype=torch.int64)

        def draft(dtype=torch.bfloat16, shift=0, temperature=0.7, width=v, key_shift=0):  # (keys: int64 [R])
            x = base[dtype][0][:, shift:shift + width]
            keys = keys64[key_shift:key_shift + 4]
            return lambda: spk.launch_draft_sample(x, temperature, keys, keys, width)

        attends += [draft(), draft(shift=1), draft(dtype=torch.float32), draft(temperature=0.0), draft(width=v - 3),
                    draft(key_shift=1)]
        KNOWN.update(t.data_ptr() for d in (base, qs, kc) for ts in d.values() for t in (ts if isinstance(ts, list) else [ts]))
        KNOWN.update(t.data_ptr() for t in (tk, table, lens, wb, cu, starts, shared, qp, keys64))
        launches = []
        with co.offline_target(90, launches):
            launch.CHECK_KEYS = True
            try:
                for fn in samples + attends + samples[::-1] + attends[::-1]:
                    fn()
            finally:
                launch.CHECK_KEYS = False
            print("keys:", *(len(launch.direct(k).by_key) for k in (sk._stage1_kernel, ak._decode_split_kernel,
                                                                   ak._write_kv_kernel, ak._prefill_kernel,
                                                                   ak._shared_prefix_kernel, spk._draft_kernel)))
            same = []
            for fn in samples + attends:
                del launches[:]
                fn()
                same.append(norm(launches) == triton_launches(fn, launches))
            print("keyed launches as Triton's:", all(same), len(same))
    """, tmp_path)
    assert "keys: 16 7 4 3 2 6" in out, out
    assert "keyed launches as Triton's: True 38" in out, out


def test_stage1_warps_setting_reaches_the_compiled_kernel_of_a_keyed_launch(tmp_path):
    """``STAGE1_WARPS_WIDE`` (the warps of a stage-1 program over a slice of 4,096 tokens, which
    benchmarks/tune_stage1.py varies on a GPU) is part of the launch key: a call after it changed gets a kernel
    compiled with the new count, not the one an equal call got before (checked against the binder too)."""
    out = _run("""
        from ivg_kernels._triton import sampling_kernels as sk

        v = 4096
        x = [torch.zeros(2, v, dtype=torch.bfloat16) for _ in range(3)]

        def sample():  # slices of 4,096 (the launcher's own choice at this N would be narrower)
            return sk.launch_guided_sample(x[0], x[1:], [1.0, -1.0], None, None, 0.7, None, 0, None, 1.0, None, 0.0,
                                           None, 1, None, 3, v, False, 4096)

        own, warps = sk.STAGE1_WARPS_WIDE, []
        with co.offline_target(90, []) as compiled:
            for check in (True, False):
                launch.CHECK_KEYS = check
                try:
                    for w in (8, 4, 8):
                        sk.STAGE1_WARPS_WIDE = w
                        sample()
                        stage1 = launch.direct(sk._stage1_kernel)
                        warps.append(next(k for (dev, key), (k, names) in stage1.by_key.items()
                                          if key[3] == w).metadata.num_warps)
                finally:
                    launch.CHECK_KEYS = False
                    sk.STAGE1_WARPS_WIDE = own
        print("stage-1 warps:", warps, "default:", own)
    """, tmp_path)
    assert "stage-1 warps: [8, 4, 8, 8, 4, 8] default: 8" in out, out


def test_memoised_public_calls_launch_as_triton_would(tmp_path):
    """``ivg_kernels.guided_sample`` called again with arguments of the same kind skips the checks and launches the
    kept compiled kernels (ivg_kernels/_eager_sample.py, SampleLaunch.bound): the grids and arguments equal those of
    Triton's own ``kernel[grid]`` for the same call, for scalar and tensor row parameters, with and without
    filters; and the calls after the first were not checked again. The same for ``ivg_kernels.draft_sample``
    (speculative.DRAFT_CALLS, DraftLaunch), with int and tensor keys."""
    out = _run("""
        import os
        import ivg_kernels
        from ivg_kernels import sampling, _eager_sample
        # their kernels decorated as compiled ones
        from ivg_kernels._triton import sampling_kernels, speculative_kernels  # noqa: F401

        v = 4096
        x = [torch.zeros(4, v, dtype=torch.bfloat16) for _ in range(3)]
        temps = torch.full((4,), 0.7)
        KNOWN.update(t.data_ptr() for t in [*x, temps])
        checks, real = [], sampling.prepare_sample_args
        sampling.prepare_sample_args = lambda *a: checks.append(1) or real(*a)

        def call(offset, **kw):
            return lambda: ivg_kernels.guided_sample(x[0], [(x[1], 1.0), (x[2], -1.0)], seed=3, offset=offset,
                                                     backend="triton", **kw)

        for name, kw in (("plain", dict(temperature=0.7)), ("filters", dict(temperature=0.7, top_k=50, top_p=0.9)),
                         ("tensor", dict(temperature=temps, min_p=0.1))):
            launches = []
            del checks[:]
            with co.offline_target(90, launches):
                # the public function takes CPU tensors on the Triton path only so; its kernels, decorated at import
                # without it, stay compiled ones
                os.environ["TRITON_INTERPRET"] = "1"
                for offset in (2, 3, 5):  # one signature; the first call compiles and is checked
                    call(offset, **kw)()
                memoised = norm(launches[-2:])
                via_triton = triton_launches(call(5, **kw), launches)
                del os.environ["TRITON_INTERPRET"]
            print(name, "same:", memoised == via_triton, "checks:", len(checks))

        from ivg_kernels import speculative
        speculative.prepare_sample_args = sampling.prepare_sample_args  # (the spy)
        offsets = torch.arange(16).view(4, 4)  # (columns 0 and 2 start on 16 bytes)
        KNOWN.add(offsets.data_ptr())
        launches = []
        with co.offline_target(90, launches):  # (one context: both cases share one DraftLaunch, bound in it)
            for name, seed in (("draft", 3), ("draft keys", offsets[:, 0])):
                del checks[:]
                os.environ["TRITON_INTERPRET"] = "1"
                for col in (0, 2, 0):  # one signature (a strided column of offsets, copied for the kernel)
                    del launches[:]
                    ivg_kernels.draft_sample(x[0], temperature=0.7, seed=seed, offset=offsets[:, col], backend="triton")
                memoised = norm(launches)
                via_triton = triton_launches(lambda: ivg_kernels.draft_sample(
                    x[0], temperature=0.7, seed=seed, offset=offsets[:, 0], backend="triton"), launches)
                del os.environ["TRITON_INTERPRET"]
                print(name, "kernels:", len(memoised), "same:", memoised == via_triton, "checks:", len(checks))
    """, tmp_path)
    for name in ("plain", "filters", "tensor"):
        assert f"{name} same: True checks: 1" in out, out
    for name in ("draft", "draft keys"):
        assert f"{name} kernels: 1 same: True checks: 1" in out, out


BY_ADDRESS = """
import os

def by_address(call, outputs):
    '''With launch.POINTERS_AS_INTS: call() once (binding its kernels), again (launching by address), then through
    Triton's own kernel[grid]; whether the binding call passed tensors and the second's launches are Triton's
    with each tensor read as its address: a caller's tensor's own, an output's that of the same output of that
    call (outputs(result) lists them), the scratch's at one offset from Triton's call's scratch for all.'''
    from ivg_kernels._triton import sampling_kernels as sk, attention_kernels as ak
    launches = []
    launch.POINTERS_AS_INTS = True
    try:
        with co.offline_target(90, launches):
            os.environ["TRITON_INTERPRET"] = "1"  # (CPU tensors on the Triton path; the kernels stay compiled)
            call()
            binding = sum(isinstance(a, torch.Tensor) for _, _, args in launches for a in args)
            del launches[:]
            ours = outputs(call())
            ints = list(launches)
            sk.direct = ak.direct = co.via_triton
            try:
                del launches[:]
                theirs = outputs(call())
                via_triton = list(launches)
            finally:
                sk.direct = ak.direct = launch.direct
                del os.environ["TRITON_INTERPRET"]
    finally:
        launch.POINTERS_AS_INTS = False
    role = {a.data_ptr(): b.data_ptr() for a, b in zip(theirs, ours)}
    scratch = set()

    def same(triton, mine):
        if isinstance(triton, torch.Tensor):
            if type(mine) is not int or mine % 16:
                return False
            at = triton.data_ptr()
            if at in KNOWN:
                return mine == at
            if at in role:
                return mine == role[at]
            scratch.add(mine - at)
            return True
        if isinstance(triton, (tuple, list)):
            return (isinstance(mine, (tuple, list)) and len(mine) == len(triton)
                    and all(same(a, b) for a, b in zip(triton, mine)))
        return not isinstance(mine, torch.Tensor) and mine == triton

    ok = (len(ints) == len(via_triton) > 0
          and all(a[:2] == b[:2] and same(b[2], a[2]) for a, b in zip(ints, via_triton)) and len(scratch) <= 1)
    return binding > 0, ok
"""


def test_remembered_calls_can_pass_their_pointers_as_ints(tmp_path):
    """With ``launch.POINTERS_AS_INTS`` a remembered ``guided_sample``, ``paged_decode_attention`` or
    ``shared_prefix_decode_attention`` call that launches straight to the compiled kernels passes each tensor's address where it passed the tensor (Triton's
    launchers take an int as the pointer itself, and skip the driver's pointer query): its launches are Triton's
    own for the same call with every tensor read as its address, each output at its place and the scratch (the
    attention's partial buffers at their offsets) at one. The call that binds the kernels still passes tensors
    (Triton's binder specialises on them)."""
    out = _run(BY_ADDRESS + textwrap.dedent("""
        import ivg_kernels

        v = 4096
        x = [torch.zeros(4, v, dtype=torch.bfloat16) for _ in range(3)]
        temps = torch.full((4,), 0.7)
        KNOWN.update(t.data_ptr() for t in [*x, temps])
        sample_outputs = lambda r: (r.tokens, r.logprob, r.logsumexp, r.input_logprobs, r.input_logits, r.ok)
        for name, kw in (("plain", dict(temperature=0.7)), ("filters", dict(temperature=0.7, top_k=50, top_p=0.9)),
                         ("tensor", dict(temperature=temps, min_p=0.1))):
            print(name, "binding passes tensors, same:", *by_address(lambda: ivg_kernels.guided_sample(
                x[0], [(x[1], 1.0), (x[2], -1.0)], seed=3, offset=5, backend="triton", **kw), sample_outputs))

        kc = torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16)
        table, lens = torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 60, dtype=torch.int32)
        q, sinks = torch.ones(4, 8, 64, dtype=torch.bfloat16), torch.zeros(8)
        KNOWN.update(t.data_ptr() for t in [kc, table, lens, q, sinks])
        for name, kw in (("one split", dict(num_splits=1)), ("splits", dict(num_splits=2)),
                         ("sinks", dict(num_splits=2, sinks=sinks, softcap=5.0))):
            print(name, "binding passes tensors, same:", *by_address(lambda: ivg_kernels.paged_decode_attention(
                q, kc, kc, table, lens, scale=0.125, backend="triton", **kw), lambda out: (out,)))
        starts, shared = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([32, 16], dtype=torch.int32)
        KNOWN.update(t.data_ptr() for t in [starts, shared])
        for name, kw in (("shared", dict()), ("shared sinks", dict(sinks=sinks, softcap=5.0))):
            print(name, "binding passes tensors, same:", *by_address(lambda: ivg_kernels.shared_prefix_decode_attention(
                q, kc, kc, table, lens, starts, shared, max_group_rows=2, scale=0.125, backend="triton", **kw),
                lambda out: (out,)))
    """), tmp_path)
    for name in ("plain", "filters", "tensor", "one split", "splits", "sinks", "shared", "shared sinks"):
        assert f"{name} binding passes tensors, same: True True" in out, out


def test_memoised_public_attention_calls_launch_as_triton_would(tmp_path):
    """``ivg_kernels.paged_decode_attention``, ``write_kv``, ``shared_prefix_decode_attention`` and
    ``paged_prefill_attention`` called again with arguments of the same kind skip the checks and launch the kept
    compiled kernels (attention.DECODE_CALLS, WRITE_CALLS, SHARED_CALLS and PREFILL_CALLS, KeyedKernels.bound): the
    grids and arguments equal those of Triton's own ``kernel[grid]`` for the same call, with one split and with the
    reduce kernel, with and without sinks; and the calls after the first were not checked again."""
    out = _run("""
        import os
        import ivg_kernels
        from ivg_kernels import attention
        from ivg_kernels._triton import attention_kernels  # noqa: F401 - its kernels decorated as compiled ones

        kc = torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16)
        table, lens = torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 60, dtype=torch.int32)
        sinks = torch.zeros(8)
        KNOWN.update(t.data_ptr() for t in [kc, table, lens, sinks])
        queries = []  # (kept: a freed query's memory could come back as an output, which norm() tells apart)
        checks, real = [], attention._check_cache
        attention._check_cache = lambda *a: checks.append(1) or real(*a)

        for name, kw in (("one split", dict(num_splits=1)), ("splits", dict(num_splits=2)),
                         ("sinks", dict(num_splits=2, sinks=sinks, softcap=5.0))):
            launches = []
            del checks[:]
            with co.offline_target(90, launches):
                os.environ["TRITON_INTERPRET"] = "1"  # (CPU tensors on the Triton path; the kernels stay compiled)
                for i in range(3):  # one signature; the first call compiles and is checked
                    q = torch.full((4, 8, 64), float(i), dtype=torch.bfloat16)
                    queries.append(q)
                    KNOWN.add(q.data_ptr())
                    del launches[:]
                    ivg_kernels.paged_decode_attention(q, kc, kc, table, lens, scale=0.125, backend="triton", **kw)
                memoised = norm(launches)
                via_triton = triton_launches(lambda: ivg_kernels.paged_decode_attention(
                    q, kc, kc, table, lens, scale=0.125, backend="triton", **kw), launches)
                del os.environ["TRITON_INTERPRET"]
            print(name, "kernels:", len(memoised), "same:", memoised == via_triton, "checks:", len(checks))

        def compare(name, call):  # three calls of one kind (the first checked), the last against Triton's path
            launches = []
            del checks[:]
            with co.offline_target(90, launches):
                os.environ["TRITON_INTERPRET"] = "1"
                for i in range(3):
                    del launches[:]
                    call()
                memoised = norm(launches)
                via_triton = triton_launches(call, launches)
                del os.environ["TRITON_INTERPRET"]
            print(name, "kernels:", len(memoised), "same:", memoised == via_triton, "checks:", len(checks))

        key, slots = torch.zeros(5, 2, 64, dtype=torch.bfloat16), torch.arange(5)
        starts, shared = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([32, 16], dtype=torch.int32)
        cu = torch.tensor([0, 3, 4, 9, 9], dtype=torch.int32)  # ragged runs (one empty) of 9 new tokens
        qp = torch.zeros(9, 8, 64, dtype=torch.bfloat16)
        KNOWN.update(t.data_ptr() for t in [key, slots, starts, shared, cu, qp])
        compare("write", lambda: ivg_kernels.write_kv(kc, kc, key, key, slots, backend="triton"))
        compare("shared", lambda: ivg_kernels.shared_prefix_decode_attention(
            queries[0], kc, kc, table, lens, starts, shared, max_group_rows=2, scale=0.125, backend="triton"))
        compare("prefill", lambda: ivg_kernels.paged_prefill_attention(
            qp, kc, kc, table, lens, cu, max_seqlen_q=5, scale=0.125, sinks=sinks, backend="triton"))
    """, tmp_path)
    for name, kernels in (("one split", 1), ("splits", 2), ("sinks", 2), ("write", 1), ("shared", 2), ("prefill", 1)):
        assert f"{name} kernels: {kernels} same: True checks: 1" in out, out
