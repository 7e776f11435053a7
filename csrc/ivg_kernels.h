// Torch-free interface of the CUDA kernels: plain pointers, a stream, a cudaError_t back.
// The launchers in ops.cpp validate tensors and fill these structs; nothing here includes torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ivg {

// Copy-on-write block copies on a pool laid out as `planes` planes of `num_blocks` blocks of
// `block_bytes` bytes each (a KVPool's [layers, 2, blocks, ...] tensor): for every pair (src, dst)
// in `pairs` ([P, 2] int64, device memory) and every plane, block dst := block src.
cudaError_t launch_copy_blocks(void* base, int64_t planes, int64_t plane_stride_bytes, int64_t block_bytes,
                               const int64_t* pairs, int64_t num_pairs, cudaStream_t stream);

}  // namespace ivg
