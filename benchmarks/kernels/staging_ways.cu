// Experimental staging paths, measured against the library's gather by
// benchmarks/kernels/paged_staging_ways.py (not part of the library):
//
// - tma_gather_kv: each CTA moves pieces of blocks with the Tensor Memory Accelerator's bulk
//   copies, host memory -> shared memory (cp.async.bulk ... mbarrier::complete_tx) and shared
//   memory -> device memory (cp.async.bulk.global.shared::cta), a ring of `stages` pieces a
//   CTA. One thread issues everything; the reads leave the SM as bulk requests instead of
//   one 16-byte load per thread.
// (The copy engines' batch that this file first tried is now the library's copy_batch
// strategy, csrc/paged_gather.cu.)
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int MAX_IDS = 4096;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(unsigned bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar));
}

__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes,
                                          unsigned bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void bulk_store(void* dst, unsigned src, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Unit u of a launch: tensor (K for u < per_tensor), block, piece within the block.
__global__ void tma_gather_kernel(const char* __restrict__ k_src, const char* __restrict__ v_src,
                                  char* __restrict__ k_dst, char* __restrict__ v_dst,
                                  const long long* __restrict__ ids, unsigned n,
                                  unsigned pieces_per_block, unsigned piece, unsigned stages,
                                  long long k_stride, long long v_stride, long long dst_stride) {
  extern __shared__ __align__(128) unsigned char smem[];
  long long* sid = reinterpret_cast<long long*>(smem);
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + MAX_IDS * 8);
  unsigned char* buf = smem + MAX_IDS * 8 + 8 * 16;  // 16 barriers at most; 128-B aligned
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) sid[i] = __ldcv(ids + i);
  if (threadIdx.x == 0) {
    for (unsigned s = 0; s < stages; ++s) mbar_init(smem_addr(bars + s));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x != 0) return;

  const unsigned per_tensor = n * pieces_per_block;
  const unsigned total = 2 * per_tensor;
  // This CTA's units: blockIdx.x, blockIdx.x + gridDim.x, ...
  const unsigned mine = blockIdx.x < total ? (total - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto src_of = [&](unsigned k) -> const char* {
    const unsigned u = blockIdx.x + k * gridDim.x;
    const bool is_v = u >= per_tensor;
    const unsigned local = is_v ? u - per_tensor : u;
    const unsigned blk = local / pieces_per_block, p = local - blk * pieces_per_block;
    return (is_v ? v_src : k_src) + sid[blk] * (is_v ? v_stride : k_stride) +
           static_cast<long long>(p) * piece;
  };
  auto dst_of = [&](unsigned k) -> char* {
    const unsigned u = blockIdx.x + k * gridDim.x;
    const bool is_v = u >= per_tensor;
    const unsigned local = is_v ? u - per_tensor : u;
    const unsigned blk = local / pieces_per_block, p = local - blk * pieces_per_block;
    return (is_v ? v_dst : k_dst) + static_cast<long long>(blk) * dst_stride +
           static_cast<long long>(p) * piece;
  };
  auto load = [&](unsigned k) {
    const unsigned s = k % stages;
    mbar_expect(smem_addr(bars + s), piece);
    bulk_load(smem_addr(buf + static_cast<size_t>(s) * piece), src_of(k), piece,
              smem_addr(bars + s));
  };
  for (unsigned k = 0; k < stages && k < mine; ++k) load(k);
  for (unsigned k = 0; k < mine; ++k) {
    const unsigned s = k % stages;
    mbar_wait(smem_addr(bars + s), (k / stages) & 1u);
    bulk_store(dst_of(k), smem_addr(buf + static_cast<size_t>(s) * piece), piece);
    // The store of unit k - 1 has read its slot once at most one group is pending: refill it.
    if (k >= 1 && k - 1 + stages < mine) {
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      load(k - 1 + stages);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

}  // namespace

extern "C" {

const char* servelab_cuda_error(int e) { return cudaGetErrorString((cudaError_t)e); }

// dst[i] = src[ids[i]] for K and V (blocks of block_bytes; strides in bytes) by bulk copies of
// `piece` bytes, `stages` pieces in flight a CTA, `programs` CTAs. ids: pinned host or device.
int tma_gather_kv(const void* k_src, const void* v_src, void* k_dst, void* v_dst,
                  const long long* ids, long long n, long long block_bytes, long long k_stride,
                  long long v_stride, long long dst_stride, int piece, int stages, int programs,
                  void* stream) {
  if (n < 1 || n > MAX_IDS || piece < 16 || piece % 16 || block_bytes % piece || stages < 2 ||
      stages > 16 || programs < 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const size_t smem = MAX_IDS * 8 + 8 * 16 + static_cast<size_t>(piece) * stages;
  cudaError_t e = cudaFuncSetAttribute(tma_gather_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return static_cast<int>(e);
  tma_gather_kernel<<<programs, 32, smem, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const char*>(k_src), static_cast<const char*>(v_src), static_cast<char*>(k_dst),
      static_cast<char*>(v_dst), ids, static_cast<unsigned>(n),
      static_cast<unsigned>(block_bytes / piece), static_cast<unsigned>(piece),
      static_cast<unsigned>(stages), k_stride, v_stride, dst_stride);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
