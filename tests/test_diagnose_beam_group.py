"""``benchmarks/diagnose_beam_group.py``: every plan it sweeps (splits of the prefix, query tiles) computes the
per-beam attention, and a plan that does not is reported (exit 1). On the CPU the kernels run in the interpreter."""
import pytest
import torch

from benchmarks import diagnose_beam_group
from ivg_kernels import attention
from ivg_kernels._triton import attention_kernels as ak

SMALL = ["--beams", "8", "--prompt", "40", "--own", "9", "--heads", "8", "--kv-heads", "2", "--dim", "16", "--block",
         "4", "--splits", "0", "3", "--tile-m", "64", "16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's small shape (the GPU runs it in gpu_suite)")
def test_every_plan_matches_per_beam_attention(capsys):
    assert diagnose_beam_group.main(SMALL) == 0
    out = capsys.readouterr().out
    # 8 beams x 4 query heads per KV head = 32 queries: one tile of 32 (tile 64) or two of 16
    for plan, programs in (("tile 64, splits 3 ", 2 * 1 * 3), ("tile 16, splits 3 ", 2 * 2 * 3)):
        line = next(ln for ln in out.splitlines() if ln.startswith(plan))
        assert int(line.split()[4]) == programs, line
    assert ak._PREFIX_TILE_M == 64  # the sweep's setting restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's small shape")
def test_a_plan_that_skips_part_of_the_prefix_is_reported(monkeypatch, capsys):
    plan = ak._shared_plan

    def short_chunks(*a):  # each split one tile of keys: one split (the launcher's choice here) reads 16 of 40
        block_m, m_tiles, splits, chunk, both = plan(*a)
        return block_m, m_tiles, splits, both["BLOCK_N"], both

    monkeypatch.setattr(ak, "_shared_plan", short_chunks)
    # no plan or remembered call made before the change
    monkeypatch.setattr(ak, "_SHARED_LAUNCHES", type(ak._SHARED_LAUNCHES)())
    monkeypatch.setattr(attention, "SHARED_CALLS", type(attention.SHARED_CALLS)())
    assert diagnose_beam_group.main(SMALL) == 1
    assert "differs from per-beam attention" in capsys.readouterr().out
