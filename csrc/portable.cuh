// The transcendentals a draw depends on, from IEEE operations only: the same bits as
// ivg_kernels/reference/portable.py and the Triton twins (_plog, _mass_int). Every float
// operation is an explicit round-to-nearest intrinsic, so nvcc cannot contract it into an FMA.
#pragma once
#include <cstdint>

namespace ivg {

// log(x) for positive normal float32 x (about 2 ulp).
__device__ __forceinline__ float plog(float x) {
  const int32_t bits = __float_as_int(x);
  int32_t e = (bits >> 23) - 127;
  float m = __int_as_float((bits & 0x7FFFFF) | 0x3F800000);  // [1, 2)
  if (m > 1.41421353816986083984375f) {
    m = __fmul_rn(m, 0.5f);
    e += 1;
  }
  const float f = __fsub_rn(m, 1.0f);
  const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
  const float z = __fmul_rn(s, s);
  float r = __fadd_rn(0.2857142984867095947265625f, __fmul_rn(z, 0.2222222238779067993164062f));
  r = __fadd_rn(0.4000000059604644775390625f, __fmul_rn(z, r));
  r = __fadd_rn(0.666666686534881591796875f, __fmul_rn(z, r));
  r = __fmul_rn(z, r);
  const float ef = static_cast<float>(e);
  const float tail = __fadd_rn(__fmul_rn(ef, 1.428606765330187045e-06f), __fadd_rn(__fadd_rn(s, s), __fmul_rn(s, r)));
  return __fadd_rn(__fmul_rn(ef, 0.693145751953125f), tail);
}

// exp(d) * 2^40 rounded down, for float32 d <= 0 (d = x - max x): the integer top-p mass.
__device__ __forceinline__ unsigned long long mass_int(float d) {
  float t = __fmul_rn(d, 1.44269502162933349609375f);
  if (!(t >= -64.0f)) t = -64.0f;
  const float n = floorf(t);
  const float r = __fsub_rn(t, n);
  float q = 1.3215486660556053e-06f;
  q = __fadd_rn(1.5252733646775596e-05f, __fmul_rn(r, q));
  q = __fadd_rn(0.0001540352968731895f, __fmul_rn(r, q));
  q = __fadd_rn(0.0013333557872101665f, __fmul_rn(r, q));
  q = __fadd_rn(0.009618128649890423f, __fmul_rn(r, q));
  q = __fadd_rn(0.05550410971045494f, __fmul_rn(r, q));
  q = __fadd_rn(0.24022650718688965f, __fmul_rn(r, q));
  q = __fadd_rn(0.6931471824645996f, __fmul_rn(r, q));
  q = __fadd_rn(1.0f, __fmul_rn(r, q));
  const unsigned long long big_q = static_cast<unsigned long long>(__fmul_rn(q, 8388608.0f));
  const int shift = static_cast<int>(n) + 17;
  return shift >= 0 ? (big_q << shift) : (-shift >= 64 ? 0ull : (big_q >> -shift));
}

// ceil(p * total * (1 - 2^-20)) in float64, at least 1: the mass the nucleus must reach.
__device__ __forceinline__ unsigned long long nucleus_target(float p, unsigned long long total) {
  const double want = __dmul_rn(__dmul_rn(static_cast<double>(p), static_cast<double>(total)), 0.99999904632568359375);
  const unsigned long long target = static_cast<unsigned long long>(ceil(want));
  return target == 0 ? 1ull : target;
}

// x + g as an exact pair: the rounded sum and its rounding error (TwoSum).
struct ExactSum {
  float s, err;
};
__device__ __forceinline__ ExactSum two_sum(float x, float g) {
  const float s = __fadd_rn(x, g);
  const float bb = __fsub_rn(s, x);
  const float err = __fadd_rn(__fsub_rn(x, __fsub_rn(s, bb)), __fsub_rn(g, bb));
  return {s, err};
}

}  // namespace ivg
