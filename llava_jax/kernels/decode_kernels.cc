// Decode-step kernels for XLA:CPU as XLA FFI custom calls (see llava_jax/cpu_kernels.py): one-token
// attention over a per-layer KV buffer, and the matrix-vector products of the layers' weights.
//
// Why: a decode step reads every weight once (f32 SmolLM2: 538 MB per token) and is bound by memory
// speed; what decides its time is how fully both cores keep the memory busy and how little they wait
// between the ~120 products. XLA:CPU runs one-token attention as small batched dots plus a softmax
// over the whole static window, well below memory speed, and its products streamed SmolLM2's weights
// at ~21 GB/s on the 2-core VM where one sequential stream per thread reaches ~24 (BENCHMARKS.md).
// Here attention reads only the valid columns, each key / value column once for all query heads that
// share it, and both kernels cut their work into more pieces than there are threads, taken from one
// atomic counter by the calling thread and XLA's intra-op threads.
//
// Attention (`LlavaDecodeAttention`):
//   q        f32 [N, G, Dh]   N = B * Hkv (row-major b, kv head), G query heads per kv head
//   kt       f32 [N, Dh, S]   keys, transposed (as llava_jax.text.KVCache stores them)
//   v        f32 [N, S, Dh]   (kt and v f16 in `LlavaDecodeAttentionF16`: an f16 cache, read as f32)
//   kv_start s32 [B]          first valid column of each row (left padding before it)
//   column   s32 []           column of the new token (already written to kt / v)
//   out      f32 [N, G, Dh]   softmax(q . k / sqrt(Dh)) . v over columns [kv_start[b], column]
// Leading dims may be any shape whose product is N; the last dims must be as above. The columns are
// split into chunks (flash-decoding: each chunk keeps its own max and sum; merged at the end).
//
// Matrix-vector product (`LlavaGemv`):
//   x f32 [M, K] (M small: decode rows), w f32 [N, K] (GGUF's [out, in]) -> y f32 [M, N] = x . w^T

#include <cmath>
#include <vector>

#include "block_formats.h"
#include "common.h"
#include "int8_products.h"

