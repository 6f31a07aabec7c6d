// Paged decode attention over the engine's page pool, one query per sequence.
//
// Pool layout [P, page, Hkv, D] (token slot = page * page_size + offset); block_tables
// [B, W] int32; lengths [B] int32 (query at position length-1, 0 -> zeros); q [B, Hq, D]
// float32 or bfloat16; pools float32, bfloat16 or int8 (+ per-token-per-head float32
// scales [P, page, Hkv]; a uint16 pool holds bfloat16 bits).  Output [B, Hq, D] float32.
//
// A work item is (sequence, split): it walks the split's keys in chunks of <= kChunk
// tokens of one page.  A chunk is one contiguous run of pool rows (all kv heads), read
// in order with the next chunk prefetched; for each kv head the G query heads of its
// group are the rows of one tile, so every K/V row is read once for all of them and
// widened to float32 in registers; online softmax in float32.  Splits (split-K over
// pages) exist only when there are too few sequences to occupy the threads; their
// partials are merged at the end.

#include <cmath>
#include <vector>

#include "common.h"
#include "simd.h"

namespace jaxllm {
namespace {

constexpr int64_t kChunk = 16;  // keys per softmax step (two 8-lane score vectors)
constexpr float kNegInf = -1e30f;  // finite, as in the XLA path

struct Params {
  int64_t B, Hq, Hkv, G, D, P, page, W;
  const void* q;
  ffi::DataType q_type;
  const void* k;
  const void* v;
  const int32_t* bt;
  const int32_t* lens;
  const float* ks;  // nullptr unless int8
  const float* vs;
  float sm_scale, soft_cap;
  int64_t window;
};

// Key span [lo, hi) of sequence b: the last `window` keys up to its length.
static inline void Span(const Params& p, int64_t b, int64_t* lo, int64_t* hi) {
  int64_t len = std::min<int64_t>(std::max<int32_t>(p.lens[b], 0), p.W * p.page);
  *hi = len;
  *lo = p.window > 0 ? std::max<int64_t>(0, len - p.window) : 0;
}

// One chunk of n <= kChunk keys (pool slots tok0..tok0+n-1) for the G query heads of kv
// head h: updates acc [G, D], m [G], l [G]; s is scratch [G, kChunk].  Plain loops for
// the compiler to vectorise (any D).
template <typename KV, int DT>
void ChunkGeneric(const Params& p, int64_t h, int64_t tok0, int64_t n, const float* q,
                  float* acc, float* m, float* l, float* s) {
  const int64_t D = DT > 0 ? DT : p.D;
  const int64_t G = p.G;
  const KV* kp = static_cast<const KV*>(p.k);
  const KV* vp = static_cast<const KV*>(p.v);
  const bool cap = p.soft_cap > 0.f;
  const float cap_in = cap ? p.sm_scale / p.soft_cap : 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    for (int64_t j = 0; j < n; ++j) {
      const KV* kr = kp + ((tok0 + j) * p.Hkv + h) * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * load<KV>(kr, d);
      if (p.ks) dot *= p.ks[(tok0 + j) * p.Hkv + h];
      if (cap) dot = p.soft_cap * std::tanh(dot * cap_in);
      s[g * kChunk + j] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kChunk;
    float mx = m[g];
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j]);
    const float alpha = std::exp(m[g] - mx);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      sg[j] = std::exp(sg[j] - mx);
      sum += sg[j];
      if (p.vs) sg[j] *= p.vs[(tok0 + j) * p.Hkv + h];
    }
    l[g] = alpha * l[g] + sum;
    m[g] = mx;
    float* ag = acc + g * D;
    if (alpha != 1.f) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
    }
    for (int64_t j = 0; j < n; ++j) {
      const KV* vr = vp + ((tok0 + j) * p.Hkv + h) * D;
      const float w = sg[j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += w * load<KV>(vr, d);
    }
  }
}

// The next chunk's K and V rows, prefetched a few cache lines at a time between the
// current chunk's FMAs: random pages defeat the hardware prefetcher, and a burst of
// prefetches for a whole chunk stalls the loads the current chunk needs.
struct Ahead {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t bytes = 0, at = 0, per = 0;  // per: lines of each pool per Issue()
  inline void Issue() {
    for (int64_t i = 0; i < per && at < bytes; ++i, at += 64) {
      __builtin_prefetch(k + at, 0, 2);
      __builtin_prefetch(v + at, 0, 2);
    }
  }
  inline void Rest() {
    per = bytes;
    Issue();
  }
};

