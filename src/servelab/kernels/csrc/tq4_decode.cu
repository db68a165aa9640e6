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
// Scores Sᵀ = K·Qᵀ (M = 16 tokens, N = 8 query columns, K = coordinates). The coordinates are
// summed over, so their order inside the MMA is free: a thread (group g, lane-in-group t)
// loads bytes [D/8·t, D/8·t + D/8) of the key rows of tokens g and g + 8 (one 16-byte copy
// each at D = 128) and feeds them to k-steps in order, with q at the same coordinates. Keys:
// one shared-memory load per code byte from a 256-row table of fp16 pairs (c[lo nibble],
// c[hi nibble]) and one from the table of their fp16 residues, replicated per lane so no two
// lanes of a warp share a bank; one byte permute makes the address. Query columns come in
// pairs: column 2h is head h in fp16, column 2h + 1 its rounding residue times 2048, so a lane
// (g, t) ends a tile holding both terms of head t's scores for tokens g and g + 8 (four heads
// an n-tile; GQA groups up to 8 take two).
//
// Output O^T = V^T·P^T (M = coordinates, N = the same column pairs: p·scale in fp16 and its
// residue times 2048, K = 16 tokens). Each lane packs its own (p·scale, residue) of tokens g
// and g + 8 into the C layout of P (16 tokens × 8 columns), and one 8×8 transpose (movmatrix)
// per half turns that into the B fragment of P^T; the value codes of tokens 2t and 2t+1 are
// byte-interleaved with one byte permute and become exact fp16 integers with an AND/OR (0x6400
// | n is 1024 + n) and one fp16 subtraction (or an FMA for the high nibble); the zero point
// adds Σ p·zero per head. Every accumulator of a lane belongs to its own heads, so the online
// softmax rescales without shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tq4_tiles.cuh"

