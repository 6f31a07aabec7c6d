// Small-M matmul over quantized weights (the decode case), weight-only numerics:
// y [M, N] f32 = x [M, K] (f32 / bf16) @ W, W = codes * scale + offset per group of K,
// dequantized in registers with float32 accumulation.  Activations are never quantized.
//
// Layouts (jaxllm.quant.QuantizedArray, docs/quantization.md), read in place:
//   values   int8 [K, N] (8 bits) or uint8 [K/2, N], two 4-bit codes per byte;
//            "interleaved": byte r holds K index 2r (low nibble) and 2r+1 (high);
//            "gguf32": per 32-element block b, byte 16b+j holds 32b+j (low) and 32b+j+16;
//   scales   [K/G, N] float32 / float16 / bfloat16; offsets the same or absent.
// A "storage row" is one row of `values`: one K index (8 bits) or two (4 bits).  The
// activations are reordered once per call into storage order (x_st[2r], x_st[2r+1] are
// the two K indices of storage row r), so one inner loop serves both 4-bit packings.
//
// Per group, per output column:  y += scale * sum_k x_k q_k + offset * sum_k x_k,
// so the inner loop is one widen + convert + FMA per code and the scale / offset cost
// two FMAs per column per group.  Two traversals, by width (measured: docs/cpu_kernels.md):
//   N <= 1024: runs of 64-256 columns are the parallel items (each read from memory once,
//     for all rows); inside an item the K rows go in chunks (a group, or 16-64 rows of
//     int8's one per-channel group) outermost, so a chunk's rows stay in L1 while every
//     row tile reads them and the next chunk is prefetched meanwhile;
//   N > 1024: split by K (RunKSplit, below): each item streams whole storage rows.

#include <numeric>
#include <vector>

#include "common.h"
#include "ktile.h"
#include "simd.h"

#if defined(JAXLLM_AVX2) && defined(__F16C__)
#define JAXLLM_QMM_SIMD 1
constexpr bool kWidens = true;
#else
constexpr bool kWidens = false;  // the plain loops only
#endif

