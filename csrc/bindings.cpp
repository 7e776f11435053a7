// The one bindings file: the Python module of the CUDA kernels (ivg_kernels._C or the JIT build).
#include <torch/extension.h>

void copy_blocks_cuda(at::Tensor& pool, const at::Tensor& pairs);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ivg-kernels CUDA kernels (csrc/)";
  m.def("copy_blocks", &copy_blocks_cuda, "Copy-on-write block copies over every plane of a KV pool");
}
