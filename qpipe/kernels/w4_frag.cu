// qpipe W4A16 on tensor cores, weights in the MMA's fragment order (qpipe-w4 layout v3).
//
// y[M, N] = x[M, K] @ W^T (+ bias), W int4 in groups along K (a group a multiple of 64
// columns), x and y fp16 or bf16. Compiled at run time by NVRTC for the device
// (qpipe/kernels/cuda_rtc.py, frag_w4a16.py); compiled by g++ for the CPU emulation test
// (tests/frag_emulator.cpp defines QPIPE_EMULATE and these primitives in C++).
//
// The MMA is mma.sync.m16n8k16 with the weights as its A operand ("swap AB": a 16-row tile
// of W times an 8-column slice of x^T), so a decode batch of M <= 8 fills the MMA's narrow
// side. Layout v3 (layout.py, frag_w4) stores, for each 16-row tile and each 64-column chunk,
// 32 lanes x 4 words: lane (g = lane / 4, t = lane % 4) word kk holds the 8 weights that lane
// needs for k16 step kk, rows g and g + 8, physical columns 16 t + 4 kk + j (j = 0..3) of the
// chunk, nibble i = (row g + 8 (i & 1), column j = 2 ((i >> 1) & 1) + (i >> 2)). One 16-byte
// load per lane brings a warp the whole 16 x 64 tile (512 contiguous bytes), already in
// register-operand order: no shared memory, no shuffle after dequantizing.
// The MMA's logical k = 2t, 2t + 1, 2t + 8, 2t + 9 of step kk are physical columns
// 16 t + 4 kk + 0..3 for A and for B alike, so each lane's activations for a chunk are the
// 16 contiguous halves x[m][64 c + 16 t ...] (two 16-byte loads).
// Dequantizing: one lop3 drops two nibbles into an fp16x2 (or bf16x2) as 1024 + q (128 + q),
// one add/fma subtracts 1024 + z exactly. With few accumulators the MMA sees those exact
// integers and each group's fp32 partial is multiplied by its scale once; with many, one more
// multiply puts the scale into the operand ((q - z) * s rounded once: the torch reference's
// weights bit for bit). A group is a power-of-two number of 64-column chunks (group_shift).
// The weight words of the next P chunks are in flight while a chunk is computed.
//
// Grid: x = row blocks of WARPS * R * 16 rows (each warp R row tiles), y = split-K, z = blocks
// of 8 T activation rows. Split-K partials go to their own workspace slot [split][M][N]; the
// last block of an output tile to finish (a ticket counter) adds the slots in split order
// (deterministic), writes y and resets its counter (the counters are zero between launches).

#ifndef QPIPE_EMULATE
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define QP_INLINE __device__ __forceinline__