namespace jaxllm {
namespace {

constexpr int64_t kWidenRows = 8;  // from this many rows of x, dequantize once per pass (below)
constexpr int64_t kBlock = 64;     // columns per item: one cache line of int8 / packed int4
constexpr int64_t kPass = 8;    // split by K: storage rows per pass (sequential streams)
constexpr int64_t kAhead = 256; // split by K: prefetch distance along each row, bytes

enum Packing : int64_t { kNone = 0, kInterleaved = 1, kGguf32 = 2 };

struct QParams {
  int64_t M, K, N;
  int64_t rows;        // storage rows: K (8 bits) or K / 2 (4 bits)
  int64_t group_rows;  // storage rows per group
  int64_t groups;      // K / G
  int64_t chunk_rows;  // storage rows per chunk: a group, or a part of a large group
  int64_t chunks;      // rows / chunk_rows; chunk c uses the scales of group c / per_group
  int64_t per_group;   // chunks per group
  int64_t item_cols;   // columns per parallel item (a multiple of kBlock)
  const float* x;      // [M, K] widened, in storage order
  const float* xsum;   // [M, chunks]: sum of x over each chunk (offsets only)
  const void* values;
  const void* scales;
  const void* offsets;  // null: symmetric
  float* y;
  bool widened;        // dequantize once per pass, float tiles (M >= kWidenRows)
};

// IEEE half -> float without F16C (the portable path).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
  if (exp == 0x1Fu) {
    u = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    u = sign | ((112u - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Scale / offset element types: tags with a scalar load (and an 8-lane load below).
struct ScaleF32 { using T = float; static float At(const T* p, int64_t i) { return p[i]; } };
struct ScaleF16 {
  using T = uint16_t;
  static float At(const T* p, int64_t i) { return f16_to_f32(p[i]); }
};
struct ScaleBF16 {
  using T = uint16_t;
  static float At(const T* p, int64_t i) { return bf16_to_f32(p[i]); }
};

// Code of storage row r, column n: `half` 0 = low nibble / the int8 value, 1 = high nibble.
template <int BITS>
static inline float Code(const void* values, int64_t N, int64_t r, int64_t n, int half) {
  if (BITS == 8) return static_cast<float>(static_cast<const int8_t*>(values)[r * N + n]);
  const uint8_t b = static_cast<const uint8_t*>(values)[r * N + n];
  return static_cast<float>(half ? (b >> 4) : (b & 0xF));
}

// y[m, n] (+)= scale * acc + offset * xsum for chunk c; `prev` is 0 for the first chunk.
template <typename S>
static inline float Epilogue(const QParams& p, int64_t c, int64_t m, int64_t n, float acc,
                             float prev) {
  const int64_t g = c / p.per_group;
  const auto* sc = static_cast<const typename S::T*>(p.scales);
  float v = prev + S::At(sc, g * p.N + n) * acc;
  if (p.offsets) {
    const auto* of = static_cast<const typename S::T*>(p.offsets);
    v += S::At(of, g * p.N + n) * p.xsum[m * p.chunks + c];
  }
  return v;
}

// Plain loops over columns [n0, n1) (< 64): the tail of N and CPUs without AVX2 + F16C.
template <int BITS, typename S>
static void ColumnsGeneric(const QParams& p, int64_t n0, int64_t n1) {
  constexpr int per_row = BITS == 8 ? 1 : 2;
  float acc[kBlock];
  for (int64_t c = 0; c < p.chunks; ++c) {
    for (int64_t m = 0; m < p.M; ++m) {
      std::fill(acc, acc + (n1 - n0), 0.f);
      const float* x = p.x + m * p.K;
      for (int64_t r = c * p.chunk_rows; r < (c + 1) * p.chunk_rows; ++r) {
        for (int h = 0; h < per_row; ++h) {
          const float xv = x[per_row * r + h];
          for (int64_t n = n0; n < n1; ++n) {
            acc[n - n0] += xv * Code<BITS>(p.values, p.N, r, n, h);
          }
        }
      }
      float* y = p.y + m * p.N;
      for (int64_t n = n0; n < n1; ++n) {
        y[n] = Epilogue<S>(p, c, m, n, acc[n - n0], c == 0 ? 0.f : y[n]);
      }
    }
  }
}

#ifdef JAXLLM_QMM_SIMD
template <typename S>
static inline __m256 Load8S(const typename S::T* p);
template <>
inline __m256 Load8S<ScaleF32>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 Load8S<ScaleF16>(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m256 Load8S<ScaleBF16>(const uint16_t* p) { return load8<uint16_t>(p); }

// The 16 codes of 8 packed bytes (8 columns x 2 K indices) as floats: lo the low nibbles,
// hi the high ones (8 bytes -> 8 lanes, then split).
static inline void Unpack4(const uint8_t* w, __m256& lo, __m256& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

// acc[m][v] += sum over storage rows [r0, r1) of x[m0 + m] * code, columns [n0, n0 + 8 NV).
// Each code is widened once for all MR rows.  AHEAD: also prefetch each row kAhead bytes
// ahead (the split-by-K streams).
template <int BITS, int MR, int NV, bool AHEAD>
static inline void RowsTile(const QParams& p, int64_t m0, int64_t r0, int64_t r1, int64_t n0,
                            __m256 (&acc)[MR][NV]) {
  const float* x = p.x + m0 * p.K;
  const bool lead = AHEAD && n0 % 64 == 0;  // one prefetch per cache line of each row
  if (BITS == 8) {
    const int8_t* w = static_cast<const int8_t*>(p.values) + n0;
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* wr = w + r * p.N;
      if (lead) __builtin_prefetch(wr + kAhead);
      __m256 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load8<int8_t>(wr + 8 * v);
      for (int m = 0; m < MR; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x + m * p.K + r);
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xb, wv[v], acc[m][v]);
      }
    }
  } else {
    const uint8_t* w = static_cast<const uint8_t*>(p.values) + n0;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = w + r * p.N;
      if (lead) __builtin_prefetch(wr + kAhead);
      __m256 lo[NV], hi[NV];
      for (int v = 0; v < NV; ++v) {
        Unpack4(wr + 8 * v, lo[v], hi[v]);
        if (MR == 1) {  // use the pair at once: 8 accumulators + 16 codes do not fit
          acc[0][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * r), lo[v], acc[0][v]);
          acc[0][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * r + 1), hi[v], acc[0][v]);
        }
      }
      for (int m = 0; MR > 1 && m < MR; ++m) {
        const __m256 x0 = _mm256_broadcast_ss(x + m * p.K + 2 * r);
        const __m256 x1 = _mm256_broadcast_ss(x + m * p.K + 2 * r + 1);
        for (int v = 0; v < NV; ++v) {
          acc[m][v] = _mm256_fmadd_ps(x0, lo[v], acc[m][v]);
          acc[m][v] = _mm256_fmadd_ps(x1, hi[v], acc[m][v]);
        }
      }
    }
  }
}

// One chunk (of group g) of rows for output rows [r0, r0+MR) and columns [n0, n0+8*NV):
// MR*NV accumulators (independent FMA chains).
template <int BITS, typename S, bool OFF, int MR, int NV>
static inline void ChunkTile(const QParams& p, int64_t c, int64_t g, int64_t r0, int64_t n0) {
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  RowsTile<BITS, MR, NV, false>(p, r0, c * p.chunk_rows, (c + 1) * p.chunk_rows, n0, acc);
  // y += scale * acc (+ offset * sum of x over the chunk)
  const auto* sc = static_cast<const typename S::T*>(p.scales) + g * p.N + n0;
  const auto* of = static_cast<const typename S::T*>(p.offsets) + g * p.N + n0;
  for (int v = 0; v < NV; ++v) {
    const __m256 s = Load8S<S>(sc + 8 * v);
    for (int m = 0; m < MR; ++m) {
      float* y = p.y + (r0 + m) * p.N + n0 + 8 * v;
      __m256 out = c == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y);
      out = _mm256_fmadd_ps(s, acc[m][v], out);
      if (OFF) {
        out = _mm256_fmadd_ps(Load8S<S>(of + 8 * v),
                              _mm256_broadcast_ss(p.xsum + (r0 + m) * p.chunks + c), out);
      }
      _mm256_storeu_ps(y, out);
    }
  }
}

