// Small-M matmul for decode: y [M, N] f32 = x [M, K] (f32 / bf16) @ w [K, N] (f32 / bf16 /
// bf16 bits in u16), float32 accumulation, weights widened in registers.
//
// XLA:CPU streams such weights at ~12 GB/s (JAX_NOTES.md).  bf16 weights: a stream over
// w in column blocks of 64, each block read from memory once for all rows, with the rows
// in register tiles of MR rows x NV 8-lane vectors (MR * NV = 8 FMA chains) -- for more
// rows the block is re-read from L2, not from memory; column blocks are the parallel
// items.  float32 weights, and bf16 with one row: split by K instead (RunKSplit), so
// that each thread streams contiguous memory.  A second entry point takes w stored
// [N, K] (below).

#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ktile.h"
#include "simd.h"

namespace jaxllm {
namespace {

constexpr int64_t kBlock = 64;  // columns per item: one 128-byte bf16 run per weight row

struct MatmulParams {
  int64_t M, K, N;
  const float* x;  // [M, K] widened
  const void* w;
  float* y;
};

// x widened to float32 once (M * K is small); false when x's type is not float32 / bf16.
static bool WidenX(ffi::AnyBuffer x, std::vector<float>& xf) {
  const int64_t n = static_cast<int64_t>(xf.size());
  if (x.element_type() == ffi::DataType::F32) {
    const float* src = static_cast<const float*>(x.untyped_data());
    std::copy(src, src + n, xf.begin());
  } else if (x.element_type() == ffi::DataType::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < n; ++i) xf[i] = bf16_to_f32(src[i]);
  } else {
    return false;
  }
  return true;
}

#ifdef JAXLLM_AVX2
// y[r0:r0+MR, n0:n0+8*NV] = x[r0:r0+MR] @ w[:, n0:n0+8*NV]
template <typename W, int MR, int NV>
static inline void Tile(const MatmulParams& p, int64_t r0, int64_t n0) {
  const W* w = static_cast<const W*>(p.w) + n0;
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  const float* x = p.x + r0 * p.K;
  for (int64_t k = 0; k < p.K; ++k) {
    const W* wr = w + k * p.N;
    __builtin_prefetch(wr + 16 * p.N);  // 16 rows ahead: a strided stream
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load8<W>(wr + 8 * v);
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_set1_ps(x[m * p.K + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(p.y + (r0 + m) * p.N + n0 + 8 * v, acc[m][v]);
}

// A full 64-column block: row groups of 4 / 2 / 1 with 8 accumulators each.
template <typename W>
static void FullBlock(const MatmulParams& p, int64_t n0) {
  int64_t r = 0;
  for (; r + 4 <= p.M; r += 4)
    for (int64_t c = 0; c < kBlock; c += 16) Tile<W, 4, 2>(p, r, n0 + c);
  for (; r + 2 <= p.M; r += 2)
    for (int64_t c = 0; c < kBlock; c += 32) Tile<W, 2, 4>(p, r, n0 + c);
  for (; r < p.M; ++r) Tile<W, 1, 8>(p, r, n0);
}
#endif

template <typename W>
static void Columns(const MatmulParams& p, int64_t n0, int64_t n1) {  // plain loops
  const W* w = static_cast<const W*>(p.w);
  for (int64_t m = 0; m < p.M; ++m) {
    float* y = p.y + m * p.N;
    for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
    for (int64_t k = 0; k < p.K; ++k) {
      const float xv = p.x[m * p.K + k];
      const W* wr = w + k * p.N;
#pragma omp simd
      for (int64_t n = n0; n < n1; ++n) y[n] += xv * load<W>(wr, n);
    }
  }
}

template <typename W>
static void Run(ffi::ThreadPool& pool, const MatmulParams& p) {
  const int64_t blocks = (p.N + kBlock - 1) / kBlock;
  ParallelFor(pool, blocks, [&](int64_t i) {
    const int64_t n0 = i * kBlock, n1 = std::min(p.N, n0 + kBlock);
#ifdef JAXLLM_AVX2
    if (n1 - n0 == kBlock) return FullBlock<W>(p, n0);
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
      for (int64_t r = 0; r < p.M; ++r) Tile<W, 1, 1>(p, r, n);
    }
    if (n < n1) Columns<W>(p, n, n1);
#else
    Columns<W>(p, n0, n1);
#endif
  });
}

#ifdef JAXLLM_AVX2
// float32 and bf16 weights, split by K: each item streams one contiguous run of weight
// rows (all N columns) into its own partial y, summed at the end.  Column blocks --
// 256-byte pieces of rows 2-12 KB apart -- measured 1.4x slower at 4 rows
// (docs/cpu_kernels.md).  Rows of w go kSub at a time (a pass): kSub sequential streams,
// the partial y loaded and stored once per pass (8 rather than 4: the engine's bf16
// batch-1 decode 1.04x, float32 1.07x on a model pass; on a float32 pass at 1-16 rows 4
// and 6 measured 2-11% slower, 12 no faster, 16 slower).  A pass goes along the columns
// in strips, one register tile (KTile) per strip and group of rows of x: the first group
// reads the pass's weights from memory, the others from L2.  (Doing pieces of 192-768
// columns for all groups before the next piece, so that the other groups read them from
// L1, measured no faster.)
constexpr int64_t kSub = 8;

// Rows [k0, k1) of w into the partial y [M, N], kSub rows per pass (tiles: ktile.h).
template <typename W>
static void KRange(const MatmulParams& p, int64_t k0, int64_t k1, float* y) {
  std::fill_n(y, p.M * p.N, 0.f);
  for (int64_t k = k0; k < k1; k += kSub) {
    KPassRows<W>({static_cast<const W*>(p.w) + k * p.N, p.x + k, y, std::min(kSub, k1 - k),
                  p.N, p.N, p.K, p.N}, p.M);
  }
}

template <typename W>
static void RunKSplit(ffi::ThreadPool& pool, const MatmulParams& p) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t items = std::clamp<int64_t>(p.K / 64, 1, threads);
  const int64_t size = p.M * p.N;
  std::vector<float> partial(items * size);
  ParallelFor(pool, items, [&](int64_t i) {
    KRange<W>(p, p.K * i / items, p.K * (i + 1) / items, partial.data() + i * size);
  });
  // y = the sum of the partials; bf16's one-row 64-column strips come back from (even,
  // odd) order: column c of a 16-column group was stored at (c odd ? 8 : 0) + c / 2.
  const int64_t permuted = std::is_same_v<W, float> || p.M > 1 ? 0 : p.N / 64 * 64;
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t c = n & 15;
      const int64_t at = m * p.N + (n < permuted ? n - c + (c & 1) * 8 + c / 2 : n);
      float s = 0.f;
      for (int64_t i = 0; i < items; ++i) s += partial[i * size + at];
      p.y[m * p.N + n] = s;
    }
  }
}

