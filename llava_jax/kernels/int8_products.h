// Decode products of Q4_K / Q6_K weights with integer dot products (AVX-512 VNNI `vpdpbusd`): the
// unsigned 4 / 6-bit weights times x held as three signed 7-bit digits, summed exactly in int32.
//
// Why: the f32 path (decode_kernels.cc's QRows) spends ~4 vector instructions on every sixteen weights
// (widen, convert, scale, multiply-add) and is compute-bound on 2 cores (Q4_K: ~11 G weights/s, under
// memory speed). One `vpdpbusd` multiplies 64 weight bytes by 64 digit bytes and adds each four products
// into a 32-bit lane; three of them (one per digit) plus two shifts cover 64 weights.
//
// x: every group of 16 values gets a scale s = max|x| * 2^-20, and x / s is rounded to an integer X with
// |X| <= 2^20, written as X = a0 * 2^14 + a1 * 2^7 + a2 with a0, a1, a2 in [-64, 64]. So x is rounded to
// 21 bits relative to the largest value of its group (error <= max|x| * 2^-21 per value), the only
// rounding besides f32's own: the integer sums are exact, then each lane is scaled in f32. The offset
// terms (Q4_K's mins, Q6_K's -32) use f32 sums of x itself. Per output row:
//   y = sum over lanes (s_group * d_sub * int_lane)  -  sum over groups (offset_group * sum(x_group))
// Digits and lane order: each 256-value block is read as four 64-byte chunks of weight bytes; chunk v's
// byte j holds the weight of element `ElementOf(v, j)`, and x's digits are stored in the same order.

#pragma once

#include <cmath>
#include <vector>

#include "block_formats.h"

namespace llava_kernels {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kInt8Products = true;
#else
constexpr bool kInt8Products = false;
#endif

constexpr int64_t kChunk = 64;       // weight bytes / x digits per vpdpbusd
constexpr int64_t kChunkBytes = 192;  // three digit vectors
constexpr int64_t kGroup = 16;       // values per x scale
// Input rows the integer path takes: it costs ~2 instructions per row per sixteen weights against the
// f32 path's one multiply-add (which shares each unpacked weight among the rows), so from three rows
// on the f32 path is faster.
constexpr int64_t kInt8MaxRows = 2;

// x [m, k] as digits in a format's chunk order (k a multiple of 256).
struct XDigits {
  int64_t m = 0, k = 0;
  std::vector<int8_t> digits;      // [m][k / 64][3][64]: a0, a1, a2
  std::vector<float> lane_scale;   // [m][k / 64][16]: the scale of the group each lane's four values are in
  std::vector<float> group_sum;    // [m][k / 16]: f32 sum of each group of 16 (natural order)
  const int8_t* Digits(int64_t i, int64_t chunk) const { return digits.data() + (i * (k / kChunk) + chunk) * kChunkBytes; }
  const float* LaneScale(int64_t i, int64_t chunk) const { return lane_scale.data() + (i * (k / kChunk) + chunk) * 16; }
  const float* Sums(int64_t i, int64_t group) const { return group_sum.data() + i * (k / kGroup) + group; }
};

// Rounds x [m, k] to digits; F gives the element order of each 256-value block's four chunks.
template <class F>
void PrepareDigits(const float* x, int64_t m, int64_t k, XDigits& out) {
  out.m = m, out.k = k;
  out.digits.resize(static_cast<size_t>(m * k * 3));
  out.lane_scale.resize(static_cast<size_t>(m * (k / kChunk) * 16));
  out.group_sum.resize(static_cast<size_t>(m * (k / kGroup)));
  std::vector<int32_t> whole(static_cast<size_t>(k));  // X of one row, natural order
  std::vector<float> scale(static_cast<size_t>(k / kGroup));
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    for (int64_t g = 0; g < k / kGroup; ++g) {
      float mx = 0.0f, sum = 0.0f;
      for (int64_t j = 0; j < kGroup; ++j) {
        mx = std::max(mx, std::fabs(xi[g * kGroup + j]));
        sum += xi[g * kGroup + j];
      }
      // a NaN / inf in the group: scale NaN, so the output is NaN as the f32 product's would be (or inf)
      const bool finite = std::isfinite(mx) && std::isfinite(sum);
      const float s = finite ? mx * 0x1p-20f : NAN;
      const float inv = (finite && s > 0.0f) ? 1.0f / s : 0.0f;  // s = 0: mx underflowed, x ~ 0
      for (int64_t j = 0; j < kGroup; ++j) {
        const float q = std::nearbyint(xi[g * kGroup + j] * inv);
        whole[g * kGroup + j] = static_cast<int32_t>(std::max(-1048576.0f, std::min(1048576.0f, q)));
      }
      scale[g] = s;
      out.group_sum[i * (k / kGroup) + g] = sum;
    }
    for (int64_t c = 0; c < k / kChunk; ++c) {
      const int64_t base = (c / 4) * 256;
      const int v = static_cast<int>(c % 4);
      int8_t* d = out.digits.data() + (i * (k / kChunk) + c) * kChunkBytes;
      for (int j = 0; j < kChunk; ++j) {
        const int32_t big = whole[base + F::ElementOf(v, j)];
        const int32_t a2 = ((big + 64) & 127) - 64, rest = (big - a2) >> 7;
        const int32_t a1 = ((rest + 64) & 127) - 64, a0 = (rest - a1) >> 7;
        d[j] = static_cast<int8_t>(a0), d[kChunk + j] = static_cast<int8_t>(a1), d[2 * kChunk + j] = static_cast<int8_t>(a2);
      }
      float* ls = out.lane_scale.data() + (i * (k / kChunk) + c) * 16;
      for (int lane = 0; lane < 16; ++lane) ls[lane] = scale[(base + F::ElementOf(v, 4 * lane)) / kGroup];
    }
  }
}

