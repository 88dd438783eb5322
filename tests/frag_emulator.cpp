// Runs qpipe/kernels/w4_frag.cu -- the very source NVRTC compiles for the GPU -- on the CPU:
// every CUDA thread of a block is a std::thread, __syncthreads a barrier of the block,
// mma.sync a warp-wide exchange (each lane posts its fragments, then reads the ones its
// outputs need, as PTX's m16n8k16 layout defines them), and the PTX primitives (lop3,
// f16x2 / bf16x2 arithmetic, cvt, prmt) C++ with the same rounding. Blocks run one after
// another, so the split-K ticket and the "last block sums" path run as on the GPU.
//
// Usage: frag_emulator CASE_FILE OUT_FILE. CASE_FILE (little endian): int32 header
//   M N K group_size bf16 has_z has_bias T R WARPS P split_k chunks_per_split stride_xm
//   grid_x grid_y grid_z threads group_shift (the launch as frag_w4a16.geometry plans it)
// then x (u16 [M, stride_xm]), qw (u32 [N/16, K/64, 128]), s (u16 [G, N]), z (u8 [G, N],
// when has_z), bias (u16 [N], when has_bias). OUT_FILE: y (u16 [M, N]) then the counters
// (int32, one per output tile), which must be all zero again.
// Built with -fsanitize=address,undefined by the test: every buffer is allocated to its exact
// size, so an out-of-bounds access of the kernel is an error here.

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define QPIPE_EMULATE 1
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

struct uint4 {
  u32 x, y, z, w;
};
struct dim3 {
  u32 x = 1, y = 1, z = 1;
};

thread_local dim3 threadIdx, blockIdx;
dim3 gridDim, blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static  // blocks run one at a time: one copy serves each block in turn
#define QP_INLINE static inline

// -- the block and its warps ------------------------------------------------------------------

struct WarpExchange {
  explicit WarpExchange() : bar(32) {}
  std::barrier<> bar;
  u32 a[32][4];
  u32 b[32][2];
};