#ifdef JAXLLM_AVX2
// acc[g, d0:d0+8*NV] += sum_j s[g, j] * V[j, d0:...] for GB heads at once: GB*NV
// independent FMA chains per V row (one V load serves all GB heads).
template <typename KV, int GB, int NV>
static inline void PvTile(const KV* const* vrows, int64_t n, const float* s, float* acc,
                          int64_t D, int64_t d0, Ahead* ahead) {
  __m256 a[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int k = 0; k < NV; ++k) a[g][k] = _mm256_loadu_ps(acc + g * D + d0 + 8 * k);
  for (int64_t j = 0; j < n; ++j) {
    ahead->Issue();
    __m256 v[NV];
    for (int k = 0; k < NV; ++k) v[k] = load8<KV>(vrows[j] + d0 + 8 * k);
    for (int g = 0; g < GB; ++g) {
      const __m256 w = _mm256_set1_ps(s[g * kChunk + j]);
      for (int k = 0; k < NV; ++k) a[g][k] = _mm256_fmadd_ps(w, v[k], a[g][k]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int k = 0; k < NV; ++k) _mm256_storeu_ps(acc + g * D + d0 + 8 * k, a[g][k]);
}

template <typename KV, int GB>
static inline void PvHeads(const KV* const* vrows, int64_t n, const float* s, float* acc,
                           int64_t D, Ahead* ahead) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) PvTile<KV, GB, 4>(vrows, n, s, acc, D, d0, ahead);
  for (; d0 < D; d0 += 8) PvTile<KV, GB, 1>(vrows, n, s, acc, D, d0, ahead);
}

// ChunkGeneric for D % 8 == 0 with explicit 8-lane vectors: scores for 8 keys at a time
// use 8 independent FMA chains reduced together (hsum8x8), the exponentials are
// vectorised, and P.V keeps up to 3 heads x 4 vectors of accumulators in registers.
template <typename KV, int DT>
void ChunkAvx2(const Params& p, int64_t h, int64_t tok0, int64_t n, const float* q,
               float* acc, float* m, float* l, float* s, Ahead* ahead) {
  const int64_t D = DT > 0 ? DT : p.D;
  const int64_t G = p.G;
  const KV* kp = static_cast<const KV*>(p.k);
  const KV* vp = static_cast<const KV*>(p.v);
  const bool cap = p.soft_cap > 0.f;
  const float cap_in = cap ? p.sm_scale / p.soft_cap : 0.f;
  const KV* krows[kChunk];
  const KV* vrows[kChunk];
  for (int64_t j = 0; j < kChunk; ++j) {  // rows past n repeat row 0 (results unused)
    const int64_t t = tok0 + (j < n ? j : 0);
    krows[j] = kp + (t * p.Hkv + h) * D;
    vrows[j] = vp + (t * p.Hkv + h) * D;
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      ahead->Issue();
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8<KV>(krows[j0 + j] + d), a[j]);
      }
      _mm256_storeu_ps(s + g * kChunk + j0, hsum8x8(a));
    }
  }
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kChunk;
    if (p.ks || cap) {
      for (int64_t j = 0; j < n; ++j) {  // scales, soft cap
        float x = sg[j];
        if (p.ks) x *= p.ks[(tok0 + j) * p.Hkv + h];
        if (cap) x = p.soft_cap * std::tanh(x * cap_in);
        sg[j] = x;
      }
    }
    // lanes >= n -> p = 0
    const __m256 neg = _mm256_set1_ps(kNegInf);
    const __m256 s0 = _mm256_blendv_ps(neg, _mm256_loadu_ps(sg), _mm256_cmp_ps(
        lane, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ));
    const __m256 s1 = _mm256_blendv_ps(neg, _mm256_loadu_ps(sg + 8), _mm256_cmp_ps(
        lane, _mm256_set1_ps(static_cast<float>(n - 8)), _CMP_LT_OQ));
    const float mx = std::max(m[g], hmax8(_mm256_max_ps(s0, s1)));
    const __m256 mv = _mm256_set1_ps(mx);
    const __m256 p0 = exp8(_mm256_sub_ps(s0, mv)), p1 = exp8(_mm256_sub_ps(s1, mv));
    const float alpha = std::exp(m[g] - mx);
    l[g] = alpha * l[g] + hadd8(_mm256_add_ps(p0, p1));
    m[g] = mx;
    _mm256_storeu_ps(sg, p0);
    _mm256_storeu_ps(sg + 8, p1);
    if (p.vs) {
      for (int64_t j = 0; j < n; ++j) sg[j] *= p.vs[(tok0 + j) * p.Hkv + h];
    }
    if (alpha != 1.f) {
      float* ag = acc + g * D;
      const __m256 av = _mm256_set1_ps(alpha);
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_storeu_ps(ag + d, _mm256_mul_ps(av, _mm256_loadu_ps(ag + d)));
      }
    }
  }
  int64_t g = 0;
  for (; g + 3 <= G; g += 3) PvHeads<KV, 3>(vrows, n, s + g * kChunk, acc + g * D, D, ahead);
  if (G - g == 2) PvHeads<KV, 2>(vrows, n, s + g * kChunk, acc + g * D, D, ahead);
  if (G - g == 1) PvHeads<KV, 1>(vrows, n, s + g * kChunk, acc + g * D, D, ahead);
}
#endif

