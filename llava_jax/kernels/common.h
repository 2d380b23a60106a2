// Shared by the kernels' translation units: XLA FFI, sharing work among XLA's intra-op threads, and
// sixteen floats as one SIMD value.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace llava_kernels {

// Spin-wait hint for the caller waiting on the last pieces: a decode step's kernels follow each other
// within microseconds, so XLA's intra-op threads are awake and the wait is short.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#else
  std::this_thread::yield();
#endif
}

// Runs body(piece) for every piece in [0, count) on the calling thread and up to threads - 1 of XLA's
// intra-op threads, each taking the next piece from one atomic counter, and returns when all are done.
// `body` is copied into the helpers: it must hold what it reads by value (shared_ptr), since a helper
// that starts after the last piece was taken runs past this call (and then does nothing).
template <typename Body>
void ShareAmongThreads(ffi::ThreadPool& pool, int64_t count, const Body& body) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, body, count] {
    for (int64_t piece; (piece = counters->next.fetch_add(1)) < count;) {
      body(piece);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 0; t + 1 < std::min(threads, count); ++t) pool.Schedule(decltype(run)(run));  // a copy each
  run();
  while (counters->done.load(std::memory_order_acquire) < count) CpuRelax();
}

// Software prefetch of weight row r (of n rows, row_bytes each) into the caches. The products read each
// piece's rows in order, but a piece of a small matrix (SmolLM2's rows are 360 bytes) is too short a
// stream for the hardware prefetchers to get ahead of: reading 30 layers' weights from memory ran 2.6x
// slower than the same products on cache-resident weights. Asking for the row a few rows ahead hides
// the latency.
constexpr int64_t kPrefetchRows = 4;
inline void PrefetchRow(const uint8_t* w, int64_t row_bytes, int64_t r, int64_t n) {
  if (r >= n) return;
  const uint8_t* p = w + r * row_bytes;
  for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

typedef float F16v __attribute__((vector_size(64)));  // one zmm with AVX-512, two ymm with AVX2

inline F16v Load16(const float* p) {
  F16v x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline float Sum16(F16v s) {
  float t = 0.0f;
  for (int j = 0; j < 8; ++j) t += s[j] + s[j + 8];
  return t;
}

}  // namespace llava_kernels
