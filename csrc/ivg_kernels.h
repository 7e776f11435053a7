// Torch-free interface of the CUDA kernels: plain pointers, a stream, a cudaError_t back.
// The launchers in ops.cpp validate tensors and fill these structs; nothing here includes torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ivg {

constexpr int kMaxInputs = 7;  // the base logits and up to 6 guides

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One call of the guided sampler (semantics: ivg_kernels/reference/sampling.py).
// A per-row pointer that is null means "use the scalar".
struct SampleParams {
  const void* inputs[kMaxInputs];
  int64_t row_stride[kMaxInputs];  // elements between rows; columns are contiguous
  int num_inputs;                  // 1 + G
  const float* weight_rows;        // [N, G] float32, or null
  int64_t weight_row_stride;
  float weight_vals[kMaxInputs - 1];
  const float* temperature; float temperature_val;
  const int64_t* top_k; int64_t top_k_val;
  const float* top_p; float top_p_val;
  const float* min_p; float min_p_val;
  const int64_t* seed; int64_t seed_val;
  const int64_t* offset; int64_t offset_val;
  int64_t num_rows;
  int64_t vocab;    // V: columns used
  bool filter;      // any row may have top-k/top-p/min-p active
  float* workspace; // [N, V] float32 when filter, else may be null
  // Outputs.
  int64_t* tokens;        // [N]
  float* logprob;         // [N]
  float* logsumexp;       // [N, 1+G]
  float* input_logprobs;  // [N, 1+G]
  float* input_logits;    // [N, 1+G]
  bool* ok;               // [N]
};

cudaError_t launch_guided_sample(const SampleParams& p, DType dtype, cudaStream_t stream);

// Copy-on-write block copies on a pool laid out as `planes` planes of `num_blocks` blocks of
// `block_bytes` bytes each (a KVPool's [layers, 2, blocks, ...] tensor): for every pair (src, dst)
// in `pairs` ([P, 2] int64, device memory) and every plane, block dst := block src.
cudaError_t launch_copy_blocks(void* base, int64_t planes, int64_t plane_stride_bytes, int64_t block_bytes,
                               const int64_t* pairs, int64_t num_pairs, cudaStream_t stream);

}  // namespace ivg