// Asks for storage rows [r0, r1) x columns [n0, n1) (next chunk of this item) to be
// fetched: rows are N bytes apart, beyond the reach of the hardware prefetchers.
template <int BITS>
static inline void PrefetchRows(const QParams& p, int64_t r0, int64_t r1, int64_t n0,
                                int64_t n1) {
  const char* base = static_cast<const char*>(p.values);
  for (int64_t r = r0; r < std::min(r1, p.rows); ++r)
    for (int64_t n = n0; n < n1; n += 64) __builtin_prefetch(base + r * p.N + n);
}

// One item, columns [n0, n1): chunks outermost (the next chunk prefetched while this one
// is computed), then 64-column blocks, then row tiles of 4 / 2 / 1 rows with 8
// accumulators each; a block narrower than 64 columns takes 8-column tiles.
template <int BITS, typename S, bool OFF>
static void ItemSimd(const QParams& p, int64_t n0, int64_t n1) {
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t g = c / p.per_group;  // once per chunk, not per tile: a division is ~40 cycles
    PrefetchRows<BITS>(p, (c + 1) * p.chunk_rows, (c + 2) * p.chunk_rows, n0, n1);
    for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
      const int64_t nv = (std::min(n1, b0 + kBlock) - b0) / 8;
      if (nv == 8) {
        int64_t r = 0;
        for (; r + 4 <= p.M; r += 4)
          for (int64_t j = 0; j < kBlock; j += 16)
            ChunkTile<BITS, S, OFF, 4, 2>(p, c, g, r, b0 + j);
        for (; r + 2 <= p.M; r += 2)
          for (int64_t j = 0; j < kBlock; j += 32)
            ChunkTile<BITS, S, OFF, 2, 4>(p, c, g, r, b0 + j);
        for (; r < p.M; ++r) ChunkTile<BITS, S, OFF, 1, 8>(p, c, g, r, b0);
      } else {
        for (int64_t r = 0; r < p.M; ++r)
          for (int64_t v = 0; v < nv; ++v) ChunkTile<BITS, S, OFF, 1, 1>(p, c, g, r, b0 + 8 * v);
      }
    }
  }
}

