// Decode attention over TurboQuant 4-bit keys and values (turboquant_4bit_nc) in one launch,
// dequantized straight into the matrix unit's register fragments (mma.sync m16n8k16).
//
// Layout (kvcache.py / packing.py): per (batch, KV head, token) a row of D/2 bytes of key
// codes (low nibble = lower coordinate), an fp16 key scale, a row of D/2 bytes of value codes
// and an fp16 (scale, zero) pair. q is [B, Hq, D] in fp32, fp16 or bf16, any strides.
//
// One CTA per (KV head, split, sequence). It rotates its query rows itself (q·Πᵀ in fp32), its
// warps stream 16-token tiles through per-warp cp.async rings and keep their own online
// softmax, the CTA folds its warps into one partial (out, base-2 LSE) per query head, and the
// last CTA of a (sequence, KV head) to finish merges all its splits into the output.
//
// Scores S = Q·Kᵀ (M = query rows, N = tokens, K = coordinates). The coordinates are summed
// over, so their order inside the MMA is free: a thread (group g, lane-in-group t) loads
// bytes [D/8·t, D/8·t + D/8) of token g's key row (one 16-byte copy at D = 128) and feeds
// them to k-steps in order, with q at the same coordinates. Rows 0..7 of the A operand are q
// in fp16, rows 8..15 its fp16 rounding residue times 2048, so one MMA gives both terms
// (GQA groups up to 8). Keys: one shared-memory load per code byte from a 256-row table of
// fp16 pairs (c[lo nibble], c[hi nibble]) and one from the table of their fp16 residues,
// replicated per lane so no two lanes of a warp share a bank; one byte permute makes the
// address.
//
// Output O^T = V^T·P^T (M = coordinates, N = query rows: p·scale in fp16, then its residue
// times 2048, K = 16 tokens). The P fragments are this lane's own score fragments; the value
// codes of tokens 2t and 2t+1 are byte-interleaved with one byte permute and become exact
// fp16 integers with an AND/OR (0x6400 | n is 1024 + n) and one fp16 subtraction (or an FMA
// for the high nibble); the zero point adds Σ p·zero per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "tq4_tiles.cuh"

