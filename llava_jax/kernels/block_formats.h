// GGUF's block formats unpacked sixteen weights at a time into vector registers (bytes -> nibbles /
// bit fields -> f32, times the block's scales): exactly the values `llava_jax.quants` dequantizes to,
// since every product there is exact. Block layouts: see llava_jax/quants.py.
#pragma once

#include "common.h"

namespace llava_kernels {

// Sixteen bytes as one value (B16) and the few operations the formats need on it: SSE / AVX
// instructions on x86 (GCC's generic byte vectors are often scalarized), plain loops elsewhere.
#if defined(__AVX2__)
using B16 = __m128i;
inline B16 LoadB16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline B16 SplatB16(uint8_t v) { return _mm_set1_epi8(static_cast<char>(v)); }
inline B16 And(B16 v, uint8_t m) { return _mm_and_si128(v, SplatB16(m)); }
inline B16 Or(B16 a, B16 b) { return _mm_or_si128(a, b); }
inline B16 Shr(B16 v, int s) { return _mm_and_si128(_mm_srli_epi16(v, s), SplatB16(static_cast<uint8_t>(0xFF >> s))); }
inline B16 Shl(B16 v, int s) { return _mm_and_si128(_mm_slli_epi16(v, s), SplatB16(static_cast<uint8_t>(0xFF << s))); }
inline B16 SubB16(B16 a, B16 b) { return _mm_sub_epi8(a, b); }
inline B16 NonZero01(B16 v) { return _mm_andnot_si128(_mm_cmpeq_epi8(v, _mm_setzero_si128()), SplatB16(1)); }
#if defined(__AVX512F__)
inline F16v UToF(B16 v) { return reinterpret_cast<F16v>(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))); }
inline F16v SToF(B16 v) { return reinterpret_cast<F16v>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))); }
#else
inline F16v Join(__m256 lo, __m256 hi) {
  F16v out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
}
inline F16v UToF(B16 v) {
  return Join(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))));
}
inline F16v SToF(B16 v) {
  return Join(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
}
#endif
#else
struct B16 {
  uint8_t b[16];
};
inline B16 LoadB16(const uint8_t* p) {
  B16 v;
  std::memcpy(v.b, p, 16);
  return v;
}
inline B16 SplatB16(uint8_t x) {
  B16 v;
  std::memset(v.b, x, 16);
  return v;
}
template <class Op>
inline B16 Map(B16 v, Op op) {
  for (auto& x : v.b) x = static_cast<uint8_t>(op(x));
  return v;
}
inline B16 And(B16 v, uint8_t m) { return Map(v, [m](uint8_t x) { return x & m; }); }
inline B16 Or(B16 a, B16 b) {
  for (int j = 0; j < 16; ++j) a.b[j] |= b.b[j];
  return a;
}
inline B16 Shr(B16 v, int s) { return Map(v, [s](uint8_t x) { return x >> s; }); }
inline B16 Shl(B16 v, int s) { return Map(v, [s](uint8_t x) { return x << s; }); }
inline B16 SubB16(B16 a, B16 b) {
  for (int j = 0; j < 16; ++j) a.b[j] = static_cast<uint8_t>(a.b[j] - b.b[j]);
  return a;
}
inline B16 NonZero01(B16 v) { return Map(v, [](uint8_t x) { return x != 0; }); }
inline F16v UToF(B16 v) {
  F16v f;
  for (int j = 0; j < 16; ++j) f[j] = static_cast<float>(v.b[j]);
  return f;
}
inline F16v SToF(B16 v) {
  F16v f;
  for (int j = 0; j < 16; ++j) f[j] = static_cast<float>(static_cast<int8_t>(v.b[j]));
  return f;
}
#endif
// Bit j (0..7) of each of sixteen bytes, as 0 / 1.
inline B16 BitOf(B16 v, int j) { return And(Shr(v, j), 1); }

// Half-precision bits -> float, exact for every pattern (subnormals, inf, nan).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400) == 0);
    bits = sign | ((112 - e) << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t U16(const uint8_t* b) { return static_cast<uint16_t>(b[0] | (b[1] << 8)); }
inline uint32_t U32(const uint8_t* b) {
  return b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
}
// One f16 scale: a single instruction with F16C (the branchy conversion above costs as much as unpacking
// a 32-value block).
inline float F16At(const uint8_t* b) {
#if defined(__F16C__)
  return _cvtsh_ss(U16(b));
#else
  return HalfToFloat(U16(b));
#endif
}

// Bits b0..b0+15 of a 32-bit word as sixteen 0 / 1 bytes (Q5_0 / Q5_1's high bits).
inline B16 BitsOfWord(uint32_t w, int b0) {
  uint8_t bits[16];
  for (int j = 0; j < 16; ++j) bits[j] = static_cast<uint8_t>((w >> (b0 + j)) & 1);
  return LoadB16(bits);
}

// Eight f16 values (16 bytes) -> f32 into out[0..8) (F16C where the CPU has it).
inline void Halves8ToF(const uint8_t* p, float* out) {
#if defined(__F16C__)
  __m128i h;
  std::memcpy(&h, p, 16);
  const __m256 f = _mm256_cvtph_ps(h);
  std::memcpy(out, &f, 32);
#else
  for (int j = 0; j < 8; ++j) out[j] = HalfToFloat(U16(p + 2 * j));
#endif
}

// Sixteen f16 values -> f32 (one instruction with AVX-512, else two eights).
inline F16v HalvesToF(const uint8_t* p) {
  F16v out;
#if defined(__AVX512F__)
  __m256i h;
  std::memcpy(&h, p, 32);
  const __m512 f = _mm512_cvtph_ps(h);
  std::memcpy(&out, &f, sizeof out);
#else
  float f[16];
  Halves8ToF(p, f);
  Halves8ToF(p + 16, f + 8);
  std::memcpy(&out, f, sizeof out);
#endif
  return out;
}

enum QType : int32_t {  // ggml's type ids (gguf.GGMLQuantizationType)
  kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30,
};

// One format: BS values from TS bytes; Block(b, sink) calls sink(e, w) for each sixteen weights w
// (elements e..e+15 of the block). F16 / BF16 are read 32 values (64 bytes) at a time. The loops are
// unrolled so that every `e` is a constant (the sinks pick accumulator registers by it).
template <int T> struct Fmt;

template <> struct Fmt<kF16> {
  static constexpr int BS = 32, TS = 64;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    sink(0, HalvesToF(b));
    sink(16, HalvesToF(b + 32));
  }
};

template <> struct Fmt<kBF16> {
  static constexpr int BS = 32, TS = 64;
  template <class S> static void Block(const uint8_t* b, S& sink) {
#pragma GCC unroll 2
    for (int e = 0; e < 32; e += 16) {
      F16v w;
      for (int j = 0; j < 16; ++j) {
        const uint32_t bits = static_cast<uint32_t>(U16(b + 2 * (e + j))) << 16;
        std::memcpy(&w[j], &bits, 4);
      }
      sink(e, w);
    }
  }
};

template <> struct Fmt<kQ4_0> {
  static constexpr int BS = 32, TS = 18;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const float d = F16At(b);
    const B16 v = LoadB16(b + 2);
    sink(0, (UToF(And(v, 0x0F)) - 8.0f) * d);
    sink(16, (UToF(Shr(v, 4)) - 8.0f) * d);
  }
};