// The weight stream: read once, so not kept in L1. volatile keeps the load where the code
// issues it (a prefetch several chunks ahead of its use).
QP_INLINE uint4 ld_weights(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Activations: every warp of the block (and the other blocks on the SM) reads them: L1.
QP_INLINE uint4 ld_x(const u16* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Another block's split-K partial: at L2, where its stores went.
QP_INLINE float ld_partial(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

// The dense weight of the prefill path (w4_frag_dequant): a cuBLAS GEMM reads it right after,
// from L2 where the chunk fits.
QP_INLINE void st_w(u16* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

QP_INLINE u32 lop3_and_or(u32 a, u32 mask, u32 bits) {  // (a & mask) | bits
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
}
QP_INLINE u32 hadd2(u32 a, u32 b) {
  u32 d;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
QP_INLINE u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
QP_INLINE u32 hmul2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
QP_INLINE u32 bfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
QP_INLINE u32 prmt(u32 a, u32 sel) { return __byte_perm(a, 0u, sel); }

template <bool BF16>
QP_INLINE void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  if (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <bool BF16>
QP_INLINE u16 from_float(float f) {
  u16 h;
  if (BF16) {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  }
  return h;
}

template <bool BF16>
QP_INLINE float to_float(u16 h) {
  if (BF16) return __uint_as_float(((u32)h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
#endif  // QPIPE_EMULATE

// Both halves of a 32-bit register hold v (fp16 or bf16 bits).
template <bool BF16>
QP_INLINE u32 pair_of(float v) {
  const u32 h = from_float<BF16>(v);
  return h | (h << 16);
}

// One word (8 weights of rows g and g + 8) -> the MMA's four A registers: q - z exactly, times
// the group scale when SCALED (else the scale multiplies the fp32 partial of the group).
// za / zb: the fp16x2 (bf16x2) constants that make q - z of rows g / g + 8; sa / sb their scales.
template <bool BF16, bool SCALED>
QP_INLINE void dequant(u32 w, u32 za, u32 zb, u32 sa, u32 sb, u32& a0, u32& a1, u32& a2,
                       u32& a3) {
  if (BF16) {
    // bf16 has 7 mantissa bits: each nibble goes to bits 0-3 (16-19) under 0x4300 (128).
    const u32 one = 0x3f803f80u, neg0 = 0x80008000u, magic = 0x43004300u, lo = 0x000f000fu;
    a0 = bfma2(lop3_and_or(w, lo, magic), one, za);        // nibbles 0, 4: row g, columns 0, 1
    a1 = bfma2(lop3_and_or(w >> 4, lo, magic), one, zb);   // nibbles 1, 5: row g + 8
    a2 = bfma2(lop3_and_or(w >> 8, lo, magic), one, za);   // nibbles 2, 6: row g, columns 2, 3
    a3 = bfma2(lop3_and_or(w >> 12, lo, magic), one, zb);  // nibbles 3, 7: row g + 8
    if (SCALED) {
      a0 = bfma2(a0, sa, neg0);
      a1 = bfma2(a1, sb, neg0);
      a2 = bfma2(a2, sa, neg0);
      a3 = bfma2(a3, sb, neg0);
    }
  } else {
    // 0x000f000f keeps nibbles 0 and 4 (1024 + q under 0x6400); 0x00f000f0 nibbles 1 and 5 as
    // 1024 + 16 q, brought back by a multiply with 1/16 inside the fma.
    const u32 magic = 0x64006400u, lo = 0x000f000fu, hi = 0x00f000f0u, sixteenth = 0x2c002c00u;
    const u32 w8 = w >> 8;
    a0 = hadd2(lop3_and_or(w, lo, magic), za);              // row g, columns 0, 1
    a1 = hfma2(lop3_and_or(w, hi, magic), sixteenth, zb);   // row g + 8, columns 0, 1
    a2 = hadd2(lop3_and_or(w8, lo, magic), za);             // row g, columns 2, 3
    a3 = hfma2(lop3_and_or(w8, hi, magic), sixteenth, zb);  // row g + 8, columns 2, 3
    if (SCALED) {
      a0 = hmul2(a0, sa);
      a1 = hmul2(a1, sb);
      a2 = hmul2(a2, sa);
      a3 = hmul2(a3, sb);
    }
  }
}

template <int T, int R, int WARPS, int P, bool BF16, bool HAS_Z, bool HAS_BIAS>
__global__ void __launch_bounds__(WARPS * 32)
    w4_frag_kernel(const u16* __restrict__ x, const uint4* __restrict__ qw,
                   const u16* __restrict__ s, const u8* __restrict__ z,
                   const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws,
                   int* __restrict__ cnt, int M, int N, int K, int stride_xm, int group_shift,
                   int split_k, int chunks_per_split) {
  // Few accumulators (R T <= 4): the MMAs see the exact integers q - z and a group's fp32
  // partial is scaled once (no multiply per weight). Many: the scale goes into the operand.
  constexpr bool AFTER = R * T <= 4;
  constexpr int PAR = (R * T == 1) ? 2 : 1;  // two partial sets: no chain of dependent MMAs
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_tiles = N >> 4;
  const int chunks = K >> 6;
  const int group_mask = (1 << group_shift) - 1;  // chunks per group - 1 (a power of two)
  const int rt0 = (blockIdx.x * WARPS + warp) * R;  // this warp's first 16-row tile
  const int m0 = blockIdx.z * (8 * T);                // this block's first activation row
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, chunks);

  float acc[R][T][4];
  float part[PAR][R][T][4];  // AFTER: this group's unscaled partials
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < T; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[r][j][e] = 0.0f;
#pragma unroll
        for (int q = 0; q < PAR; ++q) part[q][r][j][e] = 0.0f;
      }

  bool live[R];   // warp-uniform: whether row tile r exists
  int row[R];     // this lane's rows: row[r] and row[r] + 8
  const uint4* wp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    live[r] = rt0 + r < row_tiles;
    row[r] = (rt0 + r) * 16 + g;
    wp[r] = qw + ((i64)(rt0 + r) * chunks) * 32 + lane;
  }
  // This lane's activation row of n8 tile j. Rows past M read row M - 1: their products land
  // only in output columns that are never stored (an MMA column depends on its B column only).
  const u16* xp[T];
#pragma unroll
  for (int j = 0; j < T; ++j) xp[j] = x + (i64)min(m0 + 8 * j + g, M - 1) * stride_xm + 16 * t;
  // symmetric: the zero is 8 for every group
  const u32 za_sym = pair_of<BF16>(BF16 ? -136.0f : -1032.0f);
  const u32 zb_sym = pair_of<BF16>(BF16 ? -136.0f : -72.0f);

  if (live[0]) {
    uint4 wb[P][R];  // weight words of the chunks in flight
    u32 sb[P][R];    // their group scales (rows g | g + 8 << 16)
    u32 zb[P][R];    // their zero points (rows g | g + 8 << 8)
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int c = c0 + p;
      if (c < c1) {
        const i64 gi = (i64)(c >> group_shift) * N;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (live[r]) {
            wb[p][r] = ld_weights(wp[r] + (i64)c * 32);
            sb[p][r] = (u32)s[gi + row[r]] | ((u32)s[gi + row[r] + 8] << 16);
            zb[p][r] = HAS_Z ? ((u32)z[gi + row[r]] | ((u32)z[gi + row[r] + 8] << 8)) : 0u;
          }
        }
      }
    }
    for (int c = c0; c < c1; c += P) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int cc = c + p;
        if (cc < c1) {
          u32 xf[T][8];  // this lane's 16 activations of chunk cc, per n8 tile
#pragma unroll
          for (int j = 0; j < T; ++j) {
            const uint4 lo4 = ld_x(xp[j] + (i64)cc * 64);
            const uint4 hi4 = ld_x(xp[j] + (i64)cc * 64 + 8);
            xf[j][0] = lo4.x;
            xf[j][1] = lo4.y;
            xf[j][2] = lo4.z;
            xf[j][3] = lo4.w;
            xf[j][4] = hi4.x;
            xf[j][5] = hi4.y;
            xf[j][6] = hi4.z;
            xf[j][7] = hi4.w;
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (live[r]) {
              const u32 sa = prmt(sb[p][r], 0x1010u);   // (s_g, s_g)
              const u32 sbb = prmt(sb[p][r], 0x3232u);  // (s_g+8, s_g+8)
              u32 za = za_sym, zbb = zb_sym;
              if (HAS_Z) {
                const float zg = (float)(zb[p][r] & 0xffu);
                const float zg8 = (float)((zb[p][r] >> 8) & 0xffu);
                za = pair_of<BF16>(BF16 ? -(128.0f + zg) : -(1024.0f + zg));
                zbb = pair_of<BF16>(BF16 ? -(128.0f + zg8) : -(64.0f + zg8));
              }
#pragma unroll
              for (int kk = 0; kk < 4; ++kk) {
                const u32 word =
                    kk == 0 ? wb[p][r].x : (kk == 1 ? wb[p][r].y : (kk == 2 ? wb[p][r].z : wb[p][r].w));
                u32 a0, a1, a2, a3;
                dequant<BF16, !AFTER>(word, za, zbb, sa, sbb, a0, a1, a2, a3);
#pragma unroll
                for (int j = 0; j < T; ++j) {
                  float* d = AFTER ? part[kk % PAR][r][j] : acc[r][j];
                  mma16816<BF16>(d, a0, a1, a2, a3, xf[j][2 * kk], xf[j][2 * kk + 1]);
                }
              }
              if (AFTER && (((cc + 1) & group_mask) == 0 || cc + 1 == c1)) {
                // the group ends here: its partial times its scale (rows g, g + 8)
                const float s_g = to_float<BF16>((u16)(sb[p][r] & 0xffffu));
                const float s_g8 = to_float<BF16>((u16)(sb[p][r] >> 16));
#pragma unroll
                for (int j = 0; j < T; ++j)
#pragma unroll
                  for (int e = 0; e < 4; ++e) {
                    float v = part[0][r][j][e];
                    part[0][r][j][e] = 0.0f;
#pragma unroll
                    for (int q = 1; q < PAR; ++q) {
                      v += part[q][r][j][e];
                      part[q][r][j][e] = 0.0f;
                    }
                    acc[r][j][e] += v * (e < 2 ? s_g : s_g8);
                  }
              }
            }
          }
          const int cn = cc + P;  // refill this slot (now used): chunk cn, P chunks ahead
          if (cn < c1) {
            const i64 gi = (i64)(cn >> group_shift) * N;
#pragma unroll
            for (int r = 0; r < R; ++r) {
              if (live[r]) {
                wb[p][r] = ld_weights(wp[r] + (i64)cn * 32);
                sb[p][r] = (u32)s[gi + row[r]] | ((u32)s[gi + row[r] + 8] << 16);
                zb[p][r] =
                    HAS_Z ? ((u32)z[gi + row[r]] | ((u32)z[gi + row[r] + 8] << 8)) : 0u;
              }
            }
          }
        }
      }
    }
  }

  // acc[r][j][e]: output row row[r] + 8 (e >> 1), activation row m0 + 8 j + 2 t + (e & 1)
  if (split_k == 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (!live[r]) continue;
#pragma unroll
      for (int j = 0; j < T; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = row[r] + 8 * (e >> 1);
          const int m = m0 + 8 * j + 2 * t + (e & 1);
          if (m < M) {
            float v = acc[r][j][e];
            if (HAS_BIAS) v += to_float<BF16>(bias[n]);
            y[(i64)m * N + n] = from_float<BF16>(v);
          }
        }
    }
    return;
  }
  float* slot = ws + (i64)blockIdx.y * M * N;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (!live[r]) continue;
#pragma unroll
    for (int j = 0; j < T; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = row[r] + 8 * (e >> 1);
        const int m = m0 + 8 * j + 2 * t + (e & 1);
        if (m < M) slot[(i64)m * N + n] = acc[r][j][e];
      }
  }
  __threadfence();  // this block's partials are visible before its ticket is taken
  __syncthreads();
  __shared__ int is_last;
  const int tile = blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) is_last = atomicAdd(cnt + tile, 1) == split_k - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int rows = WARPS * R * 16;
  const int n0 = blockIdx.x * rows;
  for (int i = threadIdx.x; i < rows * 8 * T; i += WARPS * 32) {
    const int n = n0 + i % rows;
    const int m = m0 + i / rows;
    if (n < N && m < M) {
      float v = 0.0f;
      for (int k = 0; k < split_k; ++k) v += ld_partial(ws + ((i64)k * M + m) * N + n);
      if (HAS_BIAS) v += to_float<BF16>(bias[n]);
      y[(i64)m * N + n] = from_float<BF16>(v);
    }
  }
  if (threadIdx.x == 0) cnt[tile] = 0;  // zero again for the next launch
}

