// Shared helpers for the CPU kernels: element loads and a work-sharing loop on XLA's
// intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXLLM_PAUSE() _mm_pause()
#else
#define JAXLLM_PAUSE() ((void)0)
#endif

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

namespace ffi = xla::ffi;

// bfloat16 is the top half of a float32: widening is a 16-bit shift.
static inline float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
static inline float load(const T* p, int64_t i);
template <>
inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float load<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
template <>
inline float load<int8_t>(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }

// Runs fn(i) for i in [0, n) on up to `threads` threads of XLA's pool, the calling thread
// included.  The caller takes items too and waits only for items to finish (never for a
// task to start), so it cannot deadlock when the pool is busy or runs tasks inline.
struct WorkState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;

  void Drain() {
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      (*fn)(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

static inline void ParallelFor(ffi::ThreadPool& pool, int64_t n,
                               const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t helpers = std::min<int64_t>(threads, n) - 1;

  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  // Shared ownership: a helper task may start after the caller has returned.
  auto state = std::make_shared<WorkState>();
  state->n = n;
  state->fn = &fn;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state]() { state->Drain(); });
  }
  // Give the core to a helper woken onto it (on a busy 2-core machine it otherwise
  // waits until this thread has done all the items alone).
  std::this_thread::yield();
  state->Drain();
  int spins = 0;
  while (state->done.load(std::memory_order_acquire) < n) {
    if (++spins < 2048) {
      JAXLLM_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace jaxllm
