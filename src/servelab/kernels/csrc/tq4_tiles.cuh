// Device pieces of tq4_decode.cu: MMA and shared-memory wrappers, the value-code
// dequantization, the per-warp ring slot and its copies in and out, the kernel's arguments.
// Included once, by tq4_decode.cu (cuda_ext hashes every .cuh beside the source).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace {

constexpr int TILE = 16;  // tokens per warp step

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ __half2 as_half2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90+; nothing below): wait until the grids this one
// depends on have completed and their writes are visible; let the next grid launch.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// atomicAdd at device scope with acquire-release semantics: the releasing thread's view
// (what a barrier ordered before it included) is published with the count.
__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;"
               : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// 2^x in one MUFU instruction (flushing results below 2^-126 to zero, which softmax weights
// can spare; exp2f adds a range check and a fix-up for them). x = -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A 64-bit shared-memory load (volatile, as lds).
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// The transpose of an 8×8 matrix of 16-bit elements held one fragment register a lane (lane
// 4r + c holds row r, columns 2c and 2c + 1; so does the result, of the transpose).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// A 32-bit shared-memory load at a shared-window byte address. volatile keeps it after the
// barrier that publishes the tables (volatile asm statements keep their order).
__device__ __forceinline__ uint32_t lds(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

// Value codes of two tokens, byte-interleaved (x: low half token a, high half token b, four
// nibbles each), to four fp16x2 registers: coordinates +0..+3, (a, b) per register. The two
// nibble masks come from the kernel's arguments (0x000F000F, 0x00F000F0): read from the
// constant bank, each AND/OR is one LOP3 with no register for a second constant (as
// literals, the compiler re-materialized them with a MOV at every use under register pressure).
__device__ __forceinline__ void value_pairs(uint32_t x, uint32_t lo_mask, uint32_t hi_mask,
                                            uint32_t* out) {
  const __half2 k1024 = __float2half2_rn(1024.0f);
  const __half2 k16th = __float2half2_rn(0.0625f);
  const __half2 km64 = __float2half2_rn(-64.0f);
  uint32_t y = x >> 8;
  out[0] = as_u32(__hsub2(as_half2((x & lo_mask) | 0x64006400u), k1024));
  out[1] = as_u32(__hfma2(as_half2((x & hi_mask) | 0x64006400u), k16th, km64));
  out[2] = as_u32(__hsub2(as_half2((y & lo_mask) | 0x64006400u), k1024));
  out[3] = as_u32(__hfma2(as_half2((y & hi_mask) | 0x64006400u), k16th, km64));
}

template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src) {
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(src), "n"(BYTES));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One warp's ring slot for one 16-token tile. Code bytes are field-major (consecutive lanes
// read consecutive bytes: no bank conflicts) and each lane reads back only the code bytes it
// copied; the tile's 16 key-scale words and 16 (scale, zero) pairs are copied once per warp
// (lanes 0..15 and 16..31) and read by every lane, so the slot is published by __syncwarp.
template <int D>
struct Stage {
  static constexpr int KB = D / 8;   // key bytes per lane and token (a 16-byte copy at D = 128)
  static constexpr int VB = D / 16;  // value bytes per lane and token
  static constexpr int K0 = 0;                  // 2 fields: tokens 8j + g
  static constexpr int V0 = K0 + 2 * 32 * KB;   // 4 fields: tokens 2t, 2t+1, 2t+8, 2t+9
  static constexpr int KS0 = V0 + 4 * 32 * VB;  // 16 words: the aligned word holding a key scale
  static constexpr int SZ0 = KS0 + 16 * 4;      // 16 words: (scale, zero)
  static constexpr int BYTES = SZ0 + 16 * 4;
};

template <int D>
struct Tile {  // 32-bit words per lane and token of a tile's code rows
  static constexpr int KW = D / 32, VW = D / 64;
};

// Byte b (0..3) of x, zero-extended.
__device__ __forceinline__ uint32_t code_byte(uint32_t x, int b) {
  return __byte_perm(x, 0u, 0x4440u + (uint32_t)b);
}

struct Args {
  const void* q; long long sqb, sqh, sqd; int qdtype;  // 0 fp32, 1 fp16, 2 bf16
  const float* rot;  // Πᵀ, fp32 [D][D] row-major: the rotated query is q·Πᵀ
  const uint8_t* kc; long long skb, skh, skt;
  const __half* ks; long long sksb, sksh, skst;
  const uint8_t* vc; long long svb, svh, svt;
  const __half* vsz; long long szb, szh, szt;
  const __half* cent;  // 16 fp16 centroids (√d-scaled), then their 16 fp16 residues
  const int* seq_lens;  // null: every sequence holds `tokens`
  int tokens;
  float* part_o; float* part_l;  // [B·Hq·splits, D], [B·Hq·splits]
  int* counters;  // [B·Hkv], zero between calls: splits finished per (sequence, KV head)
  void* out; long long sob, soh, sod; int odtype;  // 0 fp32, 1 fp16, 2 bf16
  float qk_scale; int split_len; int num_splits; int group;
  uint32_t lo_mask, hi_mask;  // 0x000F000F, 0x00F000F0: set by the launcher (see value_pairs)
  // Value checks (null: off): mapped host words, [0] the call_id of a call whose q held NaN or
  // infinity, [1] of a call whose seq_lens left [1, tokens]. The host reads them without a
  // device synchronization (fused_words_cuda.pending_error).
  int* errors; int call_id;
};

