// Fused guided sampler, one thread block per row (semantics: ivg_kernels/reference/sampling.py).
//
// Pass 1 reads every input row [:V] once: each input's online logsumexp, the combined score
// x = (x_0 + sum_i w_i x_i) / T (products and sums rounded separately, as torch does), its max and
// logsumexp, and, when no filter is active on the row, the Gumbel-max winner. A filtered row also
// writes x to a float32 workspace row; then
//   * top-k: the k-th largest x by a 4-digit radix select over the order-preserving uint32 key of x
//     (integer histograms in shared memory: exact and deterministic);
//   * top-p: the largest kept value s with mass(x >= s) >= nucleus_target(p, mass(kept)), by the
//     same radix descent over histograms of the integer masses mass_int(x - max) (portable.cuh:
//     integer sums, so the threshold does not depend on the order of the atomics);
//   * min-p: max x + plog(m);
// and pass 2 over the workspace draws the Gumbel-max over the kept tokens and their logsumexp.
// The Gumbel-max compares exact sums x + g (TwoSum pairs), so ties stay ties at any temperature.
// Every block-level reduction runs in a fixed order, so a row's result is deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

#include "ivg_kernels.h"
#include "philox.cuh"
#include "portable.cuh"

namespace ivg {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T> __device__ __forceinline__ float load_f(const T* p) { return static_cast<float>(*p); }
template <> __device__ __forceinline__ float load_f<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

// float -> uint32 whose unsigned order is the float order (-0 folded onto +0).
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t b = __float_as_uint(x + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

struct MaxSum {
  float m, s;  // running max and sum of exp(x - m)
};
__device__ __forceinline__ void push(MaxSum& a, float x) {
  if (x == -INFINITY) return;
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;  // expf(-inf) = 0 on the first element
    a.m = x;
  } else {
    a.s += expf(x - a.m);
  }
}
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
__device__ __forceinline__ float lse_of(MaxSum a) { return a.m == -INFINITY ? -INFINITY : a.m + logf(a.s); }

struct Best {
  float score, err, x;  // score + err: the exact x + g (err 0 for greedy rows)
  int64_t idx;          // -1: none yet
};
__device__ __forceinline__ bool better(const Best& a, const Best& b) {  // a beats b
  if (b.idx < 0) return a.idx >= 0;
  if (a.idx < 0) return false;
  if (a.score != b.score) return a.score > b.score;
  if (a.err != b.err) return a.err > b.err;
  return a.idx < b.idx;  // ties go to the lowest index
}
__device__ __forceinline__ Best candidate(float x, float g, bool greedy, int64_t v) {
  if (greedy) return {x, 0.f, x, v};
  const ExactSum e = two_sum(x, g);
  return {e.s, e.err, x, v};
}

// Block-wide reductions through shared scratch, in a fixed order (warp tree, then warp 0).
template <typename R, typename F>
__device__ R block_reduce(R v, F op, R* scratch) {
  __syncthreads();  // scratch may still be read from a previous reduction
  scratch[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < kWarps) {
    R acc = scratch[threadIdx.x * 32];
    for (int i = 1; i < 32; ++i) acc = op(acc, scratch[threadIdx.x * 32 + i]);
    scratch[threadIdx.x * 32] = acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    R acc = scratch[0];
    for (int w = 1; w < kWarps; ++w) acc = op(acc, scratch[w * 32]);
    scratch[0] = acc;
  }
  __syncthreads();
  return scratch[0];
}

union Scratch {
  MaxSum ms[kThreads];
  Best best[kThreads];
  unsigned long long u64[kThreads];
  int flag[kThreads];
};

// Radix select over keys of ws[0:V]: the largest key K such that weight(key >= K) >= target, where
// weight is a count (MASS=false) or the fixed-point mass (MASS=true), restricted to x >= floor.
template <bool MASS>
__device__ uint32_t radix_descend(const float* ws, int64_t V, float floor, float xmax, unsigned long long target,
                                  unsigned long long* hist, uint32_t* shared_sel, unsigned long long* shared_above) {
  uint32_t prefix = 0, mask = 0;
  if (threadIdx.x == 0) *shared_above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kThreads) hist[d] = 0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const float x = ws[v];
      if (!(x >= floor)) continue;
      const uint32_t key = float_key(x);
      if ((key & mask) != prefix) continue;
      unsigned long long w = 1;
      if (MASS) w = mass_int(__fsub_rn(x, xmax));
      if (w) atomicAdd(&hist[(key >> shift) & 255u], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long acc = *shared_above;
      int sel = 0;
      for (int d = 255; d >= 0; --d) {
        if (acc + hist[d] >= target) {
          sel = d;
          break;
        }
        acc += hist[d];
      }
      *shared_above = acc;
      *shared_sel = static_cast<uint32_t>(sel);
    }
    __syncthreads();
    prefix |= *shared_sel << shift;
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) guided_sample_kernel(const SampleParams p) {
  __shared__ Scratch scratch;
  __shared__ unsigned long long hist[256];
  __shared__ uint32_t shared_sel;
  __shared__ unsigned long long shared_above;

  const int64_t row = blockIdx.x;
  const int64_t V = p.vocab;
  const int nin = p.num_inputs;

  float w[kMaxInputs - 1];
#pragma unroll
  for (int i = 0; i < kMaxInputs - 1; ++i)
    w[i] = (i < nin - 1) ? (p.weight_rows ? p.weight_rows[row * p.weight_row_stride + i] : p.weight_vals[i]) : 0.f;
  const float t = p.temperature ? p.temperature[row] : p.temperature_val;
  const int64_t top_k = p.top_k ? p.top_k[row] : p.top_k_val;
  const float top_p = p.top_p ? p.top_p[row] : p.top_p_val;
  const float min_p = p.min_p ? p.min_p[row] : p.min_p_val;
  const int64_t seed = p.seed ? p.seed[row] : p.seed_val;
  const int64_t offset = p.offset ? p.offset[row] : p.offset_val;
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const uint32_t o0 = static_cast<uint32_t>(static_cast<uint64_t>(offset));
  const uint32_t o1 = static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32);

  const bool greedy = t == 0.f;
  const float tdiv = greedy ? 1.f : t;
  const bool k_on = top_k > 0 && top_k < V;
  const bool params_ok = !(isnan(t) || t < 0.f || isnan(top_p) || top_p <= 0.f || top_p > 1.f || isnan(min_p) ||
                           min_p < 0.f || min_p > 1.f);
  const bool row_filter = p.filter && !greedy && (k_on || top_p < 1.f || min_p > 0.f);
  float* ws = row_filter ? p.workspace + row * V : nullptr;

  const T* in[kMaxInputs];