// ----------------------------------------------------------------------- split by K
// The column runs above read each storage row as 64-256-byte pieces N bytes apart (on the
// LM head, one 4 KB page per row): at one row of x they measured memory-latency bound,
// 4-8 GB/s (docs/kernels.md).  Split by K instead, as the float kernel does: each item
// streams a contiguous run of storage rows -- all N columns -- into its own partial y,
// summed at the end.  A group's rows go kPass at a time across all columns (kPass
// sequential streams, each also prefetched kAhead bytes ahead); a group longer than one
// pass keeps its unscaled sums in `gacc` between passes, and its last pass adds
// scale * acc + offset * sum(x) to y.  Rows of x go in register tiles as above, each code
// widened once per tile.

// One pass (storage rows [a, b) of a segment starting at s0 and ending at s1) for rows
// [m0, m0 + MR) of x and columns [n0, n0 + 8 NV).  xs: sum of x over the segment, per row.
template <int BITS, typename S, bool OFF, int MR, int NV>
static inline void PassTile(const QParams& p, int64_t m0, int64_t a, int64_t b, int64_t s0,
                            int64_t s1, int64_t n0, int64_t g, const float* xs, float* y,
                            float* gacc) {
  __m256 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = a == s0 ? _mm256_setzero_ps()
                          : _mm256_loadu_ps(gacc + (m0 + m) * p.N + n0 + 8 * v);
  RowsTile<BITS, MR, NV, true>(p, m0, a, b, n0, acc);
  if (b < s1) {  // more passes to come: keep the unscaled sums
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(gacc + (m0 + m) * p.N + n0 + 8 * v, acc[m][v]);
    return;
  }
  const auto* sc = static_cast<const typename S::T*>(p.scales) + g * p.N + n0;
  const auto* of = static_cast<const typename S::T*>(p.offsets) + g * p.N + n0;
  for (int v = 0; v < NV; ++v) {
    const __m256 s = Load8S<S>(sc + 8 * v);
    for (int m = 0; m < MR; ++m) {
      float* yr = y + (m0 + m) * p.N + n0 + 8 * v;
      __m256 out = _mm256_fmadd_ps(s, acc[m][v], _mm256_loadu_ps(yr));
      if (OFF) out = _mm256_fmadd_ps(Load8S<S>(of + 8 * v), _mm256_set1_ps(xs[m0 + m]), out);
      _mm256_storeu_ps(yr, out);
    }
  }
}