namespace {

using namespace llava_kernels;

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

// Eight floats as one SIMD value (GCC / Clang vector extensions: AVX on x86, NEON pairs on arm64).
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

inline F8 Load8(const float* p) {
  F8 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
// Eight f16 KV values (their bits) -> f32, exactly.
inline F8 Load8(const uint16_t* p) {
  float f[8];
  Halves8ToF(reinterpret_cast<const uint8_t*>(p), f);
  return Load8(f);
}
inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t h) { return HalfToFloat(h); }
inline void Store8(float* p, F8 x) { std::memcpy(p, &x, sizeof x); }
inline F8 Splat8(float x) { return F8{} + x; }

// ExpNonPositive on eight lanes. Rounding to the nearest integer by adding and subtracting 1.5 * 2^23
// (exact for |x * log2 e| < 2^22, here <= 126) gives the same k as nearbyint.
inline F8 Exp8(F8 x) {
  x = x < -87.0f ? Splat8(-87.0f) : x;
  const F8 magic = Splat8(12582912.0f);
  const F8 k = (x * 1.44269504088896341f + magic) - magic;
  const F8 r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  F8 p = Splat8(1.3981999507e-3f);
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I8 bits = (__builtin_convertvector(k, I8) + 127) << 23;
  F8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

constexpr int64_t kMaxHeads = 16;  // query heads per kv head that the vectorized path takes


// KV: the cache's element type, float (f32) or uint16_t (f16 bits, read as f32 exactly).
template <typename KV>
struct Problem {
  const float* q;
  const KV* kt;
  const KV* v;
  const int32_t* kv_start;
  float* out;
  int64_t n, hkv, g, dh, s, col, chunks;
  float scale;
  // Per (row i, chunk c, head h): running max, sum of exponentials, unnormalized output [Dh].
  std::vector<float> m, l, o;

  int64_t lo(int64_t i) const {
    // A padding row (column < kv_start) sees only its own column, as in text.attention_mask.
    return std::min<int64_t>(std::max<int64_t>(kv_start[i / hkv], 0), col);
  }

  // A unit of work: columns [c0, c0 + len) of row i, and where its partial max, sum and output go.
  struct Span {
    int64_t i, c0, len;
    float *m, *l, *o;
  };
  Span Begin(int64_t unit);  // an empty span's partials are written here (max -inf, sum 0)
  // One span, all G heads: partial max, sum and unnormalized output. `scores` is the thread's scratch.
  void Unit(int64_t unit, std::vector<float>& scores);  // any Dh
  template <int NV>
  void UnitVec(int64_t unit, std::vector<float>& scores);  // Dh = 8 * NV
  void Dispatch(int64_t unit);  // the vectorized path where it applies, else Unit
};

template <typename KV>
typename Problem<KV>::Span Problem<KV>::Begin(int64_t unit) {
  const int64_t i = unit / chunks, c = unit % chunks;
  const int64_t first = lo(i), total = col + 1 - first;
  const int64_t c0 = first + total * c / chunks, c1 = first + total * (c + 1) / chunks;
  const size_t at = static_cast<size_t>((i * chunks + c) * g);
  Span span{i, c0, c1 - c0, m.data() + at, l.data() + at, o.data() + at * dh};
  if (span.len <= 0) {
    std::fill(span.m, span.m + g, -INFINITY);
    std::fill(span.l, span.l + g, 0.0f);
    std::fill(span.o, span.o + g * dh, 0.0f);
  }
  return span;
}

template <typename KV>
void Problem<KV>::Unit(int64_t unit, std::vector<float>& scores) {
  const Span span = Begin(unit);
  if (span.len <= 0) return;
  const int64_t i = span.i, c0 = span.c0, len = span.len;
  float *mp = span.m, *lp = span.l, *op = span.o;
  scores.assign(static_cast<size_t>(g * len), 0.0f);
  const float* qi = q + i * g * dh;
  const KV* ki = kt + i * dh * s + c0;
  const KV* vi = v + (i * s + c0) * dh;
  // scores[h][j] = q[h] . k[:, c0 + j] / sqrt(Dh), four key rows per pass, all g heads at once.
  int64_t d = 0;
  for (; d + 4 <= dh; d += 4) {
    const KV *k0 = ki + d * s, *k1 = k0 + s, *k2 = k1 + s, *k3 = k2 + s;
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = qi + h * dh + d;
      const float a0 = qh[0] * scale, a1 = qh[1] * scale, a2 = qh[2] * scale, a3 = qh[3] * scale;
      float* sh = scores.data() + h * len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j)
        sh[j] += a0 * ToF32(k0[j]) + a1 * ToF32(k1[j]) + a2 * ToF32(k2[j]) + a3 * ToF32(k3[j]);
    }
  }
  for (; d < dh; ++d) {
    const KV* krow = ki + d * s;
    for (int64_t h = 0; h < g; ++h) {
      const float a = qi[h * dh + d] * scale;
      float* sh = scores.data() + h * len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) sh[j] += a * ToF32(krow[j]);
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
    const KV* vrow = vi + j * dh;
    for (int64_t h = 0; h < g; ++h) {
      const float p = scores[h * len + j];
      float* oh = op + h * dh;
#pragma omp simd
      for (int64_t e = 0; e < dh; ++e) oh[e] += p * ToF32(vrow[e]);
    }
  }
}