// The Hq pre-scaled query rows of sequence b, widened to float32.
static void LoadQuery(const Params& p, int64_t b, float* q) {
  const float scale = p.soft_cap > 0.f ? 1.f : p.sm_scale;  // soft cap scales the score
  const int64_t n = p.Hq * p.D, base = b * p.Hq * p.D;
  if (p.q_type == ffi::DataType::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(p.q) + base;
    for (int64_t i = 0; i < n; ++i) q[i] = bf16_to_f32(src[i]) * scale;
  } else {
    const float* src = static_cast<const float*>(p.q) + base;
    for (int64_t i = 0; i < n; ++i) q[i] = src[i] * scale;
  }
}

// All heads of sequence b over keys [t_lo, t_hi), chunk by chunk: a chunk's keys of every
// kv head are one contiguous run of the pool (whole token rows), read once in order.
template <typename KV, int DT>
void AttendRange(const Params& p, int64_t b, int64_t t_lo, int64_t t_hi, const float* q,
                 float* acc, float* m, float* l, float* s) {
  const int64_t D = p.D, G = p.G;
  const int64_t row_bytes = p.Hkv * D * static_cast<int64_t>(sizeof(KV));
  auto slot = [&](int64_t pos, int64_t* n) {  // pool slot of pos; keys left in its chunk
    const int64_t pg = pos / p.page, off = pos % p.page;
    *n = std::min({p.page - off, t_hi - pos, kChunk});
    int64_t pid = p.bt[b * p.W + pg];
    pid = std::min<int64_t>(std::max<int64_t>(pid, 0), p.P - 1);
    return pid * p.page + off;
  };
  int64_t n = 0;
  int64_t tok0 = t_lo < t_hi ? slot(t_lo, &n) : 0;
  for (int64_t pos = t_lo; pos < t_hi;) {
    int64_t nn = 0, next = 0;
    Ahead ahead;
    if (pos + n < t_hi) {
      next = slot(pos + n, &nn);
      ahead.k = static_cast<const char*>(p.k) + next * row_bytes;
      ahead.v = static_cast<const char*>(p.v) + next * row_bytes;
      ahead.bytes = nn * row_bytes;
      // ChunkAvx2's Issue() calls: per kv head, G per 8 scores and one per V row and tile
      const int64_t issues = p.Hkv * (G * ((n + 7) / 8) + n * ((G + 2) / 3) * ((D + 31) / 32));
      ahead.per = (ahead.bytes / 64 + issues - 1) / issues;
    }
    for (int64_t h = 0; h < p.Hkv; ++h) {
      const float* qh = q + h * G * D;
      float* ah = acc + h * G * D;
#ifdef JAXLLM_AVX2
      if (D % 8 == 0) {
        ChunkAvx2<KV, DT>(p, h, tok0, n, qh, ah, m + h * G, l + h * G, s, &ahead);
        continue;
      }
#endif
      ChunkGeneric<KV, DT>(p, h, tok0, n, qh, ah, m + h * G, l + h * G, s);
    }
    ahead.Rest();
    pos += n;
    tok0 = next;
    n = nn;
  }
}