// Storage rows [r0, r1) into the partial y [M, N] (zeroed here); gacc [M, N] scratch.
template <int BITS, typename S, bool OFF>
static void KRange(const QParams& p, int64_t r0, int64_t r1, float* y, float* gacc) {
  constexpr int per_row = BITS == 8 ? 1 : 2;
  const int64_t n8 = p.N / 8 * 8, n64 = p.N / 64 * 64;
  std::fill_n(y, p.M * p.N, 0.f);
  std::vector<float> xs(p.M, 0.f);
  for (int64_t s0 = r0; s0 < r1;) {  // a segment: the part of one group inside [r0, r1)
    const int64_t g = s0 / p.group_rows, s1 = std::min(r1, (g + 1) * p.group_rows);
    if (OFF) {
      for (int64_t m = 0; m < p.M; ++m) {
        const float* x = p.x + m * p.K;
        xs[m] = 0.f;
        for (int64_t k = per_row * s0; k < per_row * s1; ++k) xs[m] += x[k];
      }
    }
    for (int64_t a = s0; a < s1; a += kPass) {
      const int64_t b = std::min(s1, a + kPass);
      for (int64_t n = 0; n < n64; n += 64) {
        int64_t m = 0;
        for (; m + 4 <= p.M; m += 4)
          for (int64_t j = 0; j < 64; j += 16)
            PassTile<BITS, S, OFF, 4, 2>(p, m, a, b, s0, s1, n + j, g, xs.data(), y, gacc);
        for (; m + 2 <= p.M; m += 2)
          for (int64_t j = 0; j < 64; j += 32)
            PassTile<BITS, S, OFF, 2, 4>(p, m, a, b, s0, s1, n + j, g, xs.data(), y, gacc);
        if (m < p.M) PassTile<BITS, S, OFF, 1, 8>(p, m, a, b, s0, s1, n, g, xs.data(), y, gacc);
      }
      for (int64_t n = n64; n < n8; n += 8)
        for (int64_t m = 0; m < p.M; ++m)
          PassTile<BITS, S, OFF, 1, 1>(p, m, a, b, s0, s1, n, g, xs.data(), y, gacc);
    }
    const auto* sc = static_cast<const typename S::T*>(p.scales) + g * p.N;
    const auto* of = static_cast<const typename S::T*>(p.offsets) + g * p.N;
    for (int64_t m = 0; m < p.M; ++m) {  // columns past the last multiple of 8
      const float* x = p.x + m * p.K;
      for (int64_t n = n8; n < p.N; ++n) {
        float acc = 0.f;
        for (int64_t r = s0; r < s1; ++r)
          for (int h = 0; h < per_row; ++h)
            acc += x[per_row * r + h] * Code<BITS>(p.values, p.N, r, n, h);
        y[m * p.N + n] += S::At(sc, n) * acc + (OFF ? S::At(of, n) * xs[m] : 0.f);
      }
    }
    s0 = s1;
  }
}

// ------------------------------------------------------- many rows: widen once per pass
// The tiles above widen each code once per tile of 4 rows of x: 8 times at 32 rows, where
// the widening (load, unpack, convert: 5 instructions per 16 codes) costs more than the
// FMAs it feeds.  From kWidenRows rows each pass of codes is instead dequantized once,
// w = code * scale + offset, into a float scratch that stays in L1, and the float
// kernel's register tiles (ktile.h) run every row of x over it.  Still weight-only:
// x stays float32, the products accumulate in float32.
constexpr int64_t kWidePassK = 16;  // K indices per pass (a 4-bit pass: 8 storage rows)
constexpr int64_t kPiece = 384;     // columns per piece: 16 x 384 floats = 24 KB of L1