#pragma unroll
  for (int i = 0; i < kMaxInputs; ++i)
    in[i] = (i < nin) ? static_cast<const T*>(p.inputs[i]) + row * p.row_stride[i] : nullptr;

  // Pass 1.
  MaxSum stats[kMaxInputs];
#pragma unroll
  for (int i = 0; i < kMaxInputs; ++i) stats[i] = {-INFINITY, 0.f};
  MaxSum xs = {-INFINITY, 0.f};
  Best best = {-INFINITY, 0.f, -INFINITY, -1};
  int bad = 0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    float z = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxInputs; ++i) {
      if (i < nin) {
        const float xi = load_f(in[i] + v);
        bad |= isnan(xi) || xi == INFINITY;
        push(stats[i], xi);
        z = (i == 0) ? xi : __fadd_rn(z, __fmul_rn(w[i - 1], xi));
      }
    }
    const float x = __fdiv_rn(z, tdiv);
    bad |= isnan(x) || x == INFINITY;
    push(xs, x);
    if (row_filter) {
      ws[v] = x;
    } else {
      const Best c = candidate(x, greedy ? 0.f : gumbel(static_cast<uint64_t>(v), o0, o1, k0, k1), greedy, v);
      if (better(c, best)) best = c;
    }
  }
  bad = block_reduce(bad, [](int a, int b) { return a | b; }, scratch.flag);
  MaxSum in_stats[kMaxInputs];