template <> struct Fmt<kQ4_1> {
  static constexpr int BS = 32, TS = 20;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const float d = F16At(b), m = F16At(b + 2);
    const B16 v = LoadB16(b + 4);
    sink(0, UToF(And(v, 0x0F)) * d + m);
    sink(16, UToF(Shr(v, 4)) * d + m);
  }
};

template <> struct Fmt<kQ5_0> {
  static constexpr int BS = 32, TS = 22;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const float d = F16At(b);
    const uint32_t qh = U32(b + 2);
    const B16 v = LoadB16(b + 6);
    sink(0, (UToF(Or(And(v, 0x0F), Shl(BitsOfWord(qh, 0), 4))) - 16.0f) * d);
    sink(16, (UToF(Or(Shr(v, 4), Shl(BitsOfWord(qh, 16), 4))) - 16.0f) * d);
  }
};

template <> struct Fmt<kQ5_1> {
  static constexpr int BS = 32, TS = 24;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const float d = F16At(b), m = F16At(b + 2);
    const uint32_t qh = U32(b + 4);
    const B16 v = LoadB16(b + 8);
    sink(0, UToF(Or(And(v, 0x0F), Shl(BitsOfWord(qh, 0), 4))) * d + m);
    sink(16, UToF(Or(Shr(v, 4), Shl(BitsOfWord(qh, 16), 4))) * d + m);
  }
};