// The prefill path (frag_dense.py): rows [16 rt0, 16 (rt0 + tiles)) of W dequantized to a
// row-major [16 tiles, K] weight at w, each (q - z) * s rounded once to the activation dtype
// (dequant<SCALED>: the torch reference's weights bit for bit), for a cuBLAS GEMM to read. At
// large M that dequantizes each weight once per call, where the MMA kernel above does it once
// per 8 T activation rows. One warp per 16 x 64 tile: one 16-byte load a lane, and four
// 16-byte stores (rows g and g + 8, 16 contiguous columns 16 t .. 16 t + 15 each: lanes
// t = 0..3 of a row write its 128 contiguous bytes).
template <bool BF16, bool HAS_Z>
__global__ void __launch_bounds__(256)
    w4_frag_dequant(const uint4* __restrict__ qw, const u16* __restrict__ s,
                    const u8* __restrict__ z, u16* __restrict__ w, int N, int K, int group_shift,
                    int rt0, int tiles) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int chunks = K >> 6;
  const i64 job = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);  // 8 warps, a tile each
  if (job >= (i64)tiles * chunks) return;
  const int rt = rt0 + (int)(job / chunks);
  const int c = (int)(job % chunks);
  const uint4 v = ld_weights(qw + ((i64)rt * chunks + c) * 32 + lane);
  const int row = rt * 16 + g;
  const i64 gi = (i64)(c >> group_shift) * N;
  const u32 sp = (u32)s[gi + row] | ((u32)s[gi + row + 8] << 16);
  const u32 sa = prmt(sp, 0x1010u);   // (s_g, s_g)
  const u32 sbb = prmt(sp, 0x3232u);  // (s_g+8, s_g+8)
  u32 za = pair_of<BF16>(BF16 ? -136.0f : -1032.0f);  // symmetric: the zero is 8
  u32 zbb = pair_of<BF16>(BF16 ? -136.0f : -72.0f);
  if (HAS_Z) {
    const float zg = (float)z[gi + row];
    const float zg8 = (float)z[gi + row + 8];
    za = pair_of<BF16>(BF16 ? -(128.0f + zg) : -(1024.0f + zg));
    zbb = pair_of<BF16>(BF16 ? -(128.0f + zg8) : -(64.0f + zg8));
  }
  u32 a[4][4];  // word kk: a0 / a2 row g columns 4 kk + 0, 1 / 2, 3; a1 / a3 the same of row g + 8
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const u32 word = kk == 0 ? v.x : (kk == 1 ? v.y : (kk == 2 ? v.z : v.w));
    dequant<BF16, true>(word, za, zbb, sa, sbb, a[kk][0], a[kk][1], a[kk][2], a[kk][3]);
  }
  u16* wg = w + ((i64)(rt - rt0) * 16 + g) * K + (i64)c * 64 + 16 * t;
  u16* wg8 = wg + (i64)8 * K;
  st_w(wg, uint4{a[0][0], a[0][2], a[1][0], a[1][2]});
  st_w(wg + 8, uint4{a[2][0], a[2][2], a[3][0], a[3][2]});
  st_w(wg8, uint4{a[0][1], a[0][3], a[1][1], a[1][3]});
  st_w(wg8 + 8, uint4{a[2][1], a[2][3], a[3][1], a[3][3]});
}