// Unit for Dh = 8 * NV in eight-lane vectors. Scores: eight key rows (head dims) per pass, read as
// eight streams and kept in registers while every query head of the row adds its part; meanwhile two
// lines of values are prefetched per eight columns and pass (Dh = 64: the first half of the values;
// prefetching all of them measured no faster). Values: a block of columns at a time (in L1), one
// head's sums in registers.
template <typename KV>
template <int NV>
void Problem<KV>::UnitVec(int64_t unit, std::vector<float>& scores) {
  constexpr int64_t DH = 8 * NV;
  constexpr int64_t kRows = 8;  // key rows (head dims) per pass: eight streams, eight vectors in registers
  const Span span = Begin(unit);
  if (span.len <= 0) return;
  const int64_t i = span.i, c0 = span.c0, len = span.len;
  float *mp = span.m, *lp = span.l, *op = span.o;
  const int64_t full = len / 8 * 8, padded = full + 8;  // whole vectors of columns; a scalar tail
  scores.assign(static_cast<size_t>(g * padded), 0.0f);
  const float* qi = q + i * g * DH;
  const KV* ki = kt + i * DH * s + c0;
  const KV* vi = v + (i * s + c0) * DH;
  const char* vbytes = reinterpret_cast<const char*>(vi);
  const int64_t vlen = len * DH * static_cast<int64_t>(sizeof(KV));
  int64_t vfetch = 0;  // bytes of values prefetched so far
  float qs[kMaxHeads * DH];  // scaled queries [g][DH] (Dispatch: g <= kMaxHeads)
  for (int64_t e = 0; e < g * DH; ++e) qs[e] = qi[e] * scale;
  for (int64_t d0 = 0; d0 < DH; d0 += kRows) {
    const KV* kr = ki + d0 * s;
    int64_t j = 0;
    for (; j < full; j += 8) {
      F8 k[kRows];
      for (int r = 0; r < kRows; ++r) k[r] = Load8(kr + r * s + j);
      for (int64_t h = 0; h < g; ++h) {
        const float* qh = qs + h * DH + d0;
        F8 acc = Load8(scores.data() + h * padded + j);
        for (int r = 0; r < kRows; ++r) acc += qh[r] * k[r];
        Store8(scores.data() + h * padded + j, acc);
      }
      if (vfetch < vlen) {
        __builtin_prefetch(vbytes + vfetch, 0, 3);
        __builtin_prefetch(vbytes + vfetch + 64, 0, 3);
        vfetch += 128;
      }
    }
    for (; j < len; ++j)  // the last columns, fewer than eight
      for (int64_t h = 0; h < g; ++h) {
        float a = 0.0f;
        for (int r = 0; r < kRows; ++r) a += qs[h * DH + d0 + r] * ToF32(kr[r * s + j]);
        scores[h * padded + j] += a;
      }
  }
  for (int64_t h = 0; h < g; ++h) {
    float* sh = scores.data() + h * padded;
    float mx = sh[0];
    if (full > 0) {
      F8 mx8 = Load8(sh);
      for (int64_t j = 8; j < full; j += 8) {
        const F8 x = Load8(sh + j);
        mx8 = x > mx8 ? x : mx8;
      }
      for (int t = 0; t < 8; ++t) mx = std::max(mx, mx8[t]);
    }
    for (int64_t j = full; j < len; ++j) mx = std::max(mx, sh[j]);
    F8 sum8{};
    for (int64_t j = 0; j < full; j += 8) {
      const F8 e = Exp8(Load8(sh + j) - mx);
      Store8(sh + j, e);
      sum8 += e;
    }
    float sum = 0.0f;
    for (int t = 0; t < 8; ++t) sum += sum8[t];
    for (int64_t j = full; j < len; ++j) sum += (sh[j] = ExpNonPositive(sh[j] - mx));
    mp[h] = mx;
    lp[h] = sum;
  }
  // o[h] = sum_j p[h][j] v[c0 + j], a block of columns (in L1) at a time, one head's sums in registers.
  constexpr int64_t kBlock = 32;
  std::fill(op, op + g * DH, 0.0f);
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t j1 = std::min(len, j0 + kBlock);
    for (int64_t h = 0; h < g; ++h) {
      const float* ph = scores.data() + h * padded;
      F8 acc[NV];
      for (int e = 0; e < NV; ++e) acc[e] = Load8(op + h * DH + 8 * e);
      for (int64_t j = j0; j < j1; ++j) {
        const float p = ph[j];
        const KV* vrow = vi + j * DH;
        for (int e = 0; e < NV; ++e) acc[e] += p * Load8(vrow + 8 * e);
      }
      for (int e = 0; e < NV; ++e) Store8(op + h * DH + 8 * e, acc[e]);
    }
  }
}