namespace {

// Shared memory: [tables: 256 rows of 256 bytes; row v holds, per lane l, (c[v & 15],
// c[v >> 4]) in fp16 at 4l and their fp16 residues at 128 + 4l] [q fragments: KSTEPS × 32 lanes
// × 16 bytes] [q rows: GP × D fp32, then 16/GP partial sums of q·Πᵀ, each GP × D]
// [ring: NW warps × STAGES slots]. The fold and the merge at the end reuse it from the start.
template <int D, int NW, int STAGES, int GP>
struct Smem {
  static constexpr int PARTS = 16 / GP;  // the rotation's inner dimension in PARTS pieces
  static constexpr int TABLES = 256 * 256;
  static constexpr int QF = TABLES;
  static constexpr int QROWS = QF + (D / 16) * 32 * 16;
  static constexpr int RING = QROWS + (1 + PARTS) * GP * D * 4;
  static constexpr int MAIN = RING + NW * STAGES * Stage<D>::BYTES;
  static constexpr int FOLD = (NW * 8 * D + 3 * NW * 8) * 4;
  static constexpr int BYTES = MAIN > FOLD ? MAIN : FOLD;
};

// Splits the fused merge takes (its weights live in shared memory: group × splits floats).
constexpr int MAX_MERGE_SPLITS = 2048;

// GP query rows per KV head (4 or 8; the group is padded to it). Output MMA O^T = V^T·P^T:
// M = coordinates, N = GP rows of p·scale in fp16 then GP rows of its residue × 2048, K = 16
// tokens; the value fragments are the byte-interleaved token pairs of value_pairs, the P
// fragments are the score fragments of this lane's own row (lo rows at GP = 4 from the lane
// 16 places away).
template <int D, int NW, bool PRECISE, int STAGES, int GP>
__global__ void __launch_bounds__(NW * 32, NW >= 16 ? 1 : 2) tq4_split_kernel(const Args a) {
  constexpr int KSTEPS = D / 16;  // k-steps of the score MMA
  constexpr int MT = D / 16;      // m-tiles of the output MMA
  constexpr int NTP = GP / 4;     // n-tiles of the output MMA (hi and lo columns)
  using SM = Smem<D, NW, STAGES, GP>;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ __half cent[32];

  __shared__ int is_last;
  const int hkv = gridDim.x;
  const int kvh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int hq = hkv * a.group;
  const int seq_len = a.seq_lens != nullptr ? a.seq_lens[b] : a.tokens;
  const int start = split * a.split_len;
  const int end = min(start + a.split_len, seq_len);

  const uint8_t* kb = a.kc + b * a.skb + kvh * a.skh;
  const __half* ksb = a.ks + b * a.sksb + kvh * a.sksh;
  const uint8_t* vb = a.vc + b * a.svb + kvh * a.svh;
  const __half* szb = a.vsz + b * a.szb + kvh * a.szh;
  constexpr int STEP = NW * TILE;
  constexpr int SB = Stage<D>::BYTES;
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t ring = base + SM::RING + warp * STAGES * SB;
  const uint8_t* ring_p = smem + SM::RING + warp * STAGES * SB;
  float* qrows = reinterpret_cast<float*>(smem + SM::QROWS);  // [GP][D]
  float* qparts = qrows + GP * D;                             // [PARTS][GP][D]
  const int last = end - 1;
  int tile0 = start + warp * TILE;

  // The query rows' loads go out first, then the first tiles' copies, then the tables.
  for (int i = threadIdx.x; i < GP * D; i += NW * 32) {
    const int r = i / D, c = i % D;
    qrows[i] = r < a.group ? load_as_float(a.q, b * a.sqb + (kvh * a.group + r) * a.sqh +
                                                    c * a.sqd, a.qdtype)
                           : 0.f;
  }
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    const int t0 = tile0 + i * STEP;
    if (t0 < end) issue_tile<D>(a, kb, ksb, vb, szb, t0, last, g, t, lane, ring + i * SB);
    cp_commit();
  }
  if (threadIdx.x < 32) cent[threadIdx.x] = a.cent[threadIdx.x];
  __syncthreads();
  for (int i = threadIdx.x; i < 256 * 32; i += NW * 32) {
    const int v = i >> 5, l = i & 31;
    uint32_t* row = reinterpret_cast<uint32_t*>(smem + v * 256);
    row[l] = as_u32(__halves2half2(cent[v & 15], cent[v >> 4]));
    if (PRECISE) row[32 + l] = as_u32(__halves2half2(cent[16 + (v & 15)], cent[16 + (v >> 4)]));
  }
  // q·Πᵀ in fp32 for the group's rows, Πᵀ read from L2: one item per (piece of the inner
  // dimension, row, column), all its loads in flight at once; the pieces add up below.
  constexpr int PARTS = SM::PARTS, JL = D / PARTS;
  for (int i = threadIdx.x; i < PARTS * a.group * D; i += NW * 32) {
    const int k = i / (a.group * D), rem = i % (a.group * D);
    const int r = rem / D, c = rem % D;
    const float* qr = qrows + r * D + k * JL;
    const float* rp = a.rot + (k * JL) * D + c;
    float acc0 = 0.f;
#pragma unroll
    for (int j = 0; j < JL; ++j) acc0 = fmaf(qr[j], __ldg(rp + j * D), acc0);
    qparts[(k * GP + r) * D + c] = acc0;
  }
  __syncthreads();
  // q fragments of row g, coordinates D/4·t + 4s + {0,1 | 2,3}: q in fp16 for rows 0..7 of
  // the A operand, its residue × 2048 for rows 8..15; one 16-byte read per k-step later.
  if (warp == 0) {
    const bool valid = g < a.group;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (valid) {
#pragma unroll
        for (int k = 0; k < PARTS; ++k) {
          const float4 y =
              *reinterpret_cast<const float4*>(qparts + (k * GP + g) * D + (D / 4) * t + 4 * s);
          x.x += y.x; x.y += y.y; x.z += y.z; x.w += y.w;
        }
      }
      __half2 h01 = __floats2half2_rn(x.x, x.y), h23 = __floats2half2_rn(x.z, x.w);
      float2 f01 = __half22float2(h01), f23 = __half22float2(h23);
      uint4 fr;
      fr.x = as_u32(h01);
      fr.y = pack_half2((x.x - f01.x) * 2048.f, (x.y - f01.y) * 2048.f);
      fr.z = as_u32(h23);
      fr.w = pack_half2((x.z - f23.x) * 2048.f, (x.w - f23.y) * 2048.f);
      *reinterpret_cast<uint4*>(smem + SM::QF + (s * 32 + lane) * 16) = fr;
    }
  }
  __syncthreads();
  const uint8_t* qf = smem + SM::QF + lane * 16;

  float m = -INFINITY, l = 0.f, z = 0.f;
  float acc[MT][NTP][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < NTP; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;

  auto attend = [&](const Tile<D>& cur, const int tile0) {
    // Scores of tokens 8j + 2t + e for rows g (hi) and g + 8 (lo). Four accumulators per
    // n-tile (even and odd k-steps; centroid and residue) keep the MMA chains short.
    float part[2][4][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) part[j][c][0] = part[j][c][1] = part[j][c][2] = part[j][c][3] = 0.f;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
      const uint4 q4 = *reinterpret_cast<const uint4*>(qf + s * 32 * 16);
      const uint32_t qa[4] = {q4.x, q4.y, q4.z, q4.w};
      const int w = s >> 1, h = s & 1;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // byte 2h → b0, byte 2h + 1 → b1; the permute yields 256·byte + 4·lane directly.
        // (One 8-byte load of centroid and residue side by side cost more register moves
        // than the second load it saved.)
        const uint32_t a0 = base + __byte_perm(cur.k[j][w], 4u * lane, 0x5504u + 0x20u * h);
        const uint32_t a1 = base + __byte_perm(cur.k[j][w], 4u * lane, 0x5514u + 0x20u * h);
        mma16816(part[j][h], qa, lds(a0), lds(a1));
        if (PRECISE) mma16816(part[j][2 + h], qa, lds(a0 + 128), lds(a1 + 128));
      }
    }
    float s[4];  // index 2j + e
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float hi = (part[j][0][e] + part[j][1][e]) + (part[j][2][e] + part[j][3][e]);
        const float lo = (part[j][0][2 + e] + part[j][1][2 + e]) + (part[j][2][2 + e] + part[j][3][2 + e]);
        const int tok = tile0 + 8 * j + 2 * t + e;
        float v = (hi + lo * (1.0f / 2048.f)) * cur.ks[2 * j + e] * a.qk_scale;
        v = tok <= last ? v : -INFINITY;
        s[2 * j + e] = v;
        mx = fmaxf(mx, v);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);  // finite: the tile holds at least one token
    const float alpha = exp2f(m - m_new);
    m = m_new;
    if (__any_sync(0xffffffffu, alpha != 1.0f)) {
      // Column c of the output holds row c mod GP, whose alpha lives in lanes 4·row.
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float al = __shfl_sync(0xffffffffu, alpha, ((2 * t + e) % GP) * 4);
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int n = 0; n < NTP; ++n) {
            acc[i][n][e] *= al;
            acc[i][n][2 + e] *= al;
          }
      }
    }
    float lsum = 0.f, zsum = 0.f;
    uint32_t hi2[2], lo2[2];  // this row's p·scale (fp16) and residue × 2048, tile j
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float r[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[2 * j + e] - m_new);
        const float2 sz = __half22float2(as_half2(cur.sz[2 * j + e]));
        lsum += p;
        zsum += p * sz.y;
        r[e] = p * sz.x;
      }
      const __half2 rh = __floats2half2_rn(r[0], r[1]);
      const float2 rf = __half22float2(rh);
      hi2[j] = as_u32(rh);
      lo2[j] = pack_half2((r[0] - rf.x) * 2048.f, (r[1] - rf.y) * 2048.f);
    }
    l = l * alpha + lsum;
    z = z * alpha + zsum;
    uint32_t pb[NTP][2];
    if constexpr (GP == 4) {  // columns 0..3: hi of rows 0..3; 4..7: lo, from lane - 16
      const uint32_t x0 = __shfl_xor_sync(0xffffffffu, lo2[0], 16);
      const uint32_t x1 = __shfl_xor_sync(0xffffffffu, lo2[1], 16);
      pb[0][0] = g < 4 ? hi2[0] : x0;
      pb[0][1] = g < 4 ? hi2[1] : x1;
    } else {
      pb[0][0] = hi2[0]; pb[0][1] = hi2[1];
      pb[NTP - 1][0] = lo2[0]; pb[NTP - 1][1] = lo2[1];
    }
    // m-tile 4u + 2·half + q: rows g and g + 8 are coordinates D/8·g + 8u + 4·half + 2q + {0, 1}.
