// Copy-on-write block copies for every plane (layer x {K, V}) of a paged KV pool in one launch.
// Grid: (pairs, planes); each block copies one block of one plane, 16 bytes per thread and step
// when the block size and the base address allow it.
#include <cstdint>

#include "ivg_kernels.h"

namespace ivg {
namespace {

template <typename Word>
__global__ void copy_blocks_kernel(char* base, int64_t plane_stride_bytes, int64_t block_bytes,
                                   const int64_t* pairs) {
  const int64_t pair = blockIdx.x, plane = blockIdx.y;
  const int64_t src = pairs[2 * pair], dst = pairs[2 * pair + 1];
  char* plane_base = base + plane * plane_stride_bytes;
  const Word* s = reinterpret_cast<const Word*>(plane_base + src * block_bytes);
  Word* d = reinterpret_cast<Word*>(plane_base + dst * block_bytes);
  const int64_t words = block_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) d[i] = s[i];
}

}  // namespace

cudaError_t launch_copy_blocks(void* base, int64_t planes, int64_t plane_stride_bytes, int64_t block_bytes,
                               const int64_t* pairs, int64_t num_pairs, cudaStream_t stream) {
  if (num_pairs == 0 || planes == 0) return cudaSuccess;
  if (num_pairs < 0 || planes < 0 || block_bytes <= 0 || planes > 65535 || num_pairs > 2147483647LL)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(planes));
  const bool wide = block_bytes % 16 == 0 && plane_stride_bytes % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(base) % 16 == 0;
  char* b = static_cast<char*>(base);
  if (wide)
    copy_blocks_kernel<uint4><<<grid, 256, 0, stream>>>(b, plane_stride_bytes, block_bytes, pairs);
  else
    copy_blocks_kernel<char><<<grid, 256, 0, stream>>>(b, plane_stride_bytes, block_bytes, pairs);
  return cudaGetLastError();
}

}  // namespace ivg