struct Block {
  explicit Block(int threads) : bar(threads), warps(threads / 32) {
    for (auto& w : warps) w = std::make_unique<WarpExchange>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<WarpExchange>> warps;
};
thread_local Block* current_block = nullptr;

static void __syncthreads() { current_block->bar.arrive_and_wait(); }
static void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
static int min(int a, int b) { return a < b ? a : b; }
static float __uint_as_float(u32 v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
static u32 __float_as_uint(float f) {
  u32 v;
  std::memcpy(&v, &f, 4);
  return v;
}
static u32 __byte_perm(u32 x, u32 y, u32 s) {
  const unsigned long long both = ((unsigned long long)y << 32) | x;
  u32 out = 0;
  for (int i = 0; i < 4; ++i) {
    const u32 sel = (s >> (4 * i)) & 0x7;  // no sign-replication modes in our selectors
    out |= (u32)((both >> (8 * sel)) & 0xff) << (8 * i);
  }
  return out;
}

// -- numbers ----------------------------------------------------------------------------------

static float h2f(u16 h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return (float)v;
}
static u16 f2h_from_double(double d) {  // one rounding (RN) from an exact value
  _Float16 v = (_Float16)d;
  u16 h;
  std::memcpy(&h, &v, 2);
  return h;
}
static float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
static u16 f2bf(float f) {  // round to nearest even
  u32 v = __float_as_uint(f);
  if ((v & 0x7f800000u) == 0x7f800000u) return (u16)((v >> 16) | ((v & 0xffff) ? 0x40 : 0));
  v += 0x7fffu + ((v >> 16) & 1u);
  return (u16)(v >> 16);
}
static u16 d2bf(double d) {
  // the values here are exact in float (products of small integers and bf16 scales, sums of
  // bf16 magic numbers and integers), so double -> float is exact and one rounding remains
  return f2bf((float)d);
}

template <bool BF16>
QP_INLINE u16 from_float(float f) {
  return BF16 ? f2bf(f) : f2h_from_double((double)f);
}
template <bool BF16>
QP_INLINE float to_float(u16 h) {
  return BF16 ? bf2f(h) : h2f(h);
}

static u32 pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }
template <class F>
static u32 map2_h(u32 a, u32 b, u32 c, F f) {  // fp16x2, one RN rounding per half
  const u16 lo = f2h_from_double(f((double)h2f(a & 0xffff), (double)h2f(b & 0xffff),
                                   (double)h2f(c & 0xffff)));
  const u16 hi = f2h_from_double(f((double)h2f(a >> 16), (double)h2f(b >> 16), (double)h2f(c >> 16)));
  return pack2(lo, hi);
}

QP_INLINE u32 lop3_and_or(u32 a, u32 mask, u32 bits) { return (a & mask) | bits; }
QP_INLINE u32 hadd2(u32 a, u32 b) {
  return map2_h(a, b, 0, [](double x, double y, double) { return x + y; });
}
QP_INLINE u32 hfma2(u32 a, u32 b, u32 c) {
  return map2_h(a, b, c, [](double x, double y, double z) { return x * y + z; });
}
QP_INLINE u32 hmul2(u32 a, u32 b) {
  return map2_h(a, b, 0, [](double x, double y, double) { return x * y; });
}
QP_INLINE u32 bfma2(u32 a, u32 b, u32 c) {
  auto one = [](u16 x, u16 y, u16 z) {
    return d2bf((double)bf2f(x) * (double)bf2f(y) + (double)bf2f(z));
  };
  return pack2(one(a & 0xffff, b & 0xffff, c & 0xffff), one(a >> 16, b >> 16, c >> 16));
}
QP_INLINE u32 prmt(u32 a, u32 sel) { return __byte_perm(a, 0u, sel); }

// -- memory -----------------------------------------------------------------------------------

static uint4 ld16(const void* p) {
  if ((uintptr_t)p % 16) {
    std::fprintf(stderr, "misaligned 16-byte load at %p\n", p);
    std::abort();
  }
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
QP_INLINE uint4 ld_weights(const uint4* p) { return ld16(p); }
QP_INLINE uint4 ld_x(const u16* p) { return ld16(p); }
QP_INLINE void st_w(u16* p, uint4 v) {
  if ((uintptr_t)p % 16) {
    std::fprintf(stderr, "misaligned 16-byte store at %p\n", p);
    std::abort();
  }
  std::memcpy(p, &v, 16);
}
QP_INLINE float ld_partial(const float* p) { return *p; }  // blocks run one after another

// -- mma.sync.m16n8k16.row.col, f32 accumulators ----------------------------------------------

template <bool BF16>
QP_INLINE void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  const int lane = threadIdx.x & 31;
  WarpExchange& w = *current_block->warps[threadIdx.x >> 5];
  w.a[lane][0] = a0, w.a[lane][1] = a1, w.a[lane][2] = a2, w.a[lane][3] = a3;
  w.b[lane][0] = b0, w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  auto half = [](u32 reg, int which) {
    const u16 h = (u16)(which ? reg >> 16 : reg & 0xffff);
    return (double)(BF16 ? bf2f(h) : h2f(h));
  };
  // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2
  auto A = [&](int r, int k) {
    return half(w.a[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2);
  };
  // B[k][n]: lane n * 4 + (k % 8) / 2, register k >= 8, half k % 2
  auto B = [&](int k, int n) { return half(w.b[n * 4 + (k % 8) / 2][k >= 8], k % 2); };
  const int g = lane >> 2, t = lane & 3;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) sum += A(r, k) * B(k, n);
    d[e] = (float)((double)c[e] + sum);
  }
  w.bar.arrive_and_wait();  // every lane has read the fragments before they are overwritten
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

#include "../qpipe/kernels/w4_frag.cu"

// -- driver -----------------------------------------------------------------------------------

template <class T>
static std::vector<T> read_vec(FILE* f, size_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "short case file\n");
    std::exit(2);
  }
  return v;
}

// An exact-size heap copy (the sanitizer's red zones then sit right past each buffer).
template <class T>
static std::unique_ptr<T[]> exact(const std::vector<T>& v) {
  auto p = std::unique_ptr<T[]>(new T[v.size() ? v.size() : 1]);
  std::memcpy(p.get(), v.data(), v.size() * sizeof(T));
  return p;
}

