// Gather of paged KV blocks out of pinned host memory into a dense device buffer
// (staging.py's gpu_gather strategy; gather_cuda.py launches it through ctypes), and the
// copy-engine way of the same copy at the end of the file (the copy_batch strategy).
//
// Pinned host memory is mapped into the device's address space under UVA, so a pinned
// tensor's data pointer can be loaded from directly: every load below crosses PCIe. The
// block ids live in pinned host memory too, so the host never copies them to the device
// before the launch; each CTA reads the ids of its launch once into shared memory (one
// round trip over the link) and never again.
//
// The work is one flat range of vectors: the keys of every block, then the values. Thread
// t of a CTA takes vectors base + t + j * blockDim (j < UNROLL): all UNROLL loads are issued
// before the first store, so each thread keeps UNROLL requests in flight and consecutive
// threads touch consecutive 16-byte words (whole 128-byte lines per warp). The grid is
// persistent and capped by the caller: it holds an SM slot per CTA for the whole transfer,
// and the SMs left free run the attention of the previous chunk.
//
// The vector is 16 bytes where every pointer, stride and the block size allow it, else the
// widest of 8, 4, 2, 1 bytes that does. Bytes are copied as they are: any dtype and any NaN
// payload arrives bit-exact.
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

namespace {

constexpr int UNROLL = 8;
// Ids per launch (32 KiB of shared memory at most); longer chunks are split into launches.
constexpr long long MAX_IDS = 4096;
constexpr long long MAX_VECTORS = 0x7fffffffLL;  // flat indices stay 32-bit (cheap division)

template <typename T>
__global__ void gather_kv_kernel(const char* __restrict__ k_src, const char* __restrict__ v_src,
                                 char* __restrict__ k_dst, char* __restrict__ v_dst,
                                 const long long* __restrict__ ids, unsigned n, unsigned vpb,
                                 long long k_stride, long long v_stride, long long dst_stride) {
  extern __shared__ long long sid[];
  // The ids: UNROLL loads in flight per thread, so a 4096-id launch costs a few round trips.
  for (unsigned i0 = threadIdx.x; i0 < n; i0 += blockDim.x * UNROLL) {
    long long r[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      unsigned i = i0 + j * blockDim.x;
      r[j] = i < n ? __ldcv(ids + i) : 0;  // the host rewrites ids between launches
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      unsigned i = i0 + j * blockDim.x;
      if (i < n) sid[i] = r[j];
    }
  }
  __syncthreads();

  const unsigned per_tensor = n * vpb;
  const unsigned total = 2u * per_tensor;
  const unsigned step = gridDim.x * blockDim.x * UNROLL;
  for (unsigned base = blockIdx.x * blockDim.x * UNROLL + threadIdx.x; base < total;
       base += step) {
    T r[UNROLL];
    T* dst[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const unsigned idx = base + j * blockDim.x;
      dst[j] = nullptr;
      if (idx < total) {
        const bool is_v = idx >= per_tensor;
        const unsigned local = is_v ? idx - per_tensor : idx;
        const unsigned blk = local / vpb;
        const unsigned off = local - blk * vpb;
        const char* src = (is_v ? v_src : k_src) + sid[blk] * (is_v ? v_stride : k_stride);
        r[j] = __ldcs(reinterpret_cast<const T*>(src) + off);  // read once: stream it
        dst[j] = reinterpret_cast<T*>((is_v ? v_dst : k_dst) + (long long)blk * dst_stride) + off;
      }
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      if (dst[j] != nullptr) *dst[j] = r[j];
    }
  }
}

// The widest vector (16, 8, 4, 2, 1 bytes) that divides every address, stride and size.
int vector_bytes(const void* const* ptrs, int nptrs, const long long* sizes, int nsizes) {
  unsigned long long bits = 0;
  for (int i = 0; i < nptrs; ++i) bits |= reinterpret_cast<uintptr_t>(ptrs[i]);
  for (int i = 0; i < nsizes; ++i) bits |= static_cast<unsigned long long>(sizes[i]);
  for (int w = 16; w > 1; w >>= 1) {
    if ((bits & static_cast<unsigned long long>(w - 1)) == 0) return w;
  }
  return 1;
}

template <typename T>
void launch(const char* k_src, const char* v_src, char* k_dst, char* v_dst,
            const long long* ids, long long n, long long block_bytes, long long k_stride,
            long long v_stride, long long dst_stride, int programs, int threads,
            cudaStream_t stream) {
  const long long vpb = block_bytes / static_cast<long long>(sizeof(T));
  long long group = MAX_VECTORS / (2 * vpb);
  if (group > MAX_IDS) group = MAX_IDS;
  const long long per_cta = static_cast<long long>(threads) * UNROLL;
  for (long long g0 = 0; g0 < n; g0 += group) {
    const long long m = n - g0 < group ? n - g0 : group;
    const long long total = 2 * m * vpb;
    long long grid = (total + per_cta - 1) / per_cta;
    if (grid > programs) grid = programs;
    gather_kv_kernel<T><<<static_cast<unsigned>(grid), threads,
                          static_cast<size_t>(m) * sizeof(long long), stream>>>(
        k_src, v_src, k_dst + g0 * dst_stride, v_dst + g0 * dst_stride, ids + g0,
        static_cast<unsigned>(m), static_cast<unsigned>(vpb), k_stride, v_stride, dst_stride);
  }
}

}  // namespace