#pragma unroll
    for (int u = 0; u < Tile<D>::VW; ++u) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t sel = half ? 0x7632u : 0x5410u;
        uint32_t v01[4], v89[4];
        value_pairs(__byte_perm(cur.v[0][u], cur.v[1][u], sel), v01);
        value_pairs(__byte_perm(cur.v[2][u], cur.v[3][u], sel), v89);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const uint32_t av[4] = {v01[2 * q], v01[2 * q + 1], v89[2 * q], v89[2 * q + 1]};
#pragma unroll
          for (int n = 0; n < NTP; ++n)
            mma16816(acc[4 * u + 2 * half + q][n], av, pb[n][0], pb[n][1]);
        }
      }
    }
  };

  uint32_t ks_sel[4];
  {
    const int toks[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uintptr_t addr = reinterpret_cast<uintptr_t>(ksb + (unsigned)toks[i] * (unsigned)a.skst);
      ks_sel[i] = (addr & 2) ? 0x4432u : 0x4410u;
    }
  }
  int slot = 0;
  for (; tile0 < end; tile0 += STEP) {
    const int ahead = tile0 + (STAGES - 1) * STEP;
    const int fill = slot == 0 ? STAGES - 1 : slot - 1;  // the slot attended last time
    __syncwarp();  // every lane is done reading it
    if (ahead < end) issue_tile<D>(a, kb, ksb, vb, szb, ahead, last, g, t, lane, ring + fill * SB);
    cp_commit();
    cp_wait<STAGES - 1>();
    __syncwarp();  // the lanes' copies of this tile are visible to the warp
    Tile<D> cur;
    read_tile<D>(ring_p + slot * SB, ks_sel, t, lane, cur);
    attend(cur, tile0);
    slot = slot == STAGES - 1 ? 0 : slot + 1;
  }
  cp_wait<0>();

  // Fold the four lanes of a row group, then the warps of the CTA (tables are done).
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  z += __shfl_xor_sync(0xffffffffu, z, 1);
  z += __shfl_xor_sync(0xffffffffu, z, 2);
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);  // [NW][8][D], without the zero-point term
  float* sm = so + NW * 8 * D;                 // [NW][8]
  float* sl = sm + NW * 8;                     // [NW][8]
  float* szr = sl + NW * 8;                    // [NW][8]
  // Output column 2t + e is row (2t + e) mod GP, hi part in n-tile 0 (or columns < GP), lo
  // part in n-tile 1 (or the lane two places away, columns ≥ GP).
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v = acc[i][0][c];
      if constexpr (GP == 4) {
        v += __shfl_xor_sync(0xffffffffu, v, 2) * (1.0f / 2048.f);
      } else {
        v += acc[i][NTP - 1][c] * (1.0f / 2048.f);
      }
      const int row = 2 * t + (c & 1);
      const int d = (D / 8) * g + 2 * i + (c >> 1);
      if (row < GP) so[(warp * 8 + row) * D + d] = v;
    }
  }
  if (t == 0) {
    sm[warp * 8 + g] = m;
    sl[warp * 8 + g] = l;
    szr[warp * 8 + g] = z;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.group * D; i += NW * 32) {
    const int row = i / D, d = i % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) mm = fmaxf(mm, sm[w * 8 + row]);
    float o = 0.f, den = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float wt = exp2f(sm[w * 8 + row] - mm);
        o += wt * (so[(w * 8 + row) * D + d] + szr[w * 8 + row]);
        den += wt * sl[w * 8 + row];
      }
    }
    const long long out_row = ((long long)b * hq + kvh * a.group + row) * a.num_splits + split;
    a.part_o[out_row * D + d] = den > 0.f ? o / den : 0.f;
    if (d == 0) a.part_l[out_row] = den > 0.f ? mm + log2f(den) : -INFINITY;
  }

  // The last CTA of this (sequence, KV head) to finish merges every split of its query rows
  // (threadfence reduction: publish the partials, count, and only the last one reads them).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int done = atomicAdd(a.counters + b * hkv + kvh, 1);
    is_last = done == a.num_splits - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int S = a.num_splits;
  float* wts = reinterpret_cast<float*>(smem);  // [group][S] split weights, then [group] sums
  float* wsum = wts + a.group * S;
  const long long row0 = (long long)b * hq + kvh * a.group;
  for (int r = warp; r < a.group; r += NW) {  // one warp per row: max, weights, their sum
    float mm = -INFINITY;
    for (int sp = lane; sp < S; sp += 32) {
      const float v = __ldcg(a.part_l + (row0 + r) * S + sp);
      wts[r * S + sp] = v;
      mm = fmaxf(mm, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
    float sum = 0.f;
    for (int sp = lane; sp < S; sp += 32) {
      const float w = mm == -INFINITY ? 0.f : exp2f(wts[r * S + sp] - mm);
      wts[r * S + sp] = w;
      sum += w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) wsum[r] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.group * D; i += NW * 32) {
    const int r = i / D, d = i % D;
    const float* col = a.part_o + (row0 + r) * S * D + d;
    const float* w = wts + r * S;
    float o = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < S; ++sp) o = fmaf(w[sp], __ldcg(col + (long long)sp * D), o);
    const float den = wsum[r];
    const int h = kvh * a.group + r;
    store_float(a.out, b * a.sob + h * a.soh + d * a.sod, a.odtype, den > 0.f ? o / den : 0.f);
  }
  if (threadIdx.x == 0) a.counters[b * hkv + kvh] = 0;  // ready for the next call
}