template <typename KV>
void Problem<KV>::Dispatch(int64_t unit) {
  thread_local std::vector<float> scores;  // reused across calls on each thread
  if (g > kMaxHeads) return Unit(unit, scores);
  switch (dh) {
    case 8: return UnitVec<1>(unit, scores);
    case 16: return UnitVec<2>(unit, scores);
    case 32: return UnitVec<4>(unit, scores);
    case 64: return UnitVec<8>(unit, scores);
    case 80: return UnitVec<10>(unit, scores);
    case 96: return UnitVec<12>(unit, scores);
    case 128: return UnitVec<16>(unit, scores);
    default: return Unit(unit, scores);
  }
}

// KVType: F32, or F16 (a `-ctk/-ctv f16` cache: the same computation on the exactly converted values).
template <ffi::DataType KVType>
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<KVType> kt,
                           ffi::Buffer<KVType> v, ffi::Buffer<ffi::S32> kv_start, ffi::Buffer<ffi::S32> column,
                           ffi::ResultBuffer<ffi::F32> out) {
  using KV = ffi::NativeType<KVType>;
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

  auto p = std::make_shared<Problem<KV>>();
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

  ShareAmongThreads(pool, n * p->chunks, [p](int64_t unit) { p->Dispatch(unit); });

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

// ---- matrix-vector product ------------------------------------------------------------------------

// One weight row . x (length k): four eight-lane sums hide the multiply-add latency; a scalar tail.
// Row by row, each thread reads its rows as one sequential stream, which the hardware prefetcher
// follows best (measured: ~20% faster than four rows side by side, and than software prefetch).
inline float RowDot(const float* w, int64_t k, const float* x) {
  F8 a{}, b{}, c{}, d{};
  int64_t e = 0;
  for (; e + 32 <= k; e += 32) {
    a += Load8(w + e) * Load8(x + e);
    b += Load8(w + e + 8) * Load8(x + e + 8);
    c += Load8(w + e + 16) * Load8(x + e + 16);
    d += Load8(w + e + 24) * Load8(x + e + 24);
  }
  for (; e + 8 <= k; e += 8) a += Load8(w + e) * Load8(x + e);
  const F8 s = (a + b) + (c + d);
  float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; e < k; ++e) t += w[e] * x[e];
  return t;
}

struct GemvJob {
  const float* x;
  const float* w;
  float* y;
  int64_t m, n, k, pieces;

  // Piece `piece` of the consecutive rows; each weight row is read once (from memory) for all m inputs.
  void Rows(int64_t piece) const {
    const int64_t r0 = n * piece / pieces, r1 = n * (piece + 1) / pieces;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < m; ++i) y[i * n + r] = RowDot(w + r * k, k, x + i * k);
  }
};

constexpr int64_t kGemvPiecesPerThread = 8;  // pieces per thread: evens out a slow thread
constexpr int64_t kGemvMinRows = 16;         // rows per piece at least

ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("gemv: expected x [M, K], w [N, K], y [M, N]");
  auto job = std::make_shared<GemvJob>();
  job->x = x.typed_data(), job->w = w.typed_data(), job->y = y->typed_data();
  job->m = xd[0], job->n = wd[0], job->k = wd[1];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->pieces = std::max<int64_t>(1, std::min(threads * kGemvPiecesPerThread, job->n / kGemvMinRows));
  ShareAmongThreads(pool, job->pieces, [job](int64_t piece) { job->Rows(piece); });
  return ffi::Error::Success();
}


// ---- quantized matrix-vector product --------------------------------------------------------------
//
// `LlavaQGemv`: x f32 [M, K], w u8 [N, row_bytes] (one GGUF row of ggml blocks per output), attribute
// qtype (ggml's type id) -> y f32 [M, N] = x . dequantize(w)^T. Each block is unpacked sixteen weights
// at a time into vector registers (bytes -> nibbles / bit fields -> f32, times the block's scales:
// exactly the values `llava_jax.quants` dequantizes to, since every product there is exact) and
// multiplied straight into every input row's sums. The weights are read from memory once, in their
// packed size (Q4_K: 4.5 bits a weight, 1/7 of f32), and no f32 copy of them is written anywhere; only
// the order of the f32 sums differs from an XLA dot of the dequantized weight. Sixteen weights share
// one scale in every format, so a unit never straddles two. Block layouts: see llava_jax/quants.py.


