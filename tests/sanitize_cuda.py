"""Exercise the GPU kernels (the Triton sampler, the CUDA block copy of csrc/) on small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  --error-exitcode 9 python tests/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python tests/sanitize_cuda.py

Inputs are made on the CPU and copied, so the only kernels launched are ours (and torch's
fills/copies). Exits non-zero if a result disagrees with the reference.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ivg_kernels  # noqa: E402
from ivg_kernels.kv_pool import KVPool  # noqa: E402


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, v, cfg in ((3, 1000, dict()), (2, 4099, dict(top_k=7)), (4, 777, dict(top_p=0.8, min_p=0.01)),
                          (1, 50, dict(temperature=0.0))):
            rows = [(torch.randn(n, v + 2, generator=gen) * 3).to(dtype).cuda() for _ in range(3)]
            kw = dict(temperature=0.8, seed=torch.arange(n).cuda(), offset=3, vocab_size=v)
            kw.update(cfg)
            guides = [(rows[1], 1.0), (rows[2], torch.full((n,), -1.0).cuda())]
            got = ivg_kernels.guided_sample(rows[0], guides, backend="triton", **kw)
            want = ivg_kernels.guided_sample(rows[0], guides, backend="reference", **kw)
            torch.cuda.synchronize()
            if not torch.equal(got.tokens, want.tokens):
                print(f"MISMATCH {dtype} n={n} v={v} {cfg}: {got.tokens.tolist()} vs {want.tokens.tolist()}")
                bad += 1
    pool = KVPool(2, 16, 4, 2, 8, dtype=torch.bfloat16, device="cuda")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen).to(torch.bfloat16))
    before = pool.kv.clone()
    pool.copy_blocks([(0, 5), (3, 15)], backend="cuda")
    torch.cuda.synchronize()
    if not (torch.equal(pool.kv[:, :, 5], before[:, :, 0]) and torch.equal(pool.kv[:, :, 15], before[:, :, 3])):
        print("MISMATCH copy_blocks")
        bad += 1
    print(f"sanitize_cuda: {'ok' if not bad else f'{bad} mismatches'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