#pragma unroll
  for (int i = 0; i < kMaxInputs; ++i)
    if (i < nin) in_stats[i] = block_reduce(stats[i], merge, scratch.ms);
  xs = block_reduce(xs, merge, scratch.ms);
  const bool ok = !bad && params_ok && xs.m > -INFINITY;

  float log_kept = logf(xs.s);  // logsumexp of the kept x - max x
  if (row_filter && ok) {
    __syncthreads();  // workspace writes of pass 1 visible to the whole block
    float tau = -INFINITY, tau_k = -INFINITY;
    if (k_on)
      tau_k = key_float(radix_descend<false>(ws, V, -INFINITY, xs.m, static_cast<unsigned long long>(top_k), hist,
                                             &shared_sel, &shared_above));
    tau = tau_k;
    if (top_p < 1.f) {
      unsigned long long total = 0;
      for (int64_t v = threadIdx.x; v < V; v += kThreads) {
        const float x = ws[v];
        if (x >= tau_k) total += mass_int(__fsub_rn(x, xs.m));
      }
      total = block_reduce(total, [](unsigned long long a, unsigned long long b) { return a + b; }, scratch.u64);
      const unsigned long long target = nucleus_target(top_p, total);
      const float tau_p = key_float(radix_descend<true>(ws, V, tau_k, xs.m, target, hist, &shared_sel, &shared_above));
      tau = fmaxf(tau, tau_p);
    }
    if (min_p > 0.f) tau = fmaxf(tau, __fadd_rn(xs.m, plog(fmaxf(min_p, 1.17549435082228750797e-38f))));

    // Pass 2: Gumbel-max and logsumexp over the kept tokens.
    MaxSum kept = {-INFINITY, 0.f};
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const float x = ws[v];
      if (!(x >= tau)) continue;
      push(kept, x);
      const Best c = candidate(x, gumbel(static_cast<uint64_t>(v), o0, o1, k0, k1), false, v);
      if (better(c, best)) best = c;
    }
    kept = block_reduce(kept, merge, scratch.ms);
    log_kept = logf(kept.s) + (kept.m - xs.m);  // kept.m == xs.m: the maximum is always kept
  }
  best = block_reduce(best, [](Best a, Best b) { return better(b, a) ? b : a; }, scratch.best);

  const int64_t tok = best.idx;
  const int width = nin;
  // Every thread holds the reduced in_stats; thread i < nin writes input i's values.
#pragma unroll
  for (int i = 0; i < kMaxInputs; ++i) {
    if (i < nin && threadIdx.x == i) {
      const float lse_i = lse_of(in_stats[i]);
      const int64_t o = row * width + i;
      if (ok) {
        const float xi = load_f(in[i] + tok);
        p.logsumexp[o] = lse_i;
        p.input_logits[o] = xi;
        p.input_logprobs[o] = xi - lse_i;
      } else {
        p.logsumexp[o] = NAN;
        p.input_logits[o] = NAN;
        p.input_logprobs[o] = NAN;
      }
    }
  }
  if (threadIdx.x == 0) {
    p.ok[row] = ok;
    p.tokens[row] = ok ? tok : -1;
    p.logprob[row] = ok ? (greedy ? 0.f : (best.x - xs.m) - log_kept) : NAN;
  }
}

}  // namespace

cudaError_t launch_guided_sample(const SampleParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.num_inputs < 1 || p.num_inputs > kMaxInputs || p.vocab < 1) return cudaErrorInvalidValue;
  if (p.filter && p.workspace == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.num_rows)), block(kThreads);
  switch (dtype) {
    case DType::kFloat32: guided_sample_kernel<float><<<grid, block, 0, stream>>>(p); break;
    case DType::kBFloat16: guided_sample_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(p); break;
    case DType::kFloat16: guided_sample_kernel<__half><<<grid, block, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace ivg