// The traversal for w [K, N] (measured: docs/cpu_kernels.md): split by K for float32 and
// for bf16 up to kBf16SplitRows rows (a bf16 model pass at 2 / 4 / 8 / 16 rows 1.55 /
// 1.28 / 1.17 / 1.05x the column blocks, 0.97x at 32); more bf16 rows share the
// widening in the column-block tiles.
constexpr int64_t kBf16SplitRows = 16;
template <typename W>
static void RunKN(ffi::ThreadPool& pool, const MatmulParams& p) {
  if (std::is_same_v<W, float> || p.M <= kBf16SplitRows) return RunKSplit<W>(pool, p);
  Run<W>(pool, p);
}
#else
template <typename W>
static void RunKN(ffi::ThreadPool& pool, const MatmulParams& p) { Run<W>(pool, p); }
#endif

// ---------------------------------------------------------------- output-major weights
// y [M, N] = x [M, K] @ w^T for w stored [N, K] (the tied LM head reads the [V, D]
// embedding this way): each weight row is one contiguous K-run, read once for all rows
// of x, dotted in 8-lane partial sums reduced at the end.  XLA:CPU instead transposes the
// whole embedding every step for bf16 (measured: docs/cpu_kernels.md).  Row blocks of w
// are the parallel items.

constexpr int64_t kRowBlock = 1024;  // weight rows per item (64: bf16 3-10% slower)