namespace {

// Shared memory: [tables: 256 rows of ROW bytes (128, or 256 in the wide layout, whose second
// half is unused); row v holds (c[v & 15], c[v >> 4]) in fp16 and (precise) their fp16
// residues, one copy per lane or per half-warp lane in its first 128 bytes] [q fragments: KSTEPS × NQ
// n-tiles × 32 lanes × 8 bytes] [q rows: GP × D fp32, then PARTS partial products q·Πᵀ, each
// GP × D] [ring: NW warps × STAGES slots]. The fold at the end reuses it from the start.
template <int D, int NW, int STAGES, int GP, int ROW>
struct Smem {
  static constexpr int NQ = GP / 4;  // n-tiles of query columns (four heads each)
  // The rotation's inner dimension in PARTS pieces: one (piece, column) item a thread.
  static constexpr int PARTS = NW * 32 / D;
  static constexpr int TABLES = 256 * ROW;
  static constexpr int QF = TABLES;
  static constexpr int QROWS = QF + (D / 16) * NQ * 32 * 8;
  static constexpr int RING = QROWS + (1 + PARTS) * GP * D * 4;
  static constexpr int MAIN = RING + NW * STAGES * Stage<D>::BYTES;
  static constexpr int FOLD = (NW * 8 * D + NW * 8) * 4;
  static constexpr int BYTES = MAIN > FOLD ? MAIN : FOLD;
};

// The fused merge takes the splits in batches of this many loads in flight per thread.
constexpr int MERGE_BATCH = 16;

// GP query heads per KV head (4 or 8; the group is padded to it), NQ = GP/4 n-tiles of query
// columns: column 2h of n-tile n is head 4n + h (fp16), column 2h + 1 its residue × 2048. A lane
// (g, t) owns head 4n + t of every n-tile: its scores (tokens g and g + 8 of a tile), its
// online-softmax state and its output accumulators.
//
// ROW (the table's row stride, 128 or 256 bytes): at 256 a lookup's address is one byte
// permute (the code byte above this lane's column byte) added to the table's base in the
// load itself (LDS [R + UR]); at 128 it takes a permute and a shift-add. The wide table
// takes 64 KB of shared memory, so only at 16 warps (one CTA per multiprocessor).
template <int D, int NW, bool PRECISE, int STAGES, int GP, int ROW>
__global__ void __launch_bounds__(NW * 32, NW >= 16 ? 1 : 2) tq4_split_kernel(const Args a) {
  constexpr int KSTEPS = D / 16;  // k-steps of the score MMA
  constexpr int MT = D / 16;      // m-tiles of the output MMA
  static_assert(ROW == 128 || ROW == 256, "table rows of 128 or 256 bytes");
  using SM = Smem<D, NW, STAGES, GP, ROW>;
  constexpr int NQ = SM::NQ;
  extern __shared__ __align__(16) uint8_t smem[];

  __shared__ int is_last;
  const int hkv = gridDim.x;
  const int kvh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int hq = hkv * a.group;
  // Launched with programmatic dependent launch (sm_90+): this grid may start while the
  // previous kernel on the stream is still finishing, so nothing in global memory is read
  // before that kernel has completed and its writes are visible.
  grid_dependency_wait();
  int seq_len = a.seq_lens != nullptr ? a.seq_lens[b] : a.tokens;
  if (seq_len < 1 || seq_len > a.tokens) {  // never read past the planes; flag it if checking
    if (a.errors != nullptr && split == 0 && kvh == 0 && threadIdx.x == 0)
      report_error(a.errors + 1, a.call_id);
    seq_len = min(max(seq_len, 0), a.tokens);  // an empty sequence's output is 0
  }
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

  // The small loads first, all in flight at once: this thread's column of Πᵀ for the
  // rotation below (one (piece of the inner dimension, column) item a thread), the query
  // rows, the centroids. The first tile's copies go out only once they have landed, the
  // next tiles' once the tables and the query fragments are built: queued behind the whole
  // GPU's copies, a cold fetch of Πᵀ took microseconds, and the copies' issue held up the
  // shared-memory work (per-CTA timeline on an H100, 2026-11-26: the prologue took 7.5–10
  // µs with every copy first, 4.5–8 with the small loads first).
  constexpr int PARTS = SM::PARTS, JL = D / PARTS;
  static_assert(PARTS * D == NW * 32, "one rotation item a thread");
  const int rk = threadIdx.x / D, rc = threadIdx.x % D;
  float rv[JL];
#pragma unroll
  for (int j = 0; j < JL; ++j) rv[j] = __ldg(a.rot + (rk * JL + j) * D + rc);
  constexpr int QPT = (GP * D + NW * 32 - 1) / (NW * 32);  // query elements a thread
  float qv[QPT];
#pragma unroll
  for (int k = 0; k < QPT; ++k) {
    const int i = threadIdx.x + k * NW * 32, r = i / D, c = i % D;
    qv[k] = i < GP * D && r < a.group
                ? load_as_float(a.q, b * a.sqb + (kvh * a.group + r) * a.sqh + c * a.sqd, a.qdtype)
                : 0.f;
  }
  // Table rows of 128 bytes. Precise: (centroid pair, residue pair) at 8·(lane mod 16), one
  // 8-byte load for both (a 64-bit load is served a half-warp at a time, so 16 copies keep
  // the banks apart); fast: the centroid pair at 4·lane. Every copy of an entry is the same,
  // so the copies of two (four) lanes are one 16-byte store. Built while the loads above are
  // in flight (its centroids come from L1).
  for (int i = threadIdx.x; i < 256 * 8; i += NW * 32) {
    const int v = i >> 3, l4 = i & 7;
    uint4* row = reinterpret_cast<uint4*>(smem + v * ROW);
    const uint32_t c = as_u32(__halves2half2(__ldg(a.cent + (v & 15)), __ldg(a.cent + (v >> 4))));
    if (PRECISE) {
      const uint32_t r = as_u32(__halves2half2(__ldg(a.cent + 16 + (v & 15)), __ldg(a.cent + 16 + (v >> 4))));
      row[l4] = make_uint4(c, r, c, r);
    } else {
      row[l4] = make_uint4(c, c, c, c);
    }
  }
#pragma unroll
  for (int k = 0; k < QPT; ++k)
    if (threadIdx.x + k * NW * 32 < GP * D) qrows[threadIdx.x + k * NW * 32] = qv[k];
  if (a.errors != nullptr && split == 0) {  // each query row is checked by one CTA
    bool bad = false;
#pragma unroll
    for (int k = 0; k < QPT; ++k) bad |= !isfinite(qv[k]);  // padding rows hold 0
    if (bad) report_error(a.errors, a.call_id);
  }
#pragma unroll
  for (int j = 0; j < JL; ++j) asm volatile("" ::"f"(rv[j]));  // landed (volatile: in order)
  asm volatile("" ::: "memory");  // and the query rows' stores, which wait for their loads
  if (tile0 < end) issue_tile<D>(a, kb, ksb, vb, szb, tile0, last, g, t, lane, ring);
  cp_commit();
  __syncthreads();
  // q·Πᵀ in fp32, Πᵀ read from L2 once per CTA, every row of the group from each load; the
  // pieces add up below.
#pragma unroll
  for (int r = 0; r < GP; ++r) {
    const float4* qr = reinterpret_cast<const float4*>(qrows + r * D + rk * JL);
    float acc0 = 0.f;
#pragma unroll
    for (int j = 0; j < JL / 4; ++j) {
      const float4 x = qr[j];
      acc0 = fmaf(x.x, rv[4 * j], acc0);
      acc0 = fmaf(x.y, rv[4 * j + 1], acc0);
      acc0 = fmaf(x.z, rv[4 * j + 2], acc0);
      acc0 = fmaf(x.w, rv[4 * j + 3], acc0);
    }
    qparts[(rk * GP + r) * D + rc] = acc0;
  }
  __syncthreads();
  // B fragments of the query columns: lane (g, t) of n-tile n holds head 4n + g/2 (fp16 if g
  // is even, its residue × 2048 if odd) at coordinates D/4·t + 4s + {0,1} (b0) and {2,3} (b1)
  // of k-step s; one 8-byte read per k-step and n-tile later.
  for (int i = threadIdx.x; i < KSTEPS * NQ * 32; i += NW * 32) {
    const int s = i / (NQ * 32), n = (i / 32) % NQ, ln = i % 32;
    const int gg = ln >> 2, tt = ln & 3;
    const int r = 4 * n + (gg >> 1);
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < a.group) {
#pragma unroll
      for (int k = 0; k < PARTS; ++k) {
        const float4 y =
            *reinterpret_cast<const float4*>(qparts + (k * GP + r) * D + (D / 4) * tt + 4 * s);
        x.x += y.x; x.y += y.y; x.z += y.z; x.w += y.w;
      }
    }
    const __half2 h01 = __floats2half2_rn(x.x, x.y), h23 = __floats2half2_rn(x.z, x.w);
    uint2 fr;
    if (gg & 1) {
      const float2 f01 = __half22float2(h01), f23 = __half22float2(h23);
      fr.x = pack_half2((x.x - f01.x) * 2048.f, (x.y - f01.y) * 2048.f);
      fr.y = pack_half2((x.z - f23.x) * 2048.f, (x.w - f23.y) * 2048.f);
    } else {
      fr.x = as_u32(h01);
      fr.y = as_u32(h23);
    }
    *reinterpret_cast<uint2*>(smem + SM::QF + i * 8) = fr;
  }
#pragma unroll
  for (int i = 1; i < STAGES - 1; ++i) {
    const int t0 = tile0 + i * STEP;
    if (t0 < end) issue_tile<D>(a, kb, ksb, vb, szb, t0, last, g, t, lane, ring + i * SB);
    cp_commit();
  }
  __syncthreads();
  const uint8_t* qf = smem + SM::QF + lane * 8;