template <> struct Fmt<kQ8_0> {
  static constexpr int BS = 32, TS = 34;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const float d = F16At(b);
    sink(0, SToF(LoadB16(b + 2)) * d);
    sink(16, SToF(LoadB16(b + 18)) * d);
  }
};

template <> struct Fmt<kQ2_K> {
  static constexpr int BS = 256, TS = 84;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const float d = F16At(b + 80), dmin = F16At(b + 82);
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half)
#pragma GCC unroll 4
      for (int shift = 0; shift < 4; ++shift)
#pragma GCC unroll 2
        for (int g = 0; g < 2; ++g) {  // a group of 16 values, one scale and min
          const int e0 = half * 128 + shift * 32 + g * 16;
          const uint8_t sc = b[e0 / 16];
          const float dl = d * static_cast<float>(sc & 0x0F), ml = dmin * static_cast<float>(sc >> 4);
          const B16 v = LoadB16(b + 16 + half * 32 + g * 16);
          sink(e0, UToF(And(Shr(v, 2 * shift), 3)) * dl - ml);
        }
  }
};

template <> struct Fmt<kQ3_K> {
  static constexpr int BS = 256, TS = 110;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    const uint8_t* s = b + 96;
    const float d = F16At(b + 108);
    const B16 four = SplatB16(4);
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half)
#pragma GCC unroll 4
      for (int shift = 0; shift < 4; ++shift) {
        const int j = half * 4 + shift;  // hmask bit
#pragma GCC unroll 2
        for (int g = 0; g < 2; ++g) {
          const int e0 = j * 32 + g * 16, i = e0 / 16;
          const int lo = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
          const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
          const float dl = d * static_cast<float>((lo | (hi << 4)) - 32);
          const B16 ql = And(Shr(LoadB16(b + 32 + half * 32 + g * 16), 2 * shift), 3);
          const B16 set = Shl(BitOf(LoadB16(b + g * 16), j), 2);  // 4 where the hmask bit is set
          sink(e0, SToF(SubB16(ql, SubB16(four, set))) * dl);
        }
      }
  }
};

// Q4_K / Q5_K's 12 bytes: eight 6-bit scales and eight 6-bit mins.
inline void ScaleMinK4(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 0x3F;
    mn[j] = s[j + 4] & 0x3F;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
  }
}

// The same sixteen bytes [scale 0..7, min 0..7] by byte shuffles (the loop above costs ~40 scalar
// instructions a block, as much as the block's products in the integer path). Reads 16 bytes from s.
inline B16 ScaleMinBytesK4(const uint8_t* s) {
#if defined(__AVX2__)
  const __m128i v = LoadB16(s);
  const __m128i a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
  const __m128i top = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
  const __m128i keep = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0);
  const __m128i nibble = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15);
  __m128i r = _mm_and_si128(a, keep);                                     // s[j] & 63, s[j + 8] & 15
  r = _mm_or_si128(r, _mm_and_si128(_mm_srli_epi16(a, 4), nibble));      // s[j + 8] >> 4
  return _mm_or_si128(r, _mm_and_si128(_mm_srli_epi16(top, 2), SplatB16(0x30)));  // the top two bits
#else
  alignas(16) uint8_t smn[16];
  ScaleMinK4(s, smn, smn + 8);
  return LoadB16(smn);
#endif
}

// The eight (d * scale, dmin * min) pairs of a Q4_K / Q5_K block as floats, by one vector conversion:
// out[j] = d * sc[j], out[8 + j] = dmin * mn[j] (exact products: 11 + 6 bits).
inline void ScalesK4(const uint8_t* b, float* out) {
  const float d = F16At(b), dmin = F16At(b + 2);
  const F16v mul = {d, d, d, d, d, d, d, d, dmin, dmin, dmin, dmin, dmin, dmin, dmin, dmin};
  const F16v v = UToF(ScaleMinBytesK4(b + 4)) * mul;
  std::memcpy(out, &v, sizeof v);
}