// Storage rows [a, b) (inside one group), columns [n0, n0 + nc) dequantized into out,
// one row per K index in storage order (the order of p.x), row stride nc.
template <int BITS, typename S, bool OFF>
static void Widen(const QParams& p, int64_t a, int64_t b, int64_t n0, int64_t nc, float* out) {
  constexpr int per_row = BITS == 8 ? 1 : 2;
  const int64_t g = a / p.group_rows;
  const auto* sc = static_cast<const typename S::T*>(p.scales) + g * p.N + n0;
  const auto* of = static_cast<const typename S::T*>(p.offsets) + g * p.N + n0;
  const int64_t n8 = nc / 8 * 8;
  for (int64_t n = 0; n < n8; n += 8) {
    const __m256 s = Load8S<S>(sc + n);
    const __m256 o = OFF ? Load8S<S>(of + n) : _mm256_setzero_ps();
    for (int64_t r = a; r < b; ++r) {
      float* o0 = out + per_row * (r - a) * nc + n;
      if (BITS == 8) {
        const int8_t* w = static_cast<const int8_t*>(p.values) + r * p.N + n0 + n;
        _mm256_storeu_ps(o0, _mm256_fmadd_ps(load8<int8_t>(w), s, o));
      } else {
        __m256 lo, hi;
        Unpack4(static_cast<const uint8_t*>(p.values) + r * p.N + n0 + n, lo, hi);
        _mm256_storeu_ps(o0, _mm256_fmadd_ps(lo, s, o));
        _mm256_storeu_ps(o0 + nc, _mm256_fmadd_ps(hi, s, o));
      }
    }
  }
  for (int64_t n = n8; n < nc; ++n) {
    const float s = S::At(sc, n), o = OFF ? S::At(of, n) : 0.f;
    for (int64_t r = a; r < b; ++r)
      for (int h = 0; h < per_row; ++h)
        out[(per_row * (r - a) + h) * nc + n] = Code<BITS>(p.values, p.N, r, n0 + n, h) * s + o;
  }
}

// Storage rows [r0, r1) into the partial y [M, N] (zeroed here), widened a pass and a
// piece at a time.  Passes outermost, so each pass's storage rows stream in order.
template <int BITS, typename S, bool OFF>
static void KRangeWiden(const QParams& p, int64_t r0, int64_t r1, float* y) {
  constexpr int per_row = BITS == 8 ? 1 : 2;
  std::fill_n(y, p.M * p.N, 0.f);
  std::vector<float> buf(kWidePassK * kPiece);
  for (int64_t a = r0; a < r1;) {
    const int64_t group_end = (a / p.group_rows + 1) * p.group_rows;
    const int64_t b = std::min({r1, a + kWidePassK / per_row, group_end});
    for (int64_t n0 = 0; n0 < p.N; n0 += kPiece) {
      const int64_t nc = std::min(kPiece, p.N - n0);
      Widen<BITS, S, OFF>(p, a, b, n0, nc, buf.data());
      KPassRows<float>({buf.data(), p.x + per_row * a, y + n0, per_row * (b - a), nc, nc, p.K,
                        p.N}, p.M);
    }
    a = b;
  }
}

// Split by K only on weights wider than this: at N = 576 and 960 the column runs measured
// as fast or faster (a storage row is 9-15 cache lines, so they stay within a few pages).
constexpr int64_t kSplitMinN = 1024;

// Items are contiguous runs of whole groups (of kPass rows when one group spans K, as
// int8 per channel does), at most one per thread; one item writes y directly.
template <int BITS, typename S>
static void RunKSplit(ffi::ThreadPool& pool, const QParams& p) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t unit = p.groups > 1 ? p.group_rows : kPass;
  const int64_t units = (p.rows + unit - 1) / unit;
  const int64_t items = std::clamp<int64_t>(units, 1, threads);
  const int64_t size = p.M * p.N;
  std::vector<float> partial(items > 1 ? items * size : 0),
      gacc(p.widened ? 0 : items * size);  // the tiles' unscaled sums
  ParallelFor(pool, items, [&](int64_t i) {
    const int64_t r0 = std::min(p.rows, units * i / items * unit);
    const int64_t r1 = std::min(p.rows, units * (i + 1) / items * unit);
    float* y = items == 1 ? p.y : partial.data() + i * size;
    if (p.widened) {
      if (p.offsets) {
        KRangeWiden<BITS, S, true>(p, r0, r1, y);
      } else {
        KRangeWiden<BITS, S, false>(p, r0, r1, y);
      }
    } else if (p.offsets) {
      KRange<BITS, S, true>(p, r0, r1, y, gacc.data() + i * size);
    } else {
      KRange<BITS, S, false>(p, r0, r1, y, gacc.data() + i * size);
    }
  });
  if (items == 1) return;
  for (int64_t j = 0; j < size; ++j) {
    float s = 0.f;
    for (int64_t i = 0; i < items; ++i) s += partial[i * size + j];
    p.y[j] = s;
  }
}
#endif

