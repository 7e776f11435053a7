// Torch launchers: check every tensor, fill the torch-free parameter structs, launch on the current
// stream, and check the launch. Errors are ValueErrors naming the argument.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "ivg_kernels.h"

namespace {

ivg::DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ivg::DType::kFloat32;
    case at::kBFloat16: return ivg::DType::kBFloat16;
    case at::kHalf: return ivg::DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "inputs: dtype ", t.scalar_type(), " is not supported by the CUDA sampler; expected float32, bfloat16 or float16");
  }
  return ivg::DType::kFloat32;
}

// A per-row parameter: a contiguous [N] tensor of `dtype` on `device`, or null for the scalar.
template <typename T>
const T* row_ptr(const c10::optional<at::Tensor>& t, const char* name, int64_t n, const at::Device& device,
                 at::ScalarType dtype, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, name, ": expected a tensor of shape [", n, "], got ",
                    t->sizes());
  TORCH_CHECK_VALUE(t->device() == device, name, ": expected a tensor on ", device, ", got ", t->device());
  keep.push_back(t->to(dtype).contiguous());
  return keep.back().data_ptr<T>();
}

}  // namespace

// Returns (tokens, logprob, logsumexp, input_logprobs, input_logits, ok).
std::vector<at::Tensor> guided_sample_cuda(
    const std::vector<at::Tensor>& inputs, const c10::optional<at::Tensor>& weight_rows,
    const std::vector<double>& weight_vals, const c10::optional<at::Tensor>& temperature, double temperature_val,
    const c10::optional<at::Tensor>& top_k, int64_t top_k_val, const c10::optional<at::Tensor>& top_p,
    double top_p_val, const c10::optional<at::Tensor>& min_p, double min_p_val, const c10::optional<at::Tensor>& seed,
    int64_t seed_val, const c10::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab, bool filter) {
  const int64_t nin = static_cast<int64_t>(inputs.size());
  TORCH_CHECK_VALUE(nin >= 1 && nin <= ivg::kMaxInputs, "inputs: expected 1 to ", ivg::kMaxInputs,
                    " tensors (logits and up to 6 guides), got ", nin);
  const at::Tensor& x0 = inputs[0];
  TORCH_CHECK_VALUE(x0.is_cuda(), "inputs[0]: expected a CUDA tensor, got one on ", x0.device());
  const at::Device device = x0.device();
  const int64_t n = x0.dim() == 2 ? x0.size(0) : -1;
  const ivg::DType dt = dtype_code(x0);
  ivg::SampleParams p{};
  for (int64_t i = 0; i < nin; ++i) {
    const at::Tensor& x = inputs[i];
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == n, "inputs[", i, "]: expected shape [", n, ", V_i], got ",
                      x.sizes());
    TORCH_CHECK_VALUE(x.device() == device, "inputs[", i, "]: expected a tensor on ", device, ", got ", x.device());
    TORCH_CHECK_VALUE(x.scalar_type() == x0.scalar_type(), "inputs[", i, "]: dtype ", x.scalar_type(),
                      " differs from the logits' ", x0.scalar_type(), " (the CUDA sampler needs one dtype)");
    TORCH_CHECK_VALUE(x.stride(1) == 1 || x.size(1) == 1, "inputs[", i, "]: columns must be contiguous");
    TORCH_CHECK_VALUE(vocab >= 1 && vocab <= x.size(1), "vocab_size=", vocab, ": expected 1 to ", x.size(1),
                      " (the width of inputs[", i, "])");
    p.inputs[i] = x.data_ptr();
    p.row_stride[i] = x.stride(0);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(weight_vals.size()) == nin - 1 || weight_rows.has_value(),
                    "weights: expected ", nin - 1, " scalars or a [N, G] tensor, got ", weight_vals.size());
  p.num_inputs = static_cast<int>(nin);
  std::vector<at::Tensor> keep;
  if (weight_rows.has_value() && weight_rows->defined()) {
    const at::Tensor& w = *weight_rows;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == n && w.size(1) == nin - 1, "weight_rows: expected shape [", n,
                      ", ", nin - 1, "], got ", w.sizes());
    TORCH_CHECK_VALUE(w.device() == device, "weight_rows: expected a tensor on ", device);
    keep.push_back(w.to(at::kFloat).contiguous());
    p.weight_rows = keep.back().data_ptr<float>();
    p.weight_row_stride = nin - 1;
  } else {
    for (int64_t i = 0; i + 1 < nin; ++i) p.weight_vals[i] = static_cast<float>(weight_vals[i]);
  }
  p.temperature = row_ptr<float>(temperature, "temperature", n, device, at::kFloat, keep);
  p.temperature_val = static_cast<float>(temperature_val);
  p.top_k = row_ptr<int64_t>(top_k, "top_k", n, device, at::kLong, keep);
  p.top_k_val = top_k_val;
  p.top_p = row_ptr<float>(top_p, "top_p", n, device, at::kFloat, keep);
  p.top_p_val = static_cast<float>(top_p_val);
  p.min_p = row_ptr<float>(min_p, "min_p", n, device, at::kFloat, keep);
  p.min_p_val = static_cast<float>(min_p_val);
  p.seed = row_ptr<int64_t>(seed, "seed", n, device, at::kLong, keep);
  p.seed_val = seed_val;
  p.offset = row_ptr<int64_t>(offset, "offset", n, device, at::kLong, keep);
  p.offset_val = offset_val;
  p.num_rows = n;
  p.vocab = vocab;
  p.filter = filter;

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = x0.options().dtype(at::kFloat);
  at::Tensor workspace = filter ? at::empty({n, vocab}, f32) : at::Tensor();
  at::Tensor tokens = at::empty({n}, x0.options().dtype(at::kLong));
  at::Tensor logprob = at::empty({n}, f32);
  at::Tensor lse = at::empty({n, nin}, f32);
  at::Tensor in_logprobs = at::empty({n, nin}, f32);
  at::Tensor in_logits = at::empty({n, nin}, f32);
  at::Tensor ok = at::empty({n}, x0.options().dtype(at::kBool));
  p.workspace = filter ? workspace.data_ptr<float>() : nullptr;
  p.tokens = tokens.data_ptr<int64_t>();
  p.logprob = logprob.data_ptr<float>();
  p.logsumexp = lse.data_ptr<float>();
  p.input_logprobs = in_logprobs.data_ptr<float>();
  p.input_logits = in_logits.data_ptr<float>();
  p.ok = ok.data_ptr<bool>();
  const cudaError_t err = ivg::launch_guided_sample(p, dt, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "guided_sample CUDA launch failed: ", cudaGetErrorString(err));
  return {tokens, logprob, lse, in_logprobs, in_logits, ok};
}