// Q4_K and Q5_K: the same scales / mins and nibbles; Q5_K adds 32 bytes of fifth bits (bit j of byte l
// for element 32 j + l) before the nibbles.
template <bool kFive>
struct KQuant45 {
  static constexpr int BS = 256, TS = kFive ? 176 : 144;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    alignas(64) float dm[16];
    ScalesK4(b, dm);
    const uint8_t* qs = b + (kFive ? 48 : 16);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
#pragma GCC unroll 2
      for (int l = 0; l < 32; l += 16) {
        const B16 v = LoadB16(qs + 32 * c + l);
        B16 lo = And(v, 0x0F), hi = Shr(v, 4);
        if constexpr (kFive) {
          const B16 h = LoadB16(b + 16 + l);
          lo = Or(lo, Shl(BitOf(h, 2 * c), 4));
          hi = Or(hi, Shl(BitOf(h, 2 * c + 1), 4));
        }
        sink(64 * c + l, UToF(lo) * dm[2 * c] - dm[8 + 2 * c]);
        sink(64 * c + 32 + l, UToF(hi) * dm[2 * c + 1] - dm[9 + 2 * c]);
      }
    }
  }
};
template <> struct Fmt<kQ4_K> : KQuant45<false> {};
template <> struct Fmt<kQ5_K> : KQuant45<true> {};

template <> struct Fmt<kQ6_K> {
  static constexpr int BS = 256, TS = 210;
  template <class S> static void Block(const uint8_t* b, S& sink) {
    alignas(64) float scale[16];  // d * the sixteen int8 scales (exact: 11 + 7 bits)
    const F16v sv = SToF(LoadB16(b + 192)) * F16At(b + 208);
    std::memcpy(scale, &sv, sizeof sv);
    const B16 k32 = SplatB16(32);
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      const float* s = scale + 8 * half;
#pragma GCC unroll 2
      for (int l = 0; l < 32; l += 16) {
        const int is = l / 16;
        const B16 a = LoadB16(ql + l), c = LoadB16(ql + 32 + l), h = LoadB16(qh + l);
        const B16 q1 = Or(And(a, 0x0F), Shl(And(h, 3), 4)), q2 = Or(And(c, 0x0F), Shl(And(Shr(h, 2), 3), 4));
        const B16 q3 = Or(Shr(a, 4), Shl(And(Shr(h, 4), 3), 4)), q4 = Or(Shr(c, 4), Shl(Shr(h, 6), 4));
        const int e = 128 * half + l;
        sink(e, SToF(SubB16(q1, k32)) * s[is]);
        sink(e + 32, SToF(SubB16(q2, k32)) * s[is + 2]);
        sink(e + 64, SToF(SubB16(q3, k32)) * s[is + 4]);
        sink(e + 96, SToF(SubB16(q4, k32)) * s[is + 6]);
      }
    }
  }
};


// Every block of one row of k values unpacked in order: sink(blk, e, w) for elements blk * BS + e .. + 15
// (e is the constant in-block offset the formats' unrolled loops pass).
template <int T, class S>
inline void UnpackRow(const uint8_t* row, int64_t k, S& sink) {
  using F = Fmt<T>;
  for (int64_t blk = 0; blk < k / F::BS; ++blk) {
    auto at = [&](int e, F16v w) { sink(blk, e, w); };
    F::Block(row + blk * F::TS, at);
  }
}

// Make<T>::Get() for the format of ggml type id `qtype`; a value-initialized result (null entries) for
// a type without one. Each kernel's table of per-format functions is built through this one switch.
template <template <int> class Make>
auto ForFormat(int32_t qtype) -> decltype(Make<kF16>::Get()) {
  switch (qtype) {
    case kF16: return Make<kF16>::Get();
    case kBF16: return Make<kBF16>::Get();
    case kQ4_0: return Make<kQ4_0>::Get();
    case kQ4_1: return Make<kQ4_1>::Get();
    case kQ5_0: return Make<kQ5_0>::Get();
    case kQ5_1: return Make<kQ5_1>::Get();
    case kQ8_0: return Make<kQ8_0>::Get();
    case kQ2_K: return Make<kQ2_K>::Get();
    case kQ3_K: return Make<kQ3_K>::Get();
    case kQ4_K: return Make<kQ4_K>::Get();
    case kQ5_K: return Make<kQ5_K>::Get();
    case kQ6_K: return Make<kQ6_K>::Get();
    default: return {};
  }
}

}  // namespace llava_kernels