  float m[NQ], l[NQ], z[NQ];
  float acc[MT][NQ][4];
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    m[n] = -INFINITY;
    l[n] = z[n] = 0.f;
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;
  }

  // Phase A of a tile: its scores (head 4n + t, tokens g and g + 8) into part, from the key
  // codes in ring slot st. Precise: one MMA per 8 tokens, rows g of the A operand the token's
  // centroid pairs and rows g + 8 their residues (one 8-byte table load fills both), so C
  // holds (centroid · q, centroid · q residue, residue · q, residue · q residue). Fast: one MMA
  // per 16 tokens, rows g and g + 8 the two tokens' centroids. Independent accumulators keep
  // the MMA chains short (even and odd k-steps at one n-tile; two n-tiles interleave by
  // themselves, and their registers are needed elsewhere).
  constexpr int EO = NQ == 1 ? 2 : 1;
  using Part = float[NQ][2 * EO][4];
  const uint32_t col = PRECISE ? 8u * (lane & 15) : 4u * lane;  // this lane's column (< 128)
  const uint32_t tab = base + col;
  // The table entry of byte b (0..3) of x for this lane: ROW 256, base + (x.b << 8 | col) by
  // one byte permute (col's byte 1 is 0, so bytes 2 and 3 are too); ROW 128, tab + 128·x.b.
  auto entry = [&](uint32_t x, int b) -> uint32_t {
    if constexpr (ROW == 256) return base + __byte_perm(x, col, 0x5504u | ((uint32_t)b << 4));
    else return tab + 128u * code_byte(x, b);
  };
  auto scores = [&](const uint8_t* st, Part& part) {
    uint32_t kw[2][Tile<D>::KW];
    read_keys<D>(st, lane, kw);
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int c = 0; c < 2 * EO; ++c) part[n][c][0] = part[n][c][1] = part[n][c][2] = part[n][c][3] = 0.f;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
      const int w = s >> 1, h = s & 1, eo = EO == 2 ? h : 0;
      // byte 2h → k pair 2t, byte 2h + 1 → k pair 2t + 8; token g (j = 0) and g + 8 (j = 1).
      uint2 qb[NQ];
