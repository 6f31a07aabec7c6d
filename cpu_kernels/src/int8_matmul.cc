// int8 x int8 -> int32 small-M matmul, the W8A8 decode case (jaxllm/quant/w8a8.py):
// y [M, N] int32 = x [M, K] . w [N, K]^T, both int8, w stored output-major (K contiguous,
// the W8A8Array layout).  Integer accumulation is exact, so the result equals XLA's
// int8 dot_general bit for bit; the float scales are applied by the caller in XLA.
//
// XLA:CPU runs that dot with one row ~25x slower than with two (so the XLA path pads a
// row), and with the row padded it still reads the weights at well under the memory
// roof (docs/quantization.md).  Here: per 32 bytes of a weight row, AVX2's
//   maddubs(|x|, sign(w, x))  -> 16 int16 sums of 2 products (|x|, |w| <= 127: no
//                                saturation, 2 * 127 * 127 < 32767),
//   madd(., 1)                -> 8 int32 sums, added to the accumulator,
// i.e. 4 instructions per 32 codes per row of x, against 12 for widening to float.
// Codes must lie in [-127, 127] (w8a8 clips both to that range): sign(-128) overflows.
// Items are blocks of 64 weight rows; each weight row is read once for all rows of x, in
// register tiles of (x rows, weight rows) = 1 x 2 (one row of x: two weight rows in
// flight read memory in order; 1 x 8 measured 1.2x slower on the LM head) or 2 x 4, whose
// 8-lane sums are reduced at the end.

#include "common.h"
#include "simd.h"

namespace jaxllm {
namespace {

constexpr int64_t kRows = 64;  // weight rows per parallel item

struct I8Params {
  int64_t M, K, N;
  const int8_t* x;  // [M, K]
  const int8_t* w;  // [N, K]
  int32_t* y;       // [M, N]
};

static inline int32_t DotScalar(const int8_t* x, const int8_t* w, int64_t k0, int64_t k1) {
  int32_t s = 0;
  for (int64_t k = k0; k < k1; ++k) s += static_cast<int32_t>(x[k]) * w[k];
  return s;
}

#ifdef JAXLLM_AVX2
static inline int32_t HSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// y[m0:m0+MR, n0:n0+NR] from MR rows of x and NR weight rows.
template <int MR, int NR>
static inline void Tile(const I8Params& p, int64_t m0, int64_t n0) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_si256();
  const int8_t* x = p.x + m0 * p.K;
  const int8_t* w = p.w + n0 * p.K;
  int64_t k = 0;
  for (; k + 32 <= p.K; k += 32) {
    __m256i xv[MR], ax[MR];
    for (int m = 0; m < MR; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * p.K + k));
      ax[m] = _mm256_abs_epi8(xv[m]);
    }
    __builtin_prefetch(w + NR * p.K + k);  // the next tile's rows (measured 1.1-1.3x)
    for (int j = 0; j < NR; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * p.K + k));
      for (int m = 0; m < MR; ++m) {
        const __m256i prod = _mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wv, xv[m]));
        acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(prod, ones));
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j)
      p.y[(m0 + m) * p.N + n0 + j] =
          HSum(acc[m][j]) + DotScalar(x + m * p.K, w + j * p.K, k, p.K);
}
#endif

static void Rows(const I8Params& p, int64_t n0, int64_t n1) {  // plain loops
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m)
      p.y[m * p.N + n] = DotScalar(p.x + m * p.K, p.w + n * p.K, 0, p.K);
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("int8_matmul: expected x [M, K] and w [N, K]");
  }
  I8Params p{xd[0], xd[1], wd[0], x.typed_data(), w.typed_data(), y->typed_data()};
  const int64_t blocks = (p.N + kRows - 1) / kRows;
  ParallelFor(pool, blocks, [&](int64_t i) {
    const int64_t n0 = i * kRows, n1 = std::min(p.N, n0 + kRows);
#ifdef JAXLLM_AVX2
    int64_t n = n0;
    if (p.M == 1) {
      for (; n + 2 <= n1; n += 2) Tile<1, 2>(p, 0, n);
    }
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      for (; m + 2 <= p.M; m += 2) Tile<2, 4>(p, m, n);
      if (m < p.M) Tile<1, 4>(p, m, n);
    }
    if (n < n1) Rows(p, n, n1);
#else
    Rows(p, n0, n1);
#endif
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmInt8Matmul, jaxllm::Int8MatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S8>>()  // x [M, K]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S8>>()  // w [N, K]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
