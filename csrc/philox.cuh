// Philox4x32-10 and the Gumbel noise of the guided sampler: the same function as
// ivg_kernels/reference/philox.py (token v of row (seed, offset) takes word v & 3 of
// Philox(counter = (v >> 2, offset_lo, offset_hi, 0), key = (seed_lo, seed_hi))).
#pragma once
#include <cstdint>

#include "portable.cuh"

namespace ivg {

__device__ __forceinline__ uint32_t philox_word(uint64_t token, uint32_t o0, uint32_t o1, uint32_t k0, uint32_t k1) {
  uint32_t c0 = static_cast<uint32_t>(token >> 2), c1 = o0, c2 = o1, c3 = 0;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi_b = __umulhi(c2, 0xCD9E8D57u), lo_b = c2 * 0xCD9E8D57u;
    const uint32_t hi_a = __umulhi(c0, 0xD2511F53u), lo_a = c0 * 0xD2511F53u;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  switch (token & 3) {
    case 0: return c0;
    case 1: return c1;
    case 2: return c2;
    default: return c3;
  }
}

// -plog(-plog(u)), u = (2 * (w >> 9) + 1) * 2^-24 in (0, 1), in float32 (plog: portable.cuh).
__device__ __forceinline__ float gumbel(uint64_t token, uint32_t o0, uint32_t o1, uint32_t k0, uint32_t k1) {
  const uint32_t w = philox_word(token, o0, o1, k0, k1);
  const float u = __fmul_rn(static_cast<float>((w >> 9) * 2u + 1u), 5.9604644775390625e-08f);
  return -plog(-plog(u));
}

}  // namespace ivg