#pragma unroll
      for (int n = 0; n < NQ; ++n) qb[n] = *reinterpret_cast<const uint2*>(qf + (s * NQ + n) * 256);
      if constexpr (PRECISE) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const uint2 x = lds64(entry(kw[j][w], 2 * h));
          const uint2 y = lds64(entry(kw[j][w], 2 * h + 1));
          const uint32_t ka[4] = {x.x, x.y, y.x, y.y};
#pragma unroll
          for (int n = 0; n < NQ; ++n) mma16816(part[n][j * EO + eo], ka, qb[n].x, qb[n].y);
        }
      } else {
        const uint32_t ka[4] = {lds(entry(kw[0][w], 2 * h)), lds(entry(kw[1][w], 2 * h)),
                                lds(entry(kw[0][w], 2 * h + 1)), lds(entry(kw[1][w], 2 * h + 1))};
#pragma unroll
        for (int n = 0; n < NQ; ++n) mma16816(part[n][eo], ka, qb[n].x, qb[n].y);
      }
    }
  };

  uint32_t ks_sel[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(ksb + (unsigned)(g + 8 * j) * (unsigned)a.skst);
    ks_sel[j] = (addr & 2) ? 0x4432u : 0x4410u;
  }

  // Phase B of a tile: the online softmax of its scores and the output MMAs, from the scales
  // and value codes in ring slot st.
  auto consume = [&](const uint8_t* st, const Part& part, const int tile0) {
    float ks[2];
    uint32_t szw[2];
    read_scales<D>(st, ks_sel, g, ks, szw);
    const float2 sz0 = __half22float2(as_half2(szw[0]));
    const float2 sz1 = __half22float2(as_half2(szw[1]));
    const bool ok0 = tile0 + g <= last, ok1 = tile0 + 8 + g <= last;
    uint32_t pb[NQ][2];  // B fragments of P^T: tokens 2t, 2t + 1 | 2t + 8, 2t + 9 of column g
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
      float hi0, lo0, hi1, lo1;  // q and q-residue terms of tokens g and g + 8
      if constexpr (PRECISE) {
        float c[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            c[j][e] = EO == 2 ? part[n][2 * j][e] + part[n][2 * j + 1][e] : part[n][j][e];
        hi0 = c[0][0] + c[0][2]; lo0 = c[0][1] + c[0][3];
        hi1 = c[1][0] + c[1][2]; lo1 = c[1][1] + c[1][3];
      } else {
        float c[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) c[e] = EO == 2 ? part[n][0][e] + part[n][1][e] : part[n][0][e];
        hi0 = c[0]; lo0 = c[1]; hi1 = c[2]; lo1 = c[3];
      }
      const float s0 = ok0 ? (hi0 + lo0 * (1.0f / 2048.f)) * ks[0] * a.qk_scale : -INFINITY;
      const float s1 = ok1 ? (hi1 + lo1 * (1.0f / 2048.f)) * ks[1] * a.qk_scale : -INFINITY;
      float mx = fmaxf(s0, s1);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m[n], mx);  // finite: the tile holds at least one token
      const float alpha = fast_exp2(m[n] - m_new);
      m[n] = m_new;
      if (alpha != 1.0f) {  // this lane's accumulators are all head 4n + t's
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][n][e] *= alpha;
      }
      const float p0 = fast_exp2(s0 - m_new), p1 = fast_exp2(s1 - m_new);
      l[n] = l[n] * alpha + (p0 + p1);
      z[n] = z[n] * alpha + fmaf(p0, sz0.y, p1 * sz1.y);
      const float r0 = p0 * sz0.x, r1 = p1 * sz1.x;
      const __half h0 = __float2half_rn(r0), h1 = __float2half_rn(r1);
      // P in the C layout (token g or g + 8, columns 2t and 2t + 1), then transposed into the
      // B fragment of P^T (tokens 2t, 2t + 1 | 2t + 8, 2t + 9 of column g).
      const uint32_t pk0 = as_u32(__halves2half2(h0, __float2half_rn((r0 - __half2float(h0)) * 2048.f)));
      const uint32_t pk1 = as_u32(__halves2half2(h1, __float2half_rn((r1 - __half2float(h1)) * 2048.f)));
      pb[n][0] = transpose8x8(pk0);
      pb[n][1] = transpose8x8(pk1);
    }
    uint32_t v[4][Tile<D>::VW];
    read_values<D>(st, lane, v);
    // m-tile 4u + 2·half + q: rows g and g + 8 are coordinates D/8·g + 8u + 4·half + 2q + {0, 1}.