constexpr int64_t kQGemvMaxRows = 16;  // input rows a call takes (decode batches)

struct QGemvJob {
  const float* x;
  const uint8_t* w;
  float* y;
  int64_t m, n, k, row_bytes, pieces;
  void (*rows)(const QGemvJob&, int64_t, int64_t);
  XDigits digits;  // x as digits, for the integer products (int8_products.h)
};

// Every block of row r unpacked in order (see block_formats.h's UnpackRow), after asking for the row
// kPrefetchRows ahead (PrefetchRow).
template <int T, class S>
inline void UnpackRow(const QGemvJob& job, int64_t r, S& sink) {
  PrefetchRow(job.w, job.row_bytes, r + kPrefetchRows, job.n);
  llava_kernels::UnpackRow<T>(job.w + r * job.row_bytes, job.k, sink);
}

// Rows [r0, r1) for one input row: four accumulators (picked by the constant element offset) hide the
// multiply-add latency.
template <int T>
void QRowsOne(const QGemvJob& job, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    F16v acc0{}, acc1{}, acc2{}, acc3{};
    auto sink = [&](int64_t blk, int e, F16v w) {
      const F16v p = w * Load16(job.x + blk * Fmt<T>::BS + e);
      switch ((e >> 4) & 3) {
        case 0: acc0 += p; break;
        case 1: acc1 += p; break;
        case 2: acc2 += p; break;
        default: acc3 += p; break;
      }
    };
    UnpackRow<T>(job, r, sink);
    job.y[r] = Sum16((acc0 + acc1) + (acc2 + acc3));
  }
}

// Rows [r0, r1) for m inputs: each block unpacked once, multiplied into all m rows' sums.
template <int T>
void QRows(const QGemvJob& job, int64_t r0, int64_t r1) {
  if (job.m == 1) return QRowsOne<T>(job, r0, r1);
  const int64_t m = job.m, k = job.k;
  for (int64_t r = r0; r < r1; ++r) {
    F16v acc[kQGemvMaxRows];
    for (int64_t i = 0; i < m; ++i) acc[i] = F16v{};
    auto sink = [&](int64_t blk, int e, F16v w) {
      const float* xb = job.x + blk * Fmt<T>::BS + e;
      for (int64_t i = 0; i < m; ++i) acc[i] += w * Load16(xb + i * k);
    };
    UnpackRow<T>(job, r, sink);
    for (int64_t i = 0; i < m; ++i) job.y[i * job.n + r] = Sum16(acc[i]);
  }
}

// Rows [r0, r1) of w dequantized into y f32 [N, K] (the prefill path: XLA's dot then reads y).
template <int T>
void DequantRows(const QGemvJob& job, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* out = job.y + r * job.k;
    auto sink = [out](int64_t blk, int e, F16v w) { std::memcpy(out + blk * Fmt<T>::BS + e, &w, sizeof w); };
    UnpackRow<T>(job, r, sink);
  }
}

// (product rows, dequantize rows, block size, block bytes) of a type id; rows == nullptr when the type
// has no kernel.
struct QEntry {
  void (*rows)(const QGemvJob&, int64_t, int64_t);
  void (*dequant)(const QGemvJob&, int64_t, int64_t);
  int bs, ts;
};
template <int T>
struct MakeEntry {
  static QEntry Get() { return {&QRows<T>, &DequantRows<T>, Fmt<T>::BS, Fmt<T>::TS}; }
};

QEntry Lookup(int32_t qtype) { return ForFormat<MakeEntry>(qtype); }

// The integer products (int8_products.h) of the types that have them: (x -> digits, rows); nulls elsewhere.
struct Int8Entry {
  void (*prepare)(QGemvJob&);
  void (*rows)(const QGemvJob&, int64_t, int64_t);
};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <class F>
Int8Entry MakeInt8() {
  return {[](QGemvJob& job) { PrepareDigits<F>(job.x, job.m, job.k, job.digits); },
          [](const QGemvJob& job, int64_t r0, int64_t r1) { Int8Rows<F>(job.w, job.row_bytes, job.digits, job.y, job.n, r0, r1); }};
}
Int8Entry LookupInt8(int32_t qtype) {
  switch (qtype) {
    case kQ4_K: return MakeInt8<Int8Q4K>();
    case kQ6_K: return MakeInt8<Int8Q6K>();
    default: return {};
  }
}
#else
Int8Entry LookupInt8(int32_t) { return {}; }
#endif