using Kernel = void (*)(const u16*, const uint4*, const u16*, const u8*, const u16*, u16*, float*,
                        int*, int, int, int, int, int, int, int);

template <int T, int R, int W, int P>
static Kernel pick_flags(bool bf16, bool has_z, bool has_bias) {
  const int code = (bf16 ? 4 : 0) | (has_z ? 2 : 0) | (has_bias ? 1 : 0);
  switch (code) {
    case 0: return &w4_frag_kernel<T, R, W, P, false, false, false>;
    case 1: return &w4_frag_kernel<T, R, W, P, false, false, true>;
    case 2: return &w4_frag_kernel<T, R, W, P, false, true, false>;
    case 3: return &w4_frag_kernel<T, R, W, P, false, true, true>;
    case 4: return &w4_frag_kernel<T, R, W, P, true, false, false>;
    case 5: return &w4_frag_kernel<T, R, W, P, true, false, true>;
    case 6: return &w4_frag_kernel<T, R, W, P, true, true, false>;
    default: return &w4_frag_kernel<T, R, W, P, true, true, true>;
  }
}

// The configurations the tests run (the tuner's shapes of T, R, WARPS, P).
static Kernel pick(int T, int R, int W, int P, bool bf16, bool z, bool b) {
#define QP_CASE(t, r, w, p) \
  if (T == t && R == r && W == w && P == p) return pick_flags<t, r, w, p>(bf16, z, b);
  QP_CASE(1, 1, 4, 4)
  QP_CASE(1, 2, 4, 2)
  QP_CASE(1, 1, 2, 3)
  QP_CASE(2, 1, 4, 3)
  QP_CASE(2, 2, 2, 2)
  QP_CASE(4, 1, 4, 2)
  QP_CASE(8, 1, 2, 2)
  QP_CASE(8, 2, 4, 1)
#undef QP_CASE
  std::fprintf(stderr, "configuration T=%d R=%d WARPS=%d P=%d not built into the emulator\n", T,
               R, W, P);
  std::exit(3);
}

