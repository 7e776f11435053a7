"""Every Triton kernel compiles for sm_90 (H100/H200) through its real launcher, without a GPU.

The interpreter, which runs the kernels in the other tests, never compiles them; this catches what only
the compiler rejects before a lent GPU's minutes are spent on it (benchmarks/compile_offline.py)."""
from .helpers import requires_ptxas, run_compiled


@requires_ptxas
def test_every_launcher_compiles_for_sm90(tmp_path):
    res = run_compiled("""
        import compile_offline as co
        results = co.check(90, verbose=False)
        for desc, error, kernels in results:
            print(desc, "|", error, "|", ",".join(name for name, _ in kernels))
        for desc, error, kernels in results:
            for name, r in kernels:
                print("fusion", name, r["fp_fusion"])
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout.strip().splitlines()
    fusion = {tuple(line.split()[1:]) for line in out if line.startswith("fusion ")}
    lines = [line.split(" | ") for line in out if not line.startswith("fusion ")]
    # The draws' kernels must round as the reference does (no FMA contraction: docs/maths.md); every other kernel
    # asks for contraction itself, so Triton 3.9 does not warn about an unset default and 3.10's changed default
    # does not move the attention's rounding.
    draws = {"_stage1_kernel", "_stage2_kernel", "_verify_kernel", "_draft_kernel"}
    assert {(name, str(name not in draws)) for name, _ in fusion} == fusion, sorted(fusion)
    assert "TRITON_DEFAULT_FP_FUSION" not in res.stderr, res.stderr[-2000:]
    failed = [(d, e) for d, e, _ in lines if e != "None"]
    assert not failed, failed
    compiled = {k for _, _, ks in lines for k in ks.split(",")}
    # every kernel the launchers own was compiled at least once
    assert compiled >= {"_stage1_kernel", "_stage2_kernel", "_verify_kernel", "_write_kv_kernel", "_decode_split_kernel",
                        "_decode_reduce_kernel", "_prefill_kernel", "_shared_prefix_kernel", "_shared_suffix_kernel"}
    assert len(lines) >= 36
    assert sum("softcap=" in desc for desc, _, _ in lines) == 18  # the SOFTCAP/SINKS variants of the attention kernels


@requires_ptxas
def test_offline_compile_reports_what_only_the_compiler_rejects(tmp_path):
    """``tl.static_range`` over a runtime integer runs in the interpreter, but the compiler needs a
    constexpr: the offline target must report it, and leave Triton's driver as it found it."""
    res = run_compiled("""
        import torch, triton, triton.language as tl
        from triton.runtime import driver
        import compile_offline as co

        @triton.jit
        def fill(a, n, N: tl.constexpr):
            for i in tl.static_range(n):
                tl.store(a + i, 1.0)

        @triton.jit
        def fill_constexpr(a, N: tl.constexpr):
            for i in tl.static_range(N):
                tl.store(a + i, 1.0)

        before = driver._active
        x = torch.zeros(16)
        try:
            with co.offline_target(90):
                fill[(1,)](x, 4, N=4)
        except Exception as e:
            print("rejected:", type(e).__name__)
        else:
            print("compiled")
        print("driver restored:", driver._active is before)
        with co.offline_target(90) as compiled:
            fill_constexpr[(1,)](x, N=4)
        print("constexpr:", [name for name, _ in compiled], "cubin" in compiled[0][1].asm)
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rejected: CompilationError" in res.stdout, res.stdout
    assert "driver restored: True" in res.stdout
    assert "constexpr: ['fill_constexpr'] True" in res.stdout


@requires_ptxas
def test_sass_count_reports_the_slice_it_compiled_and_dumps_into_a_new_folder(tmp_path):
    """``sass_count.py`` divides by the tokens of the slice the launcher compiled: asked for 8,192 it gets
    MAX_BLOCK (4,096), and its per-token count must be that slice's, not half of it. ``--dump`` makes its folder
    and names each file by filter and warps."""
    dump = tmp_path / "new" / "sass"
    res = run_compiled(f"""
        import sass_count
        sass_count.main(["--block", "8192", "--warps", "8", "--dump", {str(dump)!r}])
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("stage 1")]
    assert len(rows) == 2, res.stdout
    for line in rows:
        assert "block=4096" in line and "warps=8" in line, line
        total = int(line.split(": ")[1].split(" instructions")[0])
        per_token = int(line.split("instructions, ")[1].split(" per token")[0])
        assert per_token == round(total / 16), line  # 4,096 tokens over 256 threads
    assert sorted(p.name for p in dump.iterdir()) == ["stage1_filters-False_warps-8.sass",
                                                      "stage1_filters-True_warps-8.sass"]