template <int BITS, typename S>
static void Run(ffi::ThreadPool& pool, const QParams& p) {
#ifdef JAXLLM_QMM_SIMD
  if (p.N > kSplitMinN || p.widened) return RunKSplit<BITS, S>(pool, p);
#endif
  const int64_t items = (p.N + p.item_cols - 1) / p.item_cols;
  ParallelFor(pool, items, [&](int64_t i) {
    const int64_t n0 = i * p.item_cols, n1 = std::min(p.N, n0 + p.item_cols);
#ifdef JAXLLM_QMM_SIMD
    const int64_t simd_end = n0 + (n1 - n0) / 8 * 8;
    if (simd_end > n0) {
      if (p.offsets) {
        ItemSimd<BITS, S, true>(p, n0, simd_end);
      } else {
        ItemSimd<BITS, S, false>(p, n0, simd_end);
      }
    }
    if (simd_end < n1) ColumnsGeneric<BITS, S>(p, simd_end, n1);
#else
    for (int64_t b = n0; b < n1; b += kBlock) {
      ColumnsGeneric<BITS, S>(p, b, std::min(n1, b + kBlock));
    }
#endif
  });
}

template <int BITS>
static ffi::Error RunScales(ffi::ThreadPool& pool, const QParams& p, ffi::DataType st) {
  switch (st) {
    case ffi::DataType::F32: Run<BITS, ScaleF32>(pool, p); break;
    case ffi::DataType::F16: Run<BITS, ScaleF16>(pool, p); break;
    case ffi::DataType::BF16: Run<BITS, ScaleBF16>(pool, p); break;
    default:
      return ffi::Error::InvalidArgument(
          "quant_matmul: scales must be float32, float16 or bfloat16");
  }
  return ffi::Error::Success();
}

// Storage rows walked between two epilogues: a whole group when it is small; a large
// group (int8 per channel: all of K) is cut into chunks of 16-64 rows (the largest such
// divisor) so that a chunk of a wide item stays in L1 and the next one can be prefetched.
static int64_t ChunkRows(int64_t group_rows) {
  if (group_rows <= 64) return group_rows;
  for (int64_t d = 64; d >= 16; --d) {
    if (group_rows % d == 0) return d;
  }
  return group_rows;
}

// Columns per parallel item: 64-column blocks, several per item on wide matrices (the
// LM head) so that every weight row is read in runs of up to 256 contiguous columns
// rather than one cache line per 4 KB page; at least 8 items per thread for balance.
static int64_t ItemColumns(int64_t N, int64_t threads) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int64_t per_item = blocks / (8 * std::max<int64_t>(1, threads));
  return kBlock * std::clamp<int64_t>(per_item, 1, 4);
}