// job->rows over all N rows, cut into pieces shared among the caller and XLA's intra-op threads.
void RunRows(ffi::ThreadPool& pool, const std::shared_ptr<QGemvJob>& job) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->pieces = std::max<int64_t>(1, std::min(threads * kGemvPiecesPerThread, job->n / kGemvMinRows));
  ShareAmongThreads(pool, job->pieces, [job](int64_t piece) {
    job->rows(*job, job->n * piece / job->pieces, job->n * (piece + 1) / job->pieces);
  });
}

ffi::Error QGemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                 ffi::ResultBuffer<ffi::F32> y, int32_t qtype, int32_t int8) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const QEntry entry = Lookup(qtype);
  if (entry.rows == nullptr) return ffi::Error::InvalidArgument("qgemv: no kernel for this quant type");
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[0] ||
      xd[0] > kQGemvMaxRows || xd[1] % entry.bs != 0 || wd[1] != xd[1] / entry.bs * entry.ts)
    return ffi::Error::InvalidArgument("qgemv: expected x [M <= 16, K], w [N, K / block * block_bytes], y [M, N]");
  auto job = std::make_shared<QGemvJob>();
  job->x = x.typed_data(), job->w = w.typed_data(), job->y = y->typed_data();
  job->m = xd[0], job->n = wd[0], job->k = xd[1], job->row_bytes = wd[1], job->rows = entry.rows;
  if (const Int8Entry integer = LookupInt8(qtype); int8 != 0 && job->m <= kInt8MaxRows && integer.rows != nullptr) {
    integer.prepare(*job);
    job->rows = integer.rows;
  }
  RunRows(pool, job);
  return ffi::Error::Success();
}


// `LlavaDequantize`: w u8 [N, row_bytes] (GGUF rows of ggml blocks), attribute qtype -> y f32 [N, K]
// with the values `llava_jax.quants` gives (bit-exact), written at memory speed on all threads.
ffi::Error Dequantize(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> y, int32_t qtype) {
  auto wd = w.dimensions(), yd = y->dimensions();
  const QEntry entry = Lookup(qtype);
  if (entry.rows == nullptr) return ffi::Error::InvalidArgument("dequantize: no kernel for this quant type");
  if (wd.size() != 2 || yd.size() != 2 || yd[0] != wd[0] || yd[1] % entry.bs != 0 ||
      wd[1] != yd[1] / entry.bs * entry.ts)
    return ffi::Error::InvalidArgument("dequantize: expected w [N, K / block * block_bytes], y [N, K]");
  auto job = std::make_shared<QGemvJob>();
  job->w = w.typed_data(), job->y = y->typed_data();
  job->m = 0, job->n = wd[0], job->k = yd[1], job->row_bytes = wd[1], job->rows = entry.dequant;
  RunRows(pool, job);
  return ffi::Error::Success();
}

}  // namespace

#define LLAVA_ATTENTION_HANDLER(symbol, kv_type)                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, DecodeAttention<kv_type>,         \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::Buffer<ffi::F32>>()         \
                                    .Arg<ffi::Buffer<kv_type>>()          \
                                    .Arg<ffi::Buffer<kv_type>>()          \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Ret<ffi::Buffer<ffi::F32>>());
LLAVA_ATTENTION_HANDLER(LlavaDecodeAttention, ffi::F32)
LLAVA_ATTENTION_HANDLER(LlavaDecodeAttentionF16, ffi::F16)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlavaGemv, Gemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlavaQGemv, QGemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("int8"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlavaDequantize, Dequantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("qtype"));

// Whether QGemv's `int8` attribute takes effect for Q4_K / Q6_K (built with AVX-512 VNNI).
extern "C" int LlavaInt8Available() { return llava_kernels::kInt8Products ? 1 : 0; }