template <int D, int NW, bool PRECISE, int GP>
int launch(const Args& a, int hkv, int splits, int batch, cudaStream_t stream) {
  constexpr int STAGES = NW >= 16 ? 3 : 2;  // 16 warps: one CTA per SM; 8: two
  const size_t bytes = Smem<D, NW, STAGES, GP>::BYTES;
  auto kernel = tq4_split_kernel<D, NW, PRECISE, STAGES, GP>;
  static bool attribute_set = false;  // once per instantiation (also keeps graph capture clean)
  if (!attribute_set) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)bytes);
    if (e != cudaSuccess) return (int)e;
    attribute_set = true;
  }
  kernel<<<dim3(hkv, splits, batch), NW * 32, bytes, stream>>>(a);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

const char* servelab_cuda_error(int e) { return cudaGetErrorString((cudaError_t)e); }

// Returns a cudaError_t; 1000 + n for an unsupported configuration n (checked in Python first).
int tq4_decode(const void* q, long long sqb, long long sqh, long long sqd, int qdtype,
               const float* rot, const uint8_t* kc, long long skb, long long skh, long long skt,
               const __half* ks, long long sksb, long long sksh, long long skst,
               const uint8_t* vc, long long svb, long long svh, long long svt,
               const __half* vsz, long long szb, long long szh, long long szt,
               const __half* cent, const int* seq_lens, int tokens, float* part_o,
               float* part_l, int* counters, void* out, long long sob, long long soh,
               long long sod, int odtype, float qk_scale, int split_len, int num_splits,
               int group, int hkv, int batch, int head_size, int warps, int precise,
               void* stream) {
  Args a{q, sqb, sqh, sqd, qdtype, rot, kc, skb, skh, skt, ks, sksb, sksh, skst, vc, svb, svh,
         svt, vsz, szb, szh, szt, cent, seq_lens, tokens, part_o, part_l, counters, out, sob, soh,
         sod, odtype, qk_scale, split_len, num_splits, group};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (group < 1 || group > 8) return 1001;
  if (num_splits > MAX_MERGE_SPLITS) return 1004;
#define SERVELAB_TQ4(Dv, NWv)                                                              \
  if (head_size == Dv && warps == NWv) {                                                    \
    if (group <= 4)                                                                         \
      return precise ? launch<Dv, NWv, true, 4>(a, hkv, num_splits, batch, s)               \
                     : launch<Dv, NWv, false, 4>(a, hkv, num_splits, batch, s);             \
    return precise ? launch<Dv, NWv, true, 8>(a, hkv, num_splits, batch, s)                 \
                   : launch<Dv, NWv, false, 8>(a, hkv, num_splits, batch, s);               \
  }
  SERVELAB_TQ4(128, 8)
  SERVELAB_TQ4(128, 16)
  SERVELAB_TQ4(64, 8)
  SERVELAB_TQ4(64, 16)
#undef SERVELAB_TQ4
  return 1002;
}

}  // extern "C"
