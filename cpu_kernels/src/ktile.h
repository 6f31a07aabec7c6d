// Register tiles of the split-by-K float matmul (matmul.cc), shared with the quantized
// kernel, which dequantizes a pass of codes into a float scratch and runs these tiles
// over it (quant_matmul.cc).  A pass: kn consecutive weight rows; every row of x goes
// over it in tiles of MR rows x 8 * NV columns whose accumulators stay in registers.
#pragma once

#include "simd.h"

#ifdef JAXLLM_AVX2
#include <type_traits>

#include "common.h"

namespace jaxllm {

// 8 * NV weights of one row as NV float vectors.  bf16 for one row of x goes in 64-column
// strips (NV = 8) widened 16 at a time without a shuffle -- the shift gives the even
// columns, the mask the odd ones -- so its vectors hold the columns in the order
// (0 2 .. 14, 1 3 .. 15, 16 18 ..), which the caller puts back; the narrower strips of
// the multi-row tiles (NV <= 4) and the 8-column tails stay in order.
template <int NV>
static inline void LoadRow(const float* w, __m256* v) {
  for (int i = 0; i < NV; ++i) v[i] = _mm256_loadu_ps(w + 8 * i);
}
template <int NV>
static inline void LoadRow(const uint16_t* w, __m256* v) {
  static_assert(NV <= 4 || NV == 8, "bf16 strips: 8-64 columns");
  if constexpr (NV <= 4) {
    for (int i = 0; i < NV; ++i) v[i] = load8(w + 8 * i);
  } else {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int i = 0; i < NV / 2; ++i) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * i));
      v[2 * i] = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
      v[2 * i + 1] = _mm256_castsi256_ps(_mm256_and_si256(b, hi));
    }
  }
}

// Makes the weight vectors register values.  Without it GCC folds each weight load into
// every FMA that uses it, loading each vector once per row of x (in a 4 x 3 tile 12 weight
// loads and 4 broadcasts per 12 FMAs instead of 3 and 4), and the load ports rather than
// the FMA pipes set the pace: 10% slower with the weights in cache.  One asm statement
// for all of them: one per array element made GCC keep the array on the stack.
template <int NV>
static inline void Pin(__m256* v) {
  static_assert(NV <= 4, "the wider tiles have one row: nothing to share");
  if constexpr (NV == 1) asm("" : "+x"(v[0]));
  if constexpr (NV == 2) asm("" : "+x"(v[0]), "+x"(v[1]));
  if constexpr (NV == 3) asm("" : "+x"(v[0]), "+x"(v[1]), "+x"(v[2]));
  if constexpr (NV == 4) asm("" : "+x"(v[0]), "+x"(v[1]), "+x"(v[2]), "+x"(v[3]));
}

// One pass: kn weight rows of n columns at w (row stride ldw), the rows of x at x (stride
// ldx, offset to the pass's first weight row), the partial y at y (stride ldy), added to.
template <typename W>
struct KPass {
  const W* w;
  const float* x;
  float* y;
  int64_t kn, n, ldw, ldx, ldy;
  KPass Rows(int64_t m) const {  // from row m of x and y
    return {w, x + m * ldx, y + m * ldy, kn, n, ldw, ldx, ldy};
  }
};

// y[0:MR, c:c+8*NV] += x[0:MR, 0:kn] @ w[0:kn, c:c+8*NV], MR * NV accumulators in
// registers: each weight vector is loaded once for MR FMAs, each x value broadcast once
// for NV.
template <typename W, int MR, int NV>
static inline __attribute__((always_inline)) void KTile(const KPass<W>& s, int64_t c) {
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_loadu_ps(s.y + m * s.ldy + c + 8 * v);
  for (int64_t j = 0; j < s.kn; ++j) {
    __m256 wv[NV];
    if constexpr (std::is_same_v<W, uint16_t> && NV == 8) {
      // bf16, one row of x: the same 128 bytes of the next pass's row (5-7% faster on a
      // model pass; float32 measured slower with any prefetch).  A prefetch past the
      // array's end is a no-op, never a fault.
      const char* next = reinterpret_cast<const char*>(s.w + (j + s.kn) * s.ldw + c);
      __builtin_prefetch(next);
      __builtin_prefetch(next + 64);
    }
    LoadRow<NV>(s.w + j * s.ldw + c, wv);
    if constexpr (MR > 1) Pin<NV>(wv);
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_set1_ps(s.x[m * s.ldx + j]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(s.y + m * s.ldy + c + 8 * v, acc[m][v]);
}

// One pass for MR rows of x: strips of 8 * NV columns, then of 8, then single columns.
template <typename W, int MR, int NV>
static void KRows(const KPass<W>& s) {
  int64_t c = 0;
  for (; c + 8 * NV <= s.n; c += 8 * NV) KTile<W, MR, NV>(s, c);
  for (; c + 8 <= s.n; c += 8) KTile<W, MR, 1>(s, c);
  for (; c < s.n; ++c) {
    for (int m = 0; m < MR; ++m) {
      float acc = s.y[m * s.ldy + c];
      for (int64_t j = 0; j < s.kn; ++j) acc += s.x[m * s.ldx + j] * load<W>(s.w + j * s.ldw, c);
      s.y[m * s.ldy + c] = acc;
    }
  }
}

// One pass for all M rows of x.  float32: rows of x in groups of 4 with 4 x 24-column
// tiles -- 12 accumulator chains: with an FMA latency of 5 cycles and two FMA pipes, the
// 8 chains of a 4 x 16 tile leave a fifth of the FMA slots empty (with the weights in
// cache it took 1.2-1.3x as long at 8-16 rows) -- and the 1-3 rows left over in 3 x 24,
// 2 x 32 or 1 x 64 tiles (5 x 16 and 6 x 16 tiles for 5 and 6 rows measured 7-8% slower).
// bf16 takes the same tiles, widening in column order.  One row of x: 1 x 64 tiles, each
// weight vector used by one FMA.
template <typename W>
static void KPassRows(const KPass<W>& s, int64_t M) {
  if (M == 1) return KRows<W, 1, 8>(s);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) KRows<W, 4, 3>(s.Rows(m));
  if (M - m == 3) {
    KRows<W, 3, 3>(s.Rows(m));
  } else if (M - m == 2) {
    KRows<W, 2, 4>(s.Rows(m));
  } else if (M - m == 1) {  // bf16: in column order, as the tiles above
    if constexpr (std::is_same_v<W, float>) {
      KRows<W, 1, 8>(s.Rows(m));
    } else {
      KRows<W, 1, 4>(s.Rows(m));
    }
  }
}

}  // namespace jaxllm
#endif