#ifdef JAXLLM_AVX2
// y[m0:m0+MR, n0:n0+NR] from NR weight rows and MR rows of x.  `ahead`: the next tile's
// rows (or nullptr), prefetched a few lines per step of the K loop: the NR short row
// streams otherwise leave the memory bus idle between tiles (the 49152 x 576 LM head on
// two threads: bf16 one row 3.5 -> 2.7 ms, 4 rows 5.9 -> 3.5; float32 4 rows 7.2 -> 6.9,
// but one row 10% slower, so float32 at one row goes without).
template <typename W, int MR, int NR>
static inline void TileNT(const MatmulParams& p, int64_t m0, int64_t n0,
                          const W* ahead = nullptr) {
  const W* w = static_cast<const W*>(p.w) + n0 * p.K;
  const float* x = p.x + m0 * p.K;
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_ps();
  const char* pre = reinterpret_cast<const char*>(ahead);
  const int64_t lines = ahead ? (NR * p.K * static_cast<int64_t>(sizeof(W)) + 63) / 64 : 0;
  const int64_t per_step = (lines + p.K / 8 - 1) / std::max<int64_t>(1, p.K / 8);
  int64_t line = 0;
  int64_t k = 0;
  for (; k + 8 <= p.K; k += 8) {
    for (int64_t i = 0; i < per_step && line < lines; ++i, ++line) {
      __builtin_prefetch(pre + 64 * line);
    }
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8<W>(w + j * p.K + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * p.K + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NR; ++j) {
      float s = hadd8(acc[m][j]);
      for (int64_t kk = k; kk < p.K; ++kk) s += x[m * p.K + kk] * load<W>(w + j * p.K, kk);
      p.y[(m0 + m) * p.N + n0 + j] = s;
    }
  }
}
#endif

template <typename W>
static void RowsNT(const MatmulParams& p, int64_t n0, int64_t n1) {  // plain loops
  const W* w = static_cast<const W*>(p.w);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < p.K; ++k) s += p.x[m * p.K + k] * load<W>(w + n * p.K, k);
      p.y[m * p.N + n] = s;
    }
  }
}

template <typename W>
static void RunNT(ffi::ThreadPool& pool, const MatmulParams& p) {
  const int64_t blocks = (p.N + kRowBlock - 1) / kRowBlock;
  ParallelFor(pool, blocks, [&](int64_t i) {
    const int64_t n0 = i * kRowBlock, n1 = std::min(p.N, n0 + kRowBlock);
#ifdef JAXLLM_AVX2
    int64_t n = n0;
    if (p.M == 1) {
      const W* w = static_cast<const W*>(p.w);
      for (; n + 8 <= n1; n += 8) {
        const bool ahead = std::is_same_v<W, uint16_t> && n + 16 <= p.N;
        TileNT<W, 1, 8>(p, 0, n, ahead ? w + (n + 8) * p.K : nullptr);
      }
    }
    for (; n + 4 <= n1; n += 4) {  // the first row pair's tile prefetches the next rows
      const W* ahead = n + 8 <= p.N ? static_cast<const W*>(p.w) + (n + 4) * p.K : nullptr;
      int64_t m = 0;
      for (; m + 2 <= p.M; m += 2) TileNT<W, 2, 4>(p, m, n, m == 0 ? ahead : nullptr);
      if (m < p.M) TileNT<W, 1, 4>(p, m, n, m == 0 ? ahead : nullptr);
    }
    if (n < n1) RowsNT<W>(p, n, n1);
#else
    RowsNT<W>(p, n0, n1);
#endif
  });
}

// Both entry points: check the shapes, widen x, dispatch on w's element type.  NT: w is
// stored [N, K] (output-major) rather than [K, N].
template <bool NT>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const std::string name = NT ? "small_matmul_nt" : "small_matmul";
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[NT ? 1 : 0]) {
    return ffi::Error::InvalidArgument(
        name + (NT ? ": expected x [M, K] and w [N, K]" : ": expected x [M, K] and w [K, N]"));
  }
  MatmulParams p;
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[NT ? 0 : 1];
  std::vector<float> xf(p.M * p.K);
  if (!WidenX(x, xf)) {
    return ffi::Error::InvalidArgument(name + ": x must be float32 or bfloat16");
  }
  p.x = xf.data();
  p.w = w.untyped_data();
  p.y = y->typed_data();
  switch (w.element_type()) {
    case ffi::DataType::F32: NT ? RunNT<float>(pool, p) : RunKN<float>(pool, p); break;
    case ffi::DataType::BF16:
    case ffi::DataType::U16: NT ? RunNT<uint16_t>(pool, p) : RunKN<uint16_t>(pool, p); break;
    default:
      return ffi::Error::InvalidArgument(name + ": w must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmSmallMatmulNT, jaxllm::MatmulImpl<true>,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [M, K]
                                  .Arg<xla::ffi::AnyBuffer>()  // w [N, K]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmSmallMatmul, jaxllm::MatmulImpl<false>,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [M, K]
                                  .Arg<xla::ffi::AnyBuffer>()  // w [K, N]
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