#pragma unroll
    for (int u = 0; u < Tile<D>::VW; ++u) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t sel = half ? 0x7632u : 0x5410u;
        uint32_t v01[4], v89[4];
        value_pairs(__byte_perm(v[0][u], v[1][u], sel), a.lo_mask, a.hi_mask, v01);
        value_pairs(__byte_perm(v[2][u], v[3][u], sel), a.lo_mask, a.hi_mask, v89);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const uint32_t av[4] = {v01[2 * q], v01[2 * q + 1], v89[2 * q], v89[2 * q + 1]};
#pragma unroll
          for (int n = 0; n < NQ; ++n) mma16816(acc[4 * u + 2 * half + q][n], av, pb[n][0], pb[n][1]);
        }
      }
    }
  };

  // At one n-tile, software-pipelined over tiles k = 0, 1, ...: one step issues the copies of
  // tile k + STAGES - 1 (into the slot of tile k - 1), waits for tile k + 1, then runs phase A
  // of tile k + 1 and phase B of tile k, which are independent, so their latencies overlap.
  // Phase A past the split's end reads a stale slot; its scores are never used. Two steps per
  // loop trip swap the score buffers without copies. At two n-tiles (GQA groups over 4) the
  // second score buffer would spill, so a step runs both phases of tile k.
  constexpr bool PIPE = NQ == 1;
  auto step = [&](int& slot, const int tile0, Part& cur, Part& next) {
    const int ahead = tile0 + (STAGES - 1) * STEP;
    const int fill = slot == 0 ? STAGES - 1 : slot - 1;  // tile k - 1's, consumed last step
    __syncwarp();  // every lane is done reading it
    if (ahead < end) issue_tile<D>(a, kb, ksb, vb, szb, ahead, last, g, t, lane, ring + fill * SB);
    cp_commit();
    cp_wait<PIPE ? STAGES - 2 : STAGES - 1>();  // tile k + 1 (k) has landed
    __syncwarp();  // the lanes' copies of it are visible to the warp
    const int nslot = slot == STAGES - 1 ? 0 : slot + 1;
    if constexpr (PIPE) {
      scores(ring_p + nslot * SB, next);
    } else {
      scores(ring_p + slot * SB, cur);
    }
    consume(ring_p + slot * SB, cur, tile0);
    slot = nslot;
  };
  int slot = 0;
  Part sc0, sc1;  // score buffers
  if constexpr (PIPE) {
    cp_wait<STAGES - 2>();  // tile 0 has landed
    __syncwarp();
    scores(ring_p, sc0);
  }
  for (; tile0 < end; tile0 += 2 * STEP) {
    step(slot, tile0, sc0, sc1);
    if (tile0 + STEP >= end) break;
    step(slot, tile0 + STEP, sc1, sc0);
  }
  cp_wait<0>();
  // The next kernel on the stream may launch now (it waits for this grid to complete before
  // reading anything; its CTAs take the multiprocessors this grid's CTAs leave).
  launch_dependents();

  // Fold the eight lanes of a head (groups g), then the warps of the CTA (tables are done).
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      l[n] += __shfl_xor_sync(0xffffffffu, l[n], o);
      z[n] += __shfl_xor_sync(0xffffffffu, z[n], o);
    }
  }
  // Each warp's partial per head, normalized: (acc + Σ p·zero) / l, and its base-2 LSE (a
  // warp without tokens: 0 and -inf), so the CTA fold below reads one value a warp per output
  // and one LSE a warp per head.
  float inv_l[NQ], lse[NQ];
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    inv_l[n] = l[n] > 0.f ? 1.0f / l[n] : 0.f;
    lse[n] = l[n] > 0.f ? m[n] + log2f(l[n]) : -INFINITY;
  }
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);  // [NW][8][D] normalized partials
  float* slse = so + NW * 8 * D;               // [NW][8]
  // Accumulator c of m-tile i, n-tile n: head 4n + t, coordinate D/8·g + 2i + (c >> 1); odd c
  // holds the residue part.
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    const int row = 4 * n + t;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int d = (D / 8) * g + 2 * i;
      so[(warp * 8 + row) * D + d] =
          (acc[i][n][0] + acc[i][n][1] * (1.0f / 2048.f) + z[n]) * inv_l[n];
      so[(warp * 8 + row) * D + d + 1] =
          (acc[i][n][2] + acc[i][n][3] * (1.0f / 2048.f) + z[n]) * inv_l[n];
    }
    if (g == 0) slse[warp * 8 + row] = lse[n];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.group * D; i += NW * 32) {
    const int row = i / D, d = i % D;
    float lw[NW];
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      lw[w] = slse[w * 8 + row];
      mm = fmaxf(mm, lw[w]);
    }
    float o = 0.f, den = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float wt = fast_exp2(lw[w] - mm);
        o = fmaf(wt, so[(w * 8 + row) * D + d], o);
        den += wt;
      }
    }
    const long long out_row = ((long long)b * hq + kvh * a.group + row) * a.num_splits + split;
    a.part_o[out_row * D + d] = den > 0.f ? o / den : 0.f;
    if (d == 0) a.part_l[out_row] = den > 0.f ? mm + log2f(den) : -INFINITY;
  }

  // The last CTA of this (sequence, KV head) to finish merges every split of its query rows:
  // the barrier orders the CTA's partials before thread 0's count, whose release publishes
  // them and whose acquire (in the last CTA) makes every other CTA's visible to it; the
  // second barrier orders that before the merge's reads (L2 loads, never a stale L1 line).
  __syncthreads();
  if (threadIdx.x == 0) {
    const int done = atomic_add_acq_rel(a.counters + b * hkv + kvh, 1);
    is_last = done == a.num_splits - 1;
  }
  __syncthreads();
  if (!is_last) return;
  // One (row, coordinate) a thread: its row's LSEs and its column of partial outputs, a batch
  // of splits in flight at once, merged with a running maximum (no barrier, no shared memory).
  const int S = a.num_splits;
  const long long row0 = (long long)b * hq + kvh * a.group;
  for (int i = threadIdx.x; i < a.group * D; i += NW * 32) {
    const int r = i / D, d = i % D;
    const float* lrow = a.part_l + (row0 + r) * S;
    const float* col = a.part_o + (row0 + r) * S * D + d;
    float mm = -INFINITY, o = 0.f, den = 0.f;
    for (int s0 = 0; s0 < S; s0 += MERGE_BATCH) {
      float lv[MERGE_BATCH], ov[MERGE_BATCH];
#pragma unroll
      for (int k = 0; k < MERGE_BATCH; ++k) {
        const int sp = s0 + k;
        lv[k] = sp < S ? __ldcg(lrow + sp) : -INFINITY;
        ov[k] = sp < S ? __ldcg(col + (long long)sp * D) : 0.f;
      }
      float cm = mm;
#pragma unroll
      for (int k = 0; k < MERGE_BATCH; ++k) cm = fmaxf(cm, lv[k]);
      if (cm == -INFINITY) continue;  // every split so far is empty
      const float sc = fast_exp2(mm - cm);
      o *= sc;
      den *= sc;
#pragma unroll
      for (int k = 0; k < MERGE_BATCH; ++k) {
        const float w = fast_exp2(lv[k] - cm);
        o = fmaf(w, ov[k], o);
        den += w;
      }
      mm = cm;
    }
    const int h = kvh * a.group + r;
    store_float(a.out, b * a.sob + h * a.soh + d * a.sod, a.odtype, den > 0.f ? o / den : 0.f);
  }
  if (threadIdx.x == 0) a.counters[b * hkv + kvh] = 0;  // ready for the next call
}

