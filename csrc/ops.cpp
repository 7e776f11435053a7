// Torch launchers: check every tensor, fill the torch-free parameter structs, launch on the current
// stream, and check the launch. Errors are ValueErrors naming the argument.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "ivg_kernels.h"

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
