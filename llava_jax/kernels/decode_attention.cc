// Decode attention for XLA:CPU as an XLA FFI custom call (see llava_jax/cpu_kernels.py).
//
// One new query token per row attends to the valid columns of a per-layer KV buffer:
//   q        f32 [N, G, Dh]   N = B * Hkv (row-major b, kv head), G query heads per kv head
//   kt       f32 [N, Dh, S]   keys, transposed (as llava_jax.text.KVCache stores them)
//   v        f32 [N, S, Dh]
//   kv_start s32 [B]          first valid column of each row (left padding before it)
//   column   s32 []           column of the new token (already written to kt / v)
//   out      f32 [N, G, Dh]   softmax(q . k / sqrt(Dh)) . v over columns [kv_start[b], column]
// Leading dims may be any shape whose product is N; the last dims must be as above.
//
// Why: XLA:CPU runs decode attention as small batched dots plus a softmax over the whole static
// window, well below memory speed. Here only the valid columns are read, each key / value column once
// for all G query heads that share it, and the columns are split into chunks shared by XLA's intra-op
// threads (flash-decoding: each chunk keeps its own max and sum; the chunks are merged at the end).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinChunk = 128;  // columns; smaller chunks cost more in scheduling than they save

// e^x for x <= 0 (softmax exponents), vectorizable: x = k ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for e^r, then 2^k through the exponent bits. Relative error < 2e-7 (about 1-2 ulp, like
// XLA's own exp); inputs below -87 are clamped there (e^-87 ~ 1.6e-38, nothing next to the max's
// e^0 = 1 in the same sum). glibc's expf would be called once per lane, not vectorized.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 in two parts (Cody-Waite)
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Problem {
  const float* q;
  const float* kt;
  const float* v;
  const int32_t* kv_start;
  float* out;
  int64_t n, hkv, g, dh, s, col, chunks;
  float scale;
  // Per (row i, chunk c, head h): running max, sum of exponentials, unnormalized output [Dh].
  std::vector<float> m, l, o;
  std::atomic<int64_t> next{0}, done{0};

  int64_t lo(int64_t i) const {
    // A padding row (column < kv_start) sees only its own column, as in text.attention_mask.
    return std::min<int64_t>(std::max<int64_t>(kv_start[i / hkv], 0), col);
  }

  // Columns [c0, c1) of row i, all G heads: partial max, sum and unnormalized output.
  void Unit(int64_t unit, std::vector<float>& scores);
  void RunUnits(std::vector<float>& scores) {
    for (int64_t u; (u = next.fetch_add(1)) < n * chunks;) {
      Unit(u, scores);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void Problem::Unit(int64_t unit, std::vector<float>& scores) {
  const int64_t i = unit / chunks, c = unit % chunks;
  const int64_t first = lo(i), total = col + 1 - first;
  const int64_t c0 = first + total * c / chunks, c1 = first + total * (c + 1) / chunks;
  const int64_t len = c1 - c0;
  const size_t at = static_cast<size_t>((i * chunks + c) * g);
  float* mp = m.data() + at;
  float* lp = l.data() + at;
  float* op = o.data() + at * dh;
  if (len <= 0) {
    std::fill(mp, mp + g, -INFINITY);
    std::fill(lp, lp + g, 0.0f);
    std::fill(op, op + g * dh, 0.0f);
    return;
  }
  scores.assign(static_cast<size_t>(g * len), 0.0f);
  const float* qi = q + i * g * dh;
  const float* ki = kt + i * dh * s + c0;
  const float* vi = v + (i * s + c0) * dh;
  // scores[h][j] = q[h] . k[:, c0 + j] / sqrt(Dh), four key rows per pass, all g heads at once.
  int64_t d = 0;
  for (; d + 4 <= dh; d += 4) {
    const float *k0 = ki + d * s, *k1 = k0 + s, *k2 = k1 + s, *k3 = k2 + s;
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = qi + h * dh + d;
      const float a0 = qh[0] * scale, a1 = qh[1] * scale, a2 = qh[2] * scale, a3 = qh[3] * scale;
      float* sh = scores.data() + h * len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) sh[j] += a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j];
    }
  }
  for (; d < dh; ++d) {
    const float* krow = ki + d * s;
    for (int64_t h = 0; h < g; ++h) {
      const float a = qi[h * dh + d] * scale;
      float* sh = scores.data() + h * len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) sh[j] += a * krow[j];
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    float* sh = scores.data() + h * len;
    float mx = sh[0];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < len; ++j) mx = std::max(mx, sh[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      sh[j] = ExpNonPositive(sh[j] - mx);
      sum += sh[j];
    }
    mp[h] = mx;
    lp[h] = sum;
  }
  // o[h] = sum_j p[h][j] v[c0 + j]: one pass over the values for all g heads.
  std::fill(op, op + g * dh, 0.0f);
  for (int64_t j = 0; j < len; ++j) {
    const float* vrow = vi + j * dh;
    for (int64_t h = 0; h < g; ++h) {
      const float p = scores[h * len + j];
      float* oh = op + h * dh;
#pragma omp simd
      for (int64_t e = 0; e < dh; ++e) oh[e] += p * vrow[e];
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kt,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> kv_start, ffi::Buffer<ffi::S32> column,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = kt.dimensions(), vd = v.dimensions();
  if (qd.size() < 2 || kd.size() < 2 || vd.size() < 2)
    return ffi::Error::InvalidArgument("decode_attention: q, kt, v need rank >= 2");
  const int64_t dh = qd[qd.size() - 1], g = qd[qd.size() - 2], s = kd[kd.size() - 1];
  const int64_t n = static_cast<int64_t>(q.element_count()) / (g * dh);
  const int64_t b = static_cast<int64_t>(kv_start.element_count());
  if (kd[kd.size() - 2] != dh || vd[vd.size() - 1] != dh || vd[vd.size() - 2] != s ||
      static_cast<int64_t>(kt.element_count()) != n * dh * s ||
      static_cast<int64_t>(v.element_count()) != n * s * dh || b < 1 || n % b != 0)
    return ffi::Error::InvalidArgument("decode_attention: inconsistent q / kt / v / kv_start shapes");
  const int64_t col = column.typed_data()[0];
  if (col < 0 || col >= s) return ffi::Error::InvalidArgument("decode_attention: column outside the KV buffer");

  auto p = std::make_shared<Problem>();
  p->q = q.typed_data();
  p->kt = kt.typed_data();
  p->v = v.typed_data();
  p->kv_start = kv_start.typed_data();
  p->out = out->typed_data();
  p->n = n, p->hkv = n / b, p->g = g, p->dh = dh, p->s = s, p->col = col;
  p->scale = 1.0f / std::sqrt(static_cast<float>(dh));
  // Enough chunks that every thread has work (and a row's imbalance is small), none tiny.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t want = (2 * threads + n - 1) / n;
  p->chunks = std::max<int64_t>(1, std::min<int64_t>(want, (col + 1) / kMinChunk));
  const size_t parts = static_cast<size_t>(n * p->chunks * g);
  p->m.resize(parts), p->l.resize(parts), p->o.resize(parts * dh);

  const int64_t units = n * p->chunks;
  const int64_t helpers = std::min<int64_t>(threads, units) - 1;
  // Helpers hold the problem by shared_ptr: one that starts after all units are taken just returns.
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([p] {
      std::vector<float> scores;
      p->RunUnits(scores);
    });
  std::vector<float> scores;
  p->RunUnits(scores);
  while (p->done.load(std::memory_order_acquire) < units) std::this_thread::yield();

  // Merge the chunks of each (row, head): rescale to the common max, then normalize.
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < g; ++h) {
      float mx = -INFINITY;
      for (int64_t c = 0; c < p->chunks; ++c) mx = std::max(mx, p->m[(i * p->chunks + c) * g + h]);
      float* oh = p->out + (i * g + h) * dh;
      std::fill(oh, oh + dh, 0.0f);
      float sum = 0.0f;
      for (int64_t c = 0; c < p->chunks; ++c) {
        const size_t at = static_cast<size_t>((i * p->chunks + c) * g + h);
        if (p->l[at] == 0.0f) continue;
        const float w = std::exp(p->m[at] - mx);
        sum += w * p->l[at];
        const float* oc = p->o.data() + at * dh;
        for (int64_t e = 0; e < dh; ++e) oh[e] += w * oc[e];
      }
      const float inv = 1.0f / sum;
      for (int64_t e = 0; e < dh; ++e) oh[e] *= inv;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlavaDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
