"""The CUDA kernel of csrc/ on a GPU: the copy-on-write block copy against the reference.

Skipped without a CUDA device or without nvcc to build csrc/.
"""
import pytest
import torch

from ivg_kernels.kv_pool import KVPool

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda_build():
    from ivg_kernels.build import cuda_backend_available

    if not torch.cuda.is_available() or not cuda_backend_available():
        pytest.skip("needs a CUDA device and a build of csrc/")


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 3), (torch.float32, 5)])
def test_cuda_copy_blocks_matches_the_reference(dtype, head_dim):
    pools = [KVPool(3, 40, 4, 2, head_dim, dtype=dtype, device="cuda") for _ in range(2)]
    init = torch.randn_like(pools[0].kv, dtype=torch.float32).to(dtype)
    for p in pools:
        p.kv.copy_(init)
    copies = [(0, 7), (3, 39), (12, 1), (5, 6)]
    pools[0].copy_blocks(copies, backend="reference")
    pools[1].copy_blocks(copies, backend="cuda")
    assert torch.equal(pools[0].kv, pools[1].kv)
    assert pools[0].bytes_copied == pools[1].bytes_copied > 0
    untouched = [b for b in range(40) if b not in (7, 39, 1, 6)]
    assert torch.equal(pools[1].kv[:, :, untouched], init[:, :, untouched])
