"""CPU-side checks of the CUDA backend: the nvcc compile check, the dispatch rule, clear errors."""
import shutil
import types

import pytest
import torch

import ivg_kernels
from ivg_kernels import _autotable, _backend, build
from ivg_kernels.kv_pool import KVPool


def _fake_cuda_tensor(dtype=torch.bfloat16):
    """Just what resolve_backend reads of a tensor: a CUDA device and a dtype."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))


@pytest.mark.skipif(build.nvcc_path() is None, reason="nvcc is not installed")
def test_nvcc_check_compiles_every_source_and_catches_a_broken_one(tmp_path, monkeypatch, capsys):
    assert build.check() == 0
    out = capsys.readouterr().out
    for src in sorted(build.CSRC.glob("*.cu")):
        assert f"ok   {src.name}" in out
    (tmp_path / "broken.cu").write_text("__global__ void k(int* p) { p[0] = undefined_name; }\n")
    shutil.copy(build.CSRC / "ivg_kernels.h", tmp_path / "ivg_kernels.h")
    monkeypatch.setattr(build, "CSRC", tmp_path)
    assert build.check(archs=("sm_80",)) == 1
    assert "FAIL broken.cu" in capsys.readouterr().out


def test_check_without_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="nvcc not found"):
        build.check()
    assert build.main(["--check"]) == 2


def test_auto_picks_cuda_only_where_the_table_says_so(monkeypatch):
    t = _fake_cuda_tensor()
    dt = (torch.bfloat16,)
    monkeypatch.setattr(_backend, "_cuda_loads", lambda: True)
    monkeypatch.setattr(_autotable, "CUDA_WINS", {"copy_blocks": [(64, 512, 1, 200_000)]})
    assert _backend.resolve_backend("auto", t, triton_dtypes=dt, cuda_dtypes=dt, op="copy_blocks",
                                    size=(128, 50257)) == "cuda"
    assert _backend.resolve_backend("auto", t, triton_dtypes=dt, cuda_dtypes=dt, op="copy_blocks",
                                    size=(16, 50257)) == "triton"
    assert _backend.resolve_backend("auto", t, triton_dtypes=dt, cuda_dtypes=None, op="copy_blocks",
                                    size=(128, 50257)) == "triton", "an op without a CUDA kernel never picks it"
    assert _backend.resolve_backend("auto", _fake_cuda_tensor(torch.float64), triton_dtypes=dt, cuda_dtypes=dt,
                                    op="copy_blocks", size=(128, 50257)) == "reference"


def test_auto_keeps_triton_when_the_build_is_unavailable(monkeypatch):
    monkeypatch.setattr(_autotable, "CUDA_WINS", {"copy_blocks": [(1, 1 << 30, 1, 1 << 30)]})

    def fail():
        raise RuntimeError("no nvcc")

    monkeypatch.setattr(build, "load", fail)
    monkeypatch.setattr(_backend, "_warned_cuda", False)
    t = _fake_cuda_tensor()
    with pytest.warns(UserWarning, match="keeps Triton.*no nvcc"):
        got = _backend.resolve_backend("auto", t, triton_dtypes=(torch.bfloat16,), cuda_dtypes=(torch.bfloat16,),
                                       op="copy_blocks", size=(8, 100))
    assert got == "triton"
    calls = []
    monkeypatch.setattr(build, "load", lambda: calls.append(1))
    assert _backend.resolve_backend("auto", t, triton_dtypes=(torch.bfloat16,), cuda_dtypes=(torch.bfloat16,),
                                    op="copy_blocks", size=(8, 100)) == "triton"
    assert calls == [], "after one failed build, auto does not try again"


def test_the_shipped_table_is_well_formed():
    for op, ranges in _autotable.CUDA_WINS.items():
        assert op == "copy_blocks"
        for n0, n1, v0, v1 in ranges:
            assert 1 <= n0 <= n1 and 1 <= v0 <= v1


def test_cuda_backend_errors_name_the_problem():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="backend='cuda': this op has no CUDA kernel"):
        ivg_kernels.guided_sample(x, seed=0, offset=0, backend="cuda")  # the CUDA sampler was dropped
    with pytest.raises(ValueError, match="backend='cuda': this op has no CUDA kernel"):
        ivg_kernels.paged_decode_attention(torch.randn(1, 2, 4), torch.zeros(2, 4, 2, 4), torch.zeros(2, 4, 2, 4),
                                           torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                                           scale=0.5, backend="cuda")


def test_ivg_backend_env_accepts_cuda_and_rejects_nonsense(monkeypatch):
    x = torch.randn(2, 10)
    monkeypatch.setenv("IVG_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda': this op has no CUDA kernel"):
        ivg_kernels.guided_sample(x, seed=0, offset=0)
    monkeypatch.setenv("IVG_BACKEND", "bogus")
    with pytest.raises(ValueError, match="IVG_BACKEND='bogus'"):
        ivg_kernels.guided_sample(x, seed=0, offset=0)


def test_pool_copy_blocks_checks_backend_and_range():
    pool = KVPool(2, 8, 4, 1, 4)
    pool.kv.copy_(torch.randn_like(pool.kv))
    before = pool.kv.clone()
    with pytest.raises(ValueError, match="copy_blocks has no Triton kernel"):
        pool.copy_blocks([(0, 1)], backend="triton")
    with pytest.raises(ValueError, match=r"\(0, 8\) out of range"):
        pool.copy_blocks([(1, 2), (0, 8)], backend="reference")
    assert torch.equal(pool.kv, before) and pool.bytes_copied == 0, "a rejected batch copies nothing"
    with pytest.raises(ValueError, match="backend='cuda': the inputs are on cpu"):
        pool.copy_blocks([(0, 1)], backend="cuda")
    pool.copy_blocks([(0, 1)], backend="reference")
    assert torch.equal(pool.kv[:, :, 1], before[:, :, 0]) and pool.bytes_copied == pool.bytes_per_block