// Q4_K: 16 bytes of scales then 128 bytes of nibbles; bytes 32c..32c+31 hold elements 64c + l (low
// nibble) and 64c + 32 + l (high). A 64-byte load covers c and c + 1: its low nibbles are elements
// [128h, +32) and [128h + 64, +32), its high nibbles [128h + 32, +32) and [128h + 96, +32).
struct Int8Q4K {
  static constexpr int TS = Fmt<kQ4_K>::TS;
  static constexpr int ElementOf(int v, int j) { return 128 * (v / 2) + 32 * (v % 2) + (j < 32 ? j : j + 32); }
};
// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d. Chunk v is elements
// [64v, 64v + 64) in order.
struct Int8Q6K {
  static constexpr int TS = Fmt<kQ6_K>::TS;
  static constexpr int ElementOf(int v, int j) { return 64 * v + j; }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// One unpacked block: four chunks of unsigned weight bytes, each lane's multiplier (d times its
// sub-block's scale) per chunk, and the offset per group of 16 (subtracted times the group's x sum).
struct Int8Block {
  __m512i w[4];
  __m512 mul[4];
  __m512 offset;
};

template <class F>
inline __m512i LaneIndex(int v, int per) {  // lane -> index of the scale of its sub-block of `per` values
  alignas(64) int32_t idx[16];
  for (int lane = 0; lane < 16; ++lane) idx[lane] = F::ElementOf(v, 4 * lane) / per;
  return _mm512_load_si512(idx);
}

inline void UnpackInt8(const uint8_t* b, Int8Q4K, Int8Block& out) {
  alignas(64) float dm[16];  // d * scale[0..7], dmin * min[0..7]
  ScalesK4(b, dm);
  const __m512 tab = _mm512_load_ps(dm);
  static const __m512i idx[4] = {LaneIndex<Int8Q4K>(0, 32), LaneIndex<Int8Q4K>(1, 32), LaneIndex<Int8Q4K>(2, 32),
                                 LaneIndex<Int8Q4K>(3, 32)};
  static const __m512i min_idx = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    const __m512i v = _mm512_loadu_si512(b + 16 + 64 * h);
    out.w[2 * h] = _mm512_and_si512(v, lo4);
    out.w[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
  }
  for (int v = 0; v < 4; ++v) out.mul[v] = _mm512_permutexvar_ps(idx[v], tab);
  out.offset = _mm512_permutexvar_ps(min_idx, tab);  // group g: dmin * min[g / 2]
}

inline void UnpackInt8(const uint8_t* b, Int8Q6K, Int8Block& out) {
  const __m512 tab = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                       reinterpret_cast<const __m128i*>(b + 192)))),
                                   _mm512_set1_ps(F16At(b + 208)));  // d * scale[0..15]
  static const __m512i idx[4] = {LaneIndex<Int8Q6K>(0, 16), LaneIndex<Int8Q6K>(1, 16), LaneIndex<Int8Q6K>(2, 16),
                                 LaneIndex<Int8Q6K>(3, 16)};
  const __m512i lo4 = _mm512_set1_epi8(0x0F), hi2 = _mm512_set1_epi8(0x30);
  // 16-bit shift counts: the low 32 bytes take one shift, the high 32 another
  const __m512i shl_12 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);  // q1: <<4, q2: <<2
  const __m512i shr_34 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);  // q3: >>0, q4: >>2
  for (int h = 0; h < 2; ++h) {
    const __m512i ql = _mm512_loadu_si512(b + 64 * h);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
    const __m512i hi12 = _mm512_and_si512(_mm512_sllv_epi16(qh, shl_12), hi2);
    const __m512i hi34 = _mm512_and_si512(_mm512_srlv_epi16(qh, shr_34), hi2);
    out.w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, lo4), hi12);
    out.w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), lo4), hi34);
  }
  for (int v = 0; v < 4; ++v) out.mul[v] = _mm512_permutexvar_ps(idx[v], tab);
  out.offset = _mm512_mul_ps(tab, _mm512_set1_ps(32.0f));  // group g: 32 * d * scale[g]
}