void copy_blocks_cuda(at::Tensor& pool, const at::Tensor& pairs) {
  TORCH_CHECK_VALUE(pool.is_cuda() && pool.is_contiguous() && pool.dim() >= 3,
                    "pool: expected a contiguous CUDA tensor [planes..., num_blocks, ...] with the block axis at "
                    "dim 2 ([layers, 2, blocks, ...]), got ", pool.sizes(), " on ", pool.device());
  TORCH_CHECK_VALUE(pairs.dim() == 2 && pairs.size(1) == 2 && pairs.scalar_type() == at::kLong,
                    "pairs: expected an int64 tensor [P, 2] of (src, dst) blocks, got ", pairs.sizes(), " ",
                    pairs.scalar_type());
  TORCH_CHECK_VALUE(pairs.device() == pool.device(), "pairs: expected a tensor on ", pool.device());
  const int64_t planes = pool.size(0) * pool.size(1), num_blocks = pool.size(2);
  const int64_t block_bytes = pool.stride(2) * pool.element_size();
  const at::Tensor pc = pairs.contiguous();
  const c10::cuda::CUDAGuard guard(pool.device());
  const cudaError_t err = ivg::launch_copy_blocks(pool.data_ptr(), planes, num_blocks * block_bytes, block_bytes,
                                                  pc.data_ptr<int64_t>(), pc.size(0),
                                                  c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "copy_blocks CUDA launch failed: ", cudaGetErrorString(err));
}