// What one call launches: the kernel's arguments and the launch's shape. The host fills it
// (a ctypes mirror in fused_words_cuda.py, checked against tq4_layout at load).
struct Launch {
  Args a;  // a.num_splits is the grid's split count
  int hkv, batch, head_size, warps, precise, pdl;
  int wide;  // table rows of 256 bytes (16 warps only; tq4_decode.cu, tq4_split_kernel)
};

// Flag a failed value check on the host: a plain store of the call's id (every writer of one
// word in one call writes the same value), made visible to the host past the GPU's caches.
__device__ __forceinline__ void report_error(int* word, int call_id) {
  *reinterpret_cast<volatile int*>(word) = call_id;
  __threadfence_system();
}

__device__ __forceinline__ float load_as_float(const void* p, long long i, int dtype) {
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == 2) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_float(void* p, long long i, int dtype, float x) {
  if (dtype == 1) static_cast<__half*>(p)[i] = __float2half_rn(x);
  else if (dtype == 2) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  else static_cast<float*>(p)[i] = x;
}

// Offsets inside one (sequence, KV head) slice of a plane fit 32 bits (checked on the host),
// so a token's address is one 32-bit multiply-add and one 64-bit add. Tokens past the split's
// end are clamped to its last token (their scores are masked).
template <int D>
__device__ __forceinline__ void issue_tile(const Args& a, const uint8_t* kb, const __half* ksb,
                                           const uint8_t* vb, const __half* szb, int tile0,
                                           int last, int g, int t, int lane, uint32_t st) {
  using S = Stage<D>;
  const unsigned skt = (unsigned)a.skt, svt = (unsigned)a.svt;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const unsigned tok = (unsigned)min(tile0 + 8 * j + g, last);
    cp_async<S::KB>(st + S::K0 + (j * 32 + lane) * S::KB, kb + (tok * skt + S::KB * t));
  }
  const int toks[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned tok = (unsigned)min(tile0 + toks[i], last);
    cp_async<S::VB>(st + S::V0 + (i * 32 + lane) * S::VB, vb + (tok * svt + S::VB * g));
  }
  // Lanes 0..15: the aligned word holding token lane's fp16 key scale (any element stride;
  // never outside the allocation, which is at least 4-byte aligned); lanes 16..31: the
  // (scale, zero) pair of token lane - 16.
  const unsigned tok = (unsigned)min(tile0 + (lane & 15), last);
  const uintptr_t kp = reinterpret_cast<uintptr_t>(ksb + tok * (unsigned)a.skst) & ~uintptr_t(3);
  const uintptr_t zp = reinterpret_cast<uintptr_t>(szb + tok * (unsigned)a.szt);
  cp_async<4>(st + (lane < 16 ? S::KS0 : S::SZ0) + 4 * (lane & 15),
              reinterpret_cast<const void*>(lane < 16 ? kp : zp));
}

// This lane's key-code words of tokens g (kw[0]) and g + 8 (kw[1]) from a ring slot.
template <int D>
__device__ __forceinline__ void read_keys(const uint8_t* st, int lane,
                                          uint32_t (&kw)[2][Tile<D>::KW]) {
  using S = Stage<D>;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint8_t* p = st + S::K0 + (j * 32 + lane) * S::KB;
    if constexpr (Tile<D>::KW == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      kw[j][0] = v.x; kw[j][1] = v.y; kw[j][2] = v.z; kw[j][3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      kw[j][0] = v.x; kw[j][1] = v.y;
    }
  }
}

// Key scales and (scale, zero) pairs of tokens g and g + 8. ks_sel[j] is the byte-permute
// selector that takes token g + 8j's fp16 scale out of its aligned word (which half depends
// only on the lane: tiles start at multiples of 16 tokens, and a clamped token past the end
// is masked anyway).
template <int D>
__device__ __forceinline__ void read_scales(const uint8_t* st, const uint32_t* ks_sel, int g,
                                            float (&ks)[2], uint32_t (&sz)[2]) {
  using S = Stage<D>;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(st + S::KS0 + 4 * (g + 8 * j));
    ks[j] = __half2float(__ushort_as_half((unsigned short)__byte_perm(w, 0u, ks_sel[j])));
    sz[j] = *reinterpret_cast<const uint32_t*>(st + S::SZ0 + 4 * (g + 8 * j));
  }
}

// This lane's value-code words of tokens 2t, 2t + 1, 2t + 8, 2t + 9.
template <int D>
__device__ __forceinline__ void read_values(const uint8_t* st, int lane,
                                            uint32_t (&v)[4][Tile<D>::VW]) {
  using S = Stage<D>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint8_t* p = st + S::V0 + (i * 32 + lane) * S::VB;
    if constexpr (Tile<D>::VW == 2) {
      const uint2 x = *reinterpret_cast<const uint2*>(p);
      v[i][0] = x.x; v[i][1] = x.y;
    } else {
      v[i][0] = *reinterpret_cast<const uint32_t*>(p);
    }
  }
}

}  // namespace