template <typename KV, int DT>
void Run(ffi::ThreadPool& pool, const Params& p, float* out) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Split-K only when the sequences cannot give ~4 items per thread; splits of at least
  // 8 pages keep the merge small next to the keys read.
  int64_t max_pages = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    int64_t lo, hi;
    Span(p, b, &lo, &hi);
    if (hi > lo) max_pages = std::max(max_pages, (hi - 1) / p.page - lo / p.page + 1);
  }
  int64_t splits = 1;
  if (p.B < 4 * threads) {
    splits = std::min<int64_t>((4 * threads + p.B - 1) / p.B, max_pages / 8);
    splits = std::max<int64_t>(splits, 1);
  }
  const int64_t HD = p.Hq * p.D, Hq = p.Hq, D = p.D;
  const int64_t part = HD + 2 * Hq;  // acc, m, l of one item
  std::vector<float> partials(splits > 1 ? p.B * splits * part : 0);

  auto work = [&](int64_t i) {
    const int64_t sp = i % splits, b = i / splits;
    int64_t lo, hi;
    Span(p, b, &lo, &hi);
    std::vector<float> buf(HD + part + p.G * kChunk);
    float* q = buf.data();
    float* acc = q + HD;
    float* m = acc + HD;
    float* l = m + Hq;
    float* s = l + Hq;
    std::fill(m, m + Hq, kNegInf);
    if (splits > 1 && hi > lo) {  // this split's whole pages of the span
      const int64_t p0 = lo / p.page, np = (hi - 1) / p.page - p0 + 1;
      const int64_t per = (np + splits - 1) / splits;
      const int64_t a = std::max(lo, (p0 + sp * per) * p.page);
      const int64_t e = std::min(hi, (p0 + (sp + 1) * per) * p.page);
      lo = a;
      hi = std::max(a, e);
    }
    if (hi > lo) {
      LoadQuery(p, b, q);
      AttendRange<KV, DT>(p, b, lo, hi, q, acc, m, l, s);
    }
    if (splits > 1) {
      std::copy(acc, acc + part, partials.data() + i * part);
      return;
    }
    float* o = out + b * HD;
    for (int64_t r = 0; r < Hq; ++r) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t d = 0; d < D; ++d) o[r * D + d] = acc[r * D + d] * inv;
    }
  };
  ParallelFor(pool, p.B * splits, work);
  if (splits == 1) return;
  // Merge the splits of each sequence: rescale to the common max, then normalise.
  for (int64_t b = 0; b < p.B; ++b) {
    float* o = out + b * HD;
    for (int64_t r = 0; r < Hq; ++r) {
      float mx = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) {
        mx = std::max(mx, partials[(b * splits + sp) * part + HD + r]);
      }
      float l = 0.f;
      std::fill(o + r * D, o + (r + 1) * D, 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float* ps = partials.data() + (b * splits + sp) * part;
        const float w = std::exp(ps[HD + r] - mx);
        l += w * ps[HD + Hq + r];
        for (int64_t d = 0; d < D; ++d) o[r * D + d] += w * ps[r * D + d];
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
    }
  }
}

template <typename KV>
void RunD(ffi::ThreadPool& pool, const Params& p, float* out) {
  // Fixed head dims let the compiler unroll the D loops fully.
  switch (p.D) {
    case 64: return Run<KV, 64>(pool, p, out);
    case 128: return Run<KV, 128>(pool, p, out);
    default: return Run<KV, 0>(pool, p, out);
  }
}

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::S32> bt,
                           ffi::Buffer<ffi::S32> lens, ffi::Buffer<ffi::F32> ks,
                           ffi::Buffer<ffi::F32> vs, float sm_scale, float soft_cap,
                           int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), btd = bt.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || btd.size() != 2) {
    return ffi::Error::InvalidArgument("paged_decode: expected q [B,Hq,D], pages [P,page,Hkv,D], "
                                       "block_tables [B,W]");
  }
  Params p;
  p.B = qd[0];
  p.Hq = qd[1];
  p.D = qd[2];
  p.P = kd[0];
  p.page = kd[1];
  p.Hkv = kd[2];
  p.W = btd[1];
  if (kd[3] != p.D || p.Hkv <= 0 || p.Hq % p.Hkv != 0 || btd[0] != p.B ||
      k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("paged_decode: inconsistent shapes or dtypes");
  }
  p.G = p.Hq / p.Hkv;
  p.q = q.untyped_data();
  p.q_type = q.element_type();
  if (p.q_type != ffi::DataType::F32 && p.q_type != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("paged_decode: q must be float32 or bfloat16");
  }
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.bt = bt.typed_data();
  p.lens = lens.typed_data();
  const bool int8 = k.element_type() == ffi::DataType::S8;
  p.ks = int8 ? ks.typed_data() : nullptr;
  p.vs = int8 ? vs.typed_data() : nullptr;
  if (int8 && (ks.element_count() != static_cast<size_t>(p.P * p.page * p.Hkv) ||
               vs.element_count() != static_cast<size_t>(p.P * p.page * p.Hkv))) {
    return ffi::Error::InvalidArgument("paged_decode: int8 pools need scales [P,page,Hkv]");
  }
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = window;
  float* o = out->typed_data();
  if (p.B == 0) return ffi::Error::Success();
  switch (k.element_type()) {
    case ffi::DataType::F32: RunD<float>(pool, p, o); break;
    case ffi::DataType::BF16:
    case ffi::DataType::U16:  // bfloat16 bits kept in a uint16 pool (XLA:CPU scatter)
      RunD<uint16_t>(pool, p, o);
      break;
    case ffi::DataType::S8: RunD<int8_t>(pool, p, o); break;
    default:
      return ffi::Error::InvalidArgument(
          "paged_decode: pools must be f32, bf16 (or its bits as u16) or int8");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPagedDecodeAttention, jaxllm::PagedDecodeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k_pages
                                  .Arg<xla::ffi::AnyBuffer>()  // v_pages
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // block_tables
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // lengths
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // k_scales
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // v_scales
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("window")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