template <int D, int NW, bool PRECISE, int GP, int ROW>
int launch(const Args& a, int hkv, int splits, int batch, bool pdl, cudaStream_t stream) {
  constexpr int STAGES = NW >= 16 ? 4 : 3;  // 16 warps: one CTA per SM; 8: two
  const size_t bytes = Smem<D, NW, STAGES, GP, ROW>::BYTES;
  auto kernel = tq4_split_kernel<D, NW, PRECISE, STAGES, GP, ROW>;
  static bool attribute_set = false;  // once per instantiation (also keeps graph capture clean)
  if (!attribute_set) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)bytes);
    if (e != cudaSuccess) return (int)e;
    attribute_set = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(hkv, splits, batch);
  cfg.blockDim = dim3(NW * 32);
  cfg.dynamicSmemBytes = bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return (int)cudaLaunchKernelEx(&cfg, kernel, a);
}

}  // namespace

extern "C" {

const char* servelab_cuda_error(int e) { return cudaGetErrorString((cudaError_t)e); }

// sizeof(Args), offsetof(Args, errors), sizeof(Launch): the host checks its mirror against them.
void tq4_layout(long long* out) {
  out[0] = (long long)sizeof(Args);
  out[1] = (long long)offsetof(Args, errors);
  out[2] = (long long)sizeof(Launch);
}

// n zeroed ints of pinned host memory that every device can write (mapped, portable; with
// unified addressing the device pointer is the host pointer). Returns a cudaError_t.
int tq4_error_words(int** out, int n) {
  void* p = nullptr;
  cudaError_t e = cudaHostAlloc(&p, sizeof(int) * n, cudaHostAllocMapped | cudaHostAllocPortable);
  if (e != cudaSuccess) return (int)e;
  memset(p, 0, sizeof(int) * n);
  void* dp = nullptr;
  e = cudaHostGetDevicePointer(&dp, p, 0);
  if (e != cudaSuccess) return (int)e;
  if (dp != p) return 1003;  // no unified addressing: the host and device pointers differ
  *out = static_cast<int*>(p);
  return 0;
}

// Returns a cudaError_t; 1000 + n for an unsupported configuration n (checked in Python first).
// pdl: programmatic dependent launch, which the caller asks for only on compute capability
// 9.0 and up (the kernel's wait and trigger compile to nothing below it).
// `plan` is a Launch (a void pointer: a parameter of a type from the unnamed namespace would
// give this function internal linkage, and the library would not export it).
int tq4_decode(const void* plan, void* stream) {
  const Launch* L = static_cast<const Launch*>(plan);
  Args a = L->a;
  a.lo_mask = 0x000F000Fu;
  a.hi_mask = 0x00F000F0u;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int group = a.group, hkv = L->hkv, splits = a.num_splits, batch = L->batch;
  const bool pdl = L->pdl != 0, precise = L->precise != 0;
  const int row = L->wide ? 256 : 128;
  if (group < 1 || group > 8) return 1001;
#define SERVELAB_TQ4(Dv, NWv, ROWv)                                                      \
  if (L->head_size == Dv && L->warps == NWv && row == ROWv) {                              \
    if (group <= 4)                                                                        \
      return precise ? launch<Dv, NWv, true, 4, ROWv>(a, hkv, splits, batch, pdl, s)       \
                     : launch<Dv, NWv, false, 4, ROWv>(a, hkv, splits, batch, pdl, s);     \
    return precise ? launch<Dv, NWv, true, 8, ROWv>(a, hkv, splits, batch, pdl, s)         \
                   : launch<Dv, NWv, false, 8, ROWv>(a, hkv, splits, batch, pdl, s);       \
  }
  SERVELAB_TQ4(128, 8, 128)
  SERVELAB_TQ4(128, 16, 128)
  SERVELAB_TQ4(128, 16, 256)
  SERVELAB_TQ4(64, 8, 128)
  SERVELAB_TQ4(64, 16, 128)
  SERVELAB_TQ4(64, 16, 256)
#undef SERVELAB_TQ4
  return 1002;
}

}  // extern "C"