static ffi::Error Validate(const ffi::AnyBuffer& x, const ffi::AnyBuffer& values,
                           const ffi::AnyBuffer& scales, const ffi::AnyBuffer& offsets,
                           int64_t bits, int64_t group, int64_t packing) {
  auto xd = x.dimensions(), vd = values.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || vd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "quant_matmul: expected x [M, K], values and scales 2-D");
  }
  const int64_t K = xd[1], N = vd[1];
  if (bits == 8 && (packing != kNone || values.element_type() != ffi::DataType::S8)) {
    return ffi::Error::InvalidArgument("quant_matmul: 8-bit values must be int8, packing none");
  }
  if (bits == 4 && ((packing != kInterleaved && packing != kGguf32) ||
                    values.element_type() != ffi::DataType::U8)) {
    return ffi::Error::InvalidArgument(
        "quant_matmul: 4-bit values must be uint8, packing interleaved or gguf32");
  }
  if (bits != 8 && bits != 4) {
    return ffi::Error::InvalidArgument("quant_matmul: bits must be 8 or 4");
  }
  if (group <= 0 || K % group || (bits == 4 && group % 2) || (packing == kGguf32 && group != 32)) {
    return ffi::Error::InvalidArgument(
        "quant_matmul: group size must divide K (even for 4 bits, 32 for gguf32)");
  }
  if (vd[0] != (bits == 8 ? K : K / 2) || sd[0] != K / group || sd[1] != N) {
    return ffi::Error::InvalidArgument("quant_matmul: values / scales shapes do not match x");
  }
  const int64_t noff = static_cast<int64_t>(offsets.element_count());
  if (noff != 0 && (offsets.element_type() != scales.element_type() || noff != sd[0] * N)) {
    return ffi::Error::InvalidArgument("quant_matmul: offsets must match scales");
  }
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("quant_matmul: x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                           ffi::AnyBuffer scales, ffi::AnyBuffer offsets, int64_t bits,
                           int64_t group, int64_t packing, ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error err = Validate(x, values, scales, offsets, bits, group, packing); err.failure()) {
    return err;
  }
  QParams p;
  p.M = x.dimensions()[0];
  p.K = x.dimensions()[1];
  p.N = values.dimensions()[1];
  p.rows = bits == 8 ? p.K : p.K / 2;
  p.group_rows = bits == 8 ? group : group / 2;
  p.groups = p.K / group;
  p.chunk_rows = ChunkRows(p.group_rows);
  p.per_group = p.group_rows / p.chunk_rows;
  p.chunks = p.groups * p.per_group;
  p.item_cols = ItemColumns(p.N, pool.num_threads());
  // Activations widened once (M * K is small); for gguf32 reordered into storage order
  // (interleaved storage order is K order).  Loops without divisions: this runs on one
  // thread before the parallel part (a division per element cost ~10% at 32 rows).
  std::vector<float> xf(p.M * p.K), xs, sums;
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  for (int64_t i = 0; i < p.M * p.K; ++i) {
    xf[i] = bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x.untyped_data())[i])
                 : static_cast<const float*>(x.untyped_data())[i];
  }
  if (bits == 4 && packing == kGguf32) {
    xs.resize(p.M * p.K);
    for (int64_t b = 0; b < p.M * p.K; b += 32)  // block b: K index b + j + 16 h -> b + 2j + h
      for (int64_t j = 0; j < 16; ++j) {
        xs[b + 2 * j] = xf[b + j];
        xs[b + 2 * j + 1] = xf[b + j + 16];
      }
  } else {
    xs.swap(xf);
  }
  p.offsets = offsets.element_count() ? offsets.untyped_data() : nullptr;
  p.widened = kWidens && p.M >= kWidenRows;
  if (p.offsets && !p.widened) {  // per-chunk activation sums for the offset term
    const int64_t chunk_len = p.chunk_rows * (bits == 8 ? 1 : 2);
    sums.assign(p.M * p.chunks, 0.f);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t c = 0; c < p.chunks; ++c) {
        const float* xc = xs.data() + m * p.K + c * chunk_len;
        sums[m * p.chunks + c] = std::accumulate(xc, xc + chunk_len, 0.f);
      }
  }
  p.x = xs.data();
  p.xsum = sums.data();
  p.values = values.untyped_data();
  p.scales = scales.untyped_data();
  p.y = y->typed_data();
  return bits == 8 ? RunScales<8>(pool, p, scales.element_type())
                   : RunScales<4>(pool, p, scales.element_type());
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQuantMatmul, jaxllm::QuantMatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [M, K] f32 / bf16
                                  .Arg<xla::ffi::AnyBuffer>()  // values [K, N] s8 / [K/2, N] u8
                                  .Arg<xla::ffi::AnyBuffer>()  // scales [K/G, N]
                                  .Arg<xla::ffi::AnyBuffer>()  // offsets [K/G, N] or [0]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("packing")  // 0 none, 1 interleaved, 2 gguf32
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