// The exact integer sum of one chunk's 64 weights times x's digits, four products a lane.
inline __m512i ChunkDot(__m512i w, const int8_t* digits) {
  __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(digits));
  t = _mm512_slli_epi32(t, 7);
  t = _mm512_dpbusd_epi32(t, w, _mm512_loadu_si512(digits + kChunk));
  t = _mm512_slli_epi32(t, 7);
  return _mm512_dpbusd_epi32(t, w, _mm512_loadu_si512(digits + 2 * kChunk));
}

// Chunk v of an unpacked block times x's digits `d` (the block's four chunks), in f32: the integer lane
// sums times their x scales `ls` and their weight multipliers, added to acc.
inline __m512 ChunkTerm(const Int8Block& blk, int v, const int8_t* d, const float* ls, __m512 acc) {
  const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(ChunkDot(blk.w[v], d + v * kChunkBytes)), _mm512_loadu_ps(ls + 16 * v));
  return _mm512_fmadd_ps(t, blk.mul[v], acc);
}

inline float SumPs(__m512 v) { return _mm512_reduce_add_ps(v); }

// y[i * n + r] for rows [r0, r1) of w [n, k / 256 blocks of F::TS bytes] and the m rows of `xd`.
template <class F>
void Int8Rows(const uint8_t* w, int64_t row_bytes, const XDigits& xd, float* y, int64_t n, int64_t r0, int64_t r1) {
  const int64_t m = xd.m, blocks = xd.k / 256;
  Int8Block blk;
  if (m == 1) {  // one accumulator per chunk: the four multiply-adds of a block do not wait on each other
    for (int64_t r = r0; r < r1; ++r) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      __m512 off = _mm512_setzero_ps();
      PrefetchRow(w, row_bytes, r + kPrefetchRows, n);
      const uint8_t* row = w + r * row_bytes;
      for (int64_t b = 0; b < blocks; ++b) {
        UnpackInt8(row + b * F::TS, F{}, blk);
        const int8_t* d = xd.Digits(0, 4 * b);
        const float* ls = xd.LaneScale(0, 4 * b);
        for (int v = 0; v < 4; ++v) acc[v] = ChunkTerm(blk, v, d, ls, acc[v]);
        off = _mm512_fmadd_ps(blk.offset, _mm512_loadu_ps(xd.Sums(0, 16 * b)), off);
      }
      y[r] = SumPs(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) - SumPs(off);
    }
    return;
  }
  __m512 acc[kInt8MaxRows], off[kInt8MaxRows];  // QGemv sends at most kInt8MaxRows rows here
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t i = 0; i < m; ++i) acc[i] = off[i] = _mm512_setzero_ps();
    PrefetchRow(w, row_bytes, r + kPrefetchRows, n);
    const uint8_t* row = w + r * row_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      UnpackInt8(row + b * F::TS, F{}, blk);
      for (int64_t i = 0; i < m; ++i) {
        const int8_t* d = xd.Digits(i, 4 * b);
        const float* ls = xd.LaneScale(i, 4 * b);
        for (int v = 0; v < 4; ++v) acc[i] = ChunkTerm(blk, v, d, ls, acc[i]);
        off[i] = _mm512_fmadd_ps(blk.offset, _mm512_loadu_ps(xd.Sums(i, 16 * b)), off[i]);
      }
    }
    for (int64_t i = 0; i < m; ++i) y[i * n + r] = SumPs(acc[i]) - SumPs(off[i]);
  }
}

#endif

}  // namespace llava_kernels
