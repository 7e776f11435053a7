// The one bindings file: the Python module of the CUDA kernels (ivg_kernels._C or the JIT build).
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> guided_sample_cuda(
    const std::vector<at::Tensor>& inputs, const c10::optional<at::Tensor>& weight_rows,
    const std::vector<double>& weight_vals, const c10::optional<at::Tensor>& temperature, double temperature_val,
    const c10::optional<at::Tensor>& top_k, int64_t top_k_val, const c10::optional<at::Tensor>& top_p,
    double top_p_val, const c10::optional<at::Tensor>& min_p, double min_p_val, const c10::optional<at::Tensor>& seed,
    int64_t seed_val, const c10::optional<at::Tensor>& offset, int64_t offset_val, int64_t vocab, bool filter);
void copy_blocks_cuda(at::Tensor& pool, const at::Tensor& pairs);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ivg-kernels CUDA kernels (csrc/)";
  m.def("guided_sample", &guided_sample_cuda, "Fused guided sampler, one block per row");
  m.def("copy_blocks", &copy_blocks_cuda, "Copy-on-write block copies over every plane of a KV pool");
}