extern "C" {

const char* servelab_cuda_error(int e) { return cudaGetErrorString((cudaError_t)e); }

// The vector width paged_gather_kv would use for these arguments (for tests and benchmarks).
int paged_gather_vector_bytes(const void* k_src, const void* v_src, const void* k_dst,
                              const void* v_dst, long long block_bytes, long long k_stride,
                              long long v_stride, long long dst_stride) {
  const void* ptrs[4] = {k_src, v_src, k_dst, v_dst};
  const long long sizes[4] = {block_bytes, k_stride, v_stride, dst_stride};
  return vector_bytes(ptrs, 4, sizes, 4);
}

// Enqueue on `stream`: for i < n, k_dst[i] = k_src[ids[i]] and v_dst[i] = v_src[ids[i]], each
// block `block_bytes` long; strides in bytes. k_src, v_src and ids may be pinned host memory
// (UVA-mapped) or device memory; k_dst, v_dst are device memory. `programs` caps the grid
// (CTAs per launch), `threads` is the CTA size (a multiple of 32, <= 512: the 16-byte kernel
// needs 72 registers a thread). Returns a
// cudaError_t (cudaErrorInvalidValue for arguments out of range).
int paged_gather_kv(const void* k_src, const void* v_src, void* k_dst, void* v_dst,
                    const long long* ids, long long n, long long block_bytes, long long k_stride,
                    long long v_stride, long long dst_stride, int programs, int threads,
                    void* stream) {
  if (n < 0 || block_bytes < 1 || programs < 1 || threads < 32 || threads > 512 ||
      threads % 32 != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (n == 0) return 0;
  const int w = paged_gather_vector_bytes(k_src, v_src, k_dst, v_dst, block_bytes, k_stride,
                                          v_stride, dst_stride);
  if (2 * (block_bytes / w) > MAX_VECTORS) return static_cast<int>(cudaErrorInvalidValue);
  const char* ks = static_cast<const char*>(k_src);
  const char* vs = static_cast<const char*>(v_src);
  char* kd = static_cast<char*>(k_dst);
  char* vd = static_cast<char*>(v_dst);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (w) {
    case 16:
      launch<uint4>(ks, vs, kd, vd, ids, n, block_bytes, k_stride, v_stride, dst_stride,
                    programs, threads, s);
      break;
    case 8:
      launch<uint2>(ks, vs, kd, vd, ids, n, block_bytes, k_stride, v_stride, dst_stride,
                    programs, threads, s);
      break;
    case 4:
      launch<unsigned>(ks, vs, kd, vd, ids, n, block_bytes, k_stride, v_stride, dst_stride,
                       programs, threads, s);
      break;
    case 2:
      launch<unsigned short>(ks, vs, kd, vd, ids, n, block_bytes, k_stride, v_stride,
                             dst_stride, programs, threads, s);
      break;
    default:
      launch<unsigned char>(ks, vs, kd, vd, ids, n, block_bytes, k_stride, v_stride,
                            dst_stride, programs, threads, s);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

// The copy engines' side. Both functions below copy one run of consecutive block ids at a
// time (runs merge only when the blocks are dense in source and destination: strides equal
// to block_bytes), keys and values of each run, for i < n: k_dst[i] = k_src[ids[i]] and
// v_dst[i] = v_src[ids[i]] on `stream`. `ids` is host memory, read during the call; k_src
// and v_src pinned host memory.
//
// paged_copy_batch enqueues the copies in a few cudaMemcpyBatchAsync calls (CUDA 12.8+): the
// staging strategy "copy_batch", ~99 % of the contiguous copy rate over a random table of
// 512 KiB blocks where one cudaMemcpyAsync a block (paged_copy_blocks, kept for the
// benchmarks) runs at ~77 % and the SM gather above at ~91 % (docs/history/
// paged-attention.md, runs 13-16). Returns cudaErrorNotSupported when built against an older runtime. The API refuses
// the legacy default stream: on it (stream 0) the copies go one cudaMemcpyAsync each instead.
namespace {

struct Runs {
  std::vector<void*> dst;
  std::vector<const void*> src;
  std::vector<size_t> bytes;
};

void collect_runs(Runs& r, const char* ks, const char* vs, char* kd, char* vd,
                  const long long* ids, long long n, long long block_bytes, long long k_stride,
                  long long v_stride, long long dst_stride) {
  r.dst.clear();
  r.src.clear();
  r.bytes.clear();
  const bool dense = k_stride == block_bytes && v_stride == block_bytes && dst_stride == block_bytes;
  long long i = 0;
  while (i < n) {
    long long j = i + 1;
    while (dense && j < n && ids[j] == ids[j - 1] + 1) ++j;
    const size_t bytes = static_cast<size_t>((j - i) * block_bytes);
    r.dst.push_back(kd + i * dst_stride);
    r.src.push_back(ks + ids[i] * k_stride);
    r.bytes.push_back(bytes);
    r.dst.push_back(vd + i * dst_stride);
    r.src.push_back(vs + ids[i] * v_stride);
    r.bytes.push_back(bytes);
    i = j;
  }
}

thread_local Runs runs;

}  // namespace

int paged_copy_blocks(const void* k_src, const void* v_src, void* k_dst, void* v_dst,
                      const long long* ids, long long n, long long block_bytes, long long k_stride,
                      long long v_stride, long long dst_stride, void* stream) {
  if (n < 0 || block_bytes < 1) return static_cast<int>(cudaErrorInvalidValue);
  collect_runs(runs, static_cast<const char*>(k_src), static_cast<const char*>(v_src),
               static_cast<char*>(k_dst), static_cast<char*>(v_dst), ids, n, block_bytes,
               k_stride, v_stride, dst_stride);
  for (size_t c = 0; c < runs.dst.size(); ++c) {
    const cudaError_t e = cudaMemcpyAsync(runs.dst[c], runs.src[c], runs.bytes[c],
                                          cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  return 0;
}

int paged_copy_batch(const void* k_src, const void* v_src, void* k_dst, void* v_dst,
                     const long long* ids, long long n, long long block_bytes, long long k_stride,
                     long long v_stride, long long dst_stride, long long first,
                     long long per_batch, void* stream) {
  if (n < 0 || block_bytes < 1 || first < 1 || per_batch < 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (n == 0) return 0;
  if (stream == nullptr) {
    return paged_copy_blocks(k_src, v_src, k_dst, v_dst, ids, n, block_bytes, k_stride, v_stride,
                             dst_stride, stream);
  }
#if CUDART_VERSION >= 12080
  collect_runs(runs, static_cast<const char*>(k_src), static_cast<const char*>(v_src),
               static_cast<char*>(k_dst), static_cast<char*>(v_dst), ids, n, block_bytes,
               k_stride, v_stride, dst_stride);
  cudaMemcpyAttributes attr = {};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // the host rewrites blocks in order
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;   // the attention runs beside it
  // The driver takes ~0.5 us of host time a copy, so one batch of a whole chunk would keep the
  // link idle for its first ~0.1 ms: a small first batch starts the link, and the batches
  // after it double up to per_batch copies, each issued while the link works on the ones
  // before (fewer, larger batches cost less host time a copy).
  const size_t total = runs.dst.size();
  size_t lo = 0, size = static_cast<size_t>(first);
  while (lo < total) {
    const size_t count = size < total - lo ? size : total - lo;
    size_t at = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t e =
        cudaMemcpyBatchAsync(runs.dst.data() + lo, runs.src.data() + lo, runs.bytes.data() + lo,
                             count, &attr, &at, 1, static_cast<cudaStream_t>(stream));
#else
    size_t fail = 0;
    const cudaError_t e = cudaMemcpyBatchAsync(
        runs.dst.data() + lo, const_cast<void**>(runs.src.data() + lo), runs.bytes.data() + lo,
        count, &attr, &at, 1, &fail, static_cast<cudaStream_t>(stream));
#endif
    if (e != cudaSuccess) return static_cast<int>(e);
    lo += count;
    size = 2 * size < static_cast<size_t>(per_batch) ? 2 * size : static_cast<size_t>(per_batch);
  }
  return 0;
#else
  (void)k_src, (void)v_src, (void)k_dst, (void)v_dst, (void)ids, (void)k_stride, (void)v_stride;
  (void)dst_stride, (void)first, (void)per_batch, (void)stream;
  return static_cast<int>(cudaErrorNotSupported);
#endif
}

}  // extern "C"