// --dequant CASE_FILE OUT_FILE: w4_frag_dequant. CASE_FILE: int32 header N K group_size bf16
// has_z rt0 tiles grid_x threads group_shift, then qw, s and z as above. OUT_FILE: w (u16
// [16 tiles, K]).
static int run_dequant(const char* case_path, const char* out_path) {
  FILE* f = std::fopen(case_path, "rb");
  if (!f) return 2;
  auto h = read_vec<int>(f, 10);
  const int N = h[0], K = h[1], gs = h[2], bf16 = h[3], has_z = h[4], rt0 = h[5], tiles = h[6];
  const int shift = h[9], G = K / gs;
  auto qw_words = read_vec<u32>(f, (size_t)N * K / 8);
  auto qw = std::unique_ptr<uint4[]>(new uint4[(size_t)N * K / 32]);
  std::memcpy(qw.get(), qw_words.data(), qw_words.size() * 4);
  auto s = exact(read_vec<u16>(f, (size_t)G * N));
  auto z = has_z ? exact(read_vec<u8>(f, (size_t)G * N)) : nullptr;
  std::fclose(f);
  if (h[8] != 256 || (64 << shift) != gs) {
    std::fprintf(stderr, "the planned launch does not fit the kernel\n");
    return 2;
  }
  const size_t n_out = (size_t)16 * tiles * K;
  auto w = std::unique_ptr<u16[]>(new u16[n_out]);
  for (size_t i = 0; i < n_out; ++i) w[i] = 0x7e00;  // poison (the test compares every bit)
  using Dq = void (*)(const uint4*, const u16*, const u8*, u16*, int, int, int, int, int);
  const Dq kernels[4] = {&w4_frag_dequant<false, false>, &w4_frag_dequant<false, true>,
                         &w4_frag_dequant<true, false>, &w4_frag_dequant<true, true>};
  const Dq kernel = kernels[(bf16 ? 2 : 0) | (has_z ? 1 : 0)];
  gridDim.x = h[7], gridDim.y = 1, gridDim.z = 1;
  blockDim.x = 256;
  for (u32 bx = 0; bx < gridDim.x; ++bx) {
    Block block(256);
    std::vector<std::thread> threads;
    for (int tid = 0; tid < 256; ++tid)
      threads.emplace_back([&, tid] {
        threadIdx.x = tid;
        blockIdx.x = bx, blockIdx.y = 0, blockIdx.z = 0;
        current_block = &block;
        kernel(qw.get(), s.get(), z.get(), w.get(), N, K, shift, rt0, tiles);
        block.bar.arrive_and_drop();
      });
    for (auto& th : threads) th.join();
  }
  FILE* o = std::fopen(out_path, "wb");
  if (!o) return 2;
  std::fwrite(w.get(), 2, n_out, o);
  std::fclose(o);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--dequant") == 0) return run_dequant(argv[2], argv[3]);
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s [--dequant] CASE_FILE OUT_FILE\n", argv[0]);
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 2;
  auto h = read_vec<int>(f, 19);
  const int M = h[0], N = h[1], K = h[2], gs = h[3], bf16 = h[4], has_z = h[5], has_bias = h[6];
  const int T = h[7], R = h[8], W = h[9], P = h[10], split = h[11], cps = h[12], sxm = h[13];
  const int shift = h[18];
  const int G = K / gs;
  auto x = exact(read_vec<u16>(f, (size_t)M * sxm));
  auto qw_words = read_vec<u32>(f, (size_t)N * K / 8);
  auto qw = std::unique_ptr<uint4[]>(new uint4[(size_t)N * K / 32]);
  std::memcpy(qw.get(), qw_words.data(), qw_words.size() * 4);
  auto s = exact(read_vec<u16>(f, (size_t)G * N));
  auto z = has_z ? exact(read_vec<u8>(f, (size_t)G * N)) : nullptr;
  auto bias = has_bias ? exact(read_vec<u16>(f, (size_t)N)) : nullptr;
  std::fclose(f);

  gridDim.x = h[14], gridDim.y = h[15], gridDim.z = h[16];
  blockDim.x = h[17];
  if (blockDim.x != (u32)W * 32 || gridDim.y != (u32)split || (64 << shift) != gs) {
    std::fprintf(stderr, "the planned launch does not fit the configuration\n");
    return 2;
  }
  const int tiles = gridDim.x * gridDim.z;
  auto y = std::unique_ptr<u16[]>(new u16[(size_t)M * N]);
  for (size_t i = 0; i < (size_t)M * N; ++i) y[i] = 0x7e00;  // poison: NaN in fp16
  auto ws = std::unique_ptr<float[]>(new float[split > 1 ? (size_t)split * M * N : 1]);
  for (size_t i = 0; i < (split > 1 ? (size_t)split * M * N : 1); ++i) ws[i] = NAN;
  auto cnt = std::unique_ptr<int[]>(new int[tiles]);
  for (int i = 0; i < tiles; ++i) cnt[i] = 0;

  Kernel kernel = pick(T, R, W, P, bf16, has_z, has_bias);
  for (u32 bz = 0; bz < gridDim.z; ++bz)
    for (u32 by = 0; by < gridDim.y; ++by)
      for (u32 bx = 0; bx < gridDim.x; ++bx) {
        Block block(W * 32);
        std::vector<std::thread> threads;
        for (int tid = 0; tid < W * 32; ++tid)
          threads.emplace_back([&, tid] {
            threadIdx.x = tid;
            blockIdx.x = bx, blockIdx.y = by, blockIdx.z = bz;
            current_block = &block;
            kernel(x.get(), qw.get(), s.get(), z.get(), bias.get(), y.get(), ws.get(), cnt.get(),
                   M, N, K, sxm, shift, split, cps);
            // a thread that returned early still counts in the block's barrier
            block.bar.arrive_and_drop();
          });
        for (auto& th : threads) th.join();
      }

  FILE* o = std::fopen(argv[2], "wb");
  if (!o) return 2;
  std::fwrite(y.get(), 2, (size_t)M * N, o);
  std::fwrite(cnt.get(), 4, tiles, o);
  std::fclose(o);
  return 0;
}
