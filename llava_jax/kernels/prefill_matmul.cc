// Prefill products over quantized weights on AMX (XLA FFI custom call `LlavaQMatmul`, see
// llava_jax/cpu_kernels.py):
//   x f32 [M, K] (M > 16: prompt tokens), w u8 [N, row_bytes] (one GGUF row of ggml blocks per output),
//   attribute qtype -> y f32 [M, N] = x . dequantize(w)^T
//
// Why: a prompt's products are compute-bound, and XLA:CPU's f32 GEMM reaches ~68 GFLOP/s a core on
// the Xeon VM; AMX's bf16 tile product does ~1100 G multiply-adds a second a core. Activations stay
// f32 in meaning: each f32 value is split into three bf16 parts (hi + mid + lo, each the rounding of
// what the previous left; together exact to about 2^-24), the weight (dequantized exactly, as
// `quants`) likewise, and the six products whose size is above 2^-24 of the whole are summed in f32
// by the tiles (hi.hi, hi.mid, mid.hi, hi.lo, lo.hi, mid.mid: the "bf16x6" of TPUs' f32 matmuls).
// The dropped terms are below 2^-26 relative per product; the f32 sums' order differs from XLA's.
//
// Layout. Tiles are 16 rows x 64 bytes (32 bf16). The weights are tile A: 16 output rows x 32 k of
// one part; x is tile B in the pair-interleaved ("VNNI") layout the instruction wants: row kk holds
// (x[t][2kk], x[t][2kk + 1]) for 16 tokens t. C = A . B is [16 outputs, 16 tokens] f32.
// Work: x is split once into its parts (all threads); then each piece is 128 output rows: for each
// block of 256 k, those rows are unpacked into their parts (L2-resident), and every pair of token
// groups x pair of output groups (four C tiles, two A and two B registers) runs over the block's
// k steps. Partial sums between k blocks live in the piece's own f32 buffer; the last block writes y.

#include <mutex>
#include <vector>

#include "block_formats.h"
#include "common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define LLAVA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using namespace llava_kernels;

#if defined(LLAVA_AMX)

constexpr int64_t kRowsPerPiece = 256;  // output rows a piece unpacks at a time (16 groups of 16)
constexpr int64_t kGroupsPerPiece = kRowsPerPiece / 16;
constexpr int64_t kKBlock = 256;        // k values per unpacked block (8 tile steps)
constexpr int kParts = 3;               // bf16 parts of each f32 value

// Linux gives a process AMX's tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM).
bool RequestAmx() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight 16 x 64-byte tiles: 0-3 the C sums, 4-5 weight parts, 6-7 x parts.
void ConfigureTiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
}

inline __m512 Bf16ToF32(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
}

// Sixteen floats -> their three bf16 parts (each the round-to-nearest of what the previous left).
inline void Split(__m512 w, __m256bh parts[kParts]) {
  for (int p = 0; p < kParts; ++p) {
    parts[p] = _mm512_cvtneps_pbh(w);
    w = _mm512_sub_ps(w, Bf16ToF32(parts[p]));
  }
}

struct MatmulJob {
  const float* x;
  const uint8_t* w;
  float* y;
  int64_t m, n, k, row_bytes, m_groups, k_steps;
  int bs, ts;
  void (*unpack)(const MatmulJob&, int64_t, int64_t, int64_t, uint16_t*);
  // x's parts, [m_groups][k_steps][part][16 kk][16 t][2] bf16: one tile per (group, step, part).
  uint16_t* xparts;

  const uint16_t* XTile(int64_t group, int64_t step, int part) const {
    return xparts + ((group * k_steps + step) * kParts + part) * 512;
  }
};

// Buffers for x's parts kept between calls (a prompt's products follow each other with the same sizes):
// a fresh allocation of tens of MB costs its page faults on every call.
class BufferPool {
 public:
  std::shared_ptr<uint16_t> Take(size_t count) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].second >= count) {
        auto [ptr, size] = free_[i];
        free_.erase(free_.begin() + i);
        return Wrap(ptr, size);
      }
    return Wrap(static_cast<uint16_t*>(std::aligned_alloc(64, (count * 2 + 63) / 64 * 64)), count);
  }

 private:
  std::shared_ptr<uint16_t> Wrap(uint16_t* ptr, size_t size) {
    return std::shared_ptr<uint16_t>(ptr, [this, size](uint16_t* p) { Give(p, size); });
  }
  void Give(uint16_t* ptr, size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(ptr, size);
    if (free_.size() > 4) {  // keep the four largest
      auto smallest = std::min_element(free_.begin(), free_.end(), [](auto& a, auto& b) { return a.second < b.second; });
      std::free(smallest->first);
      free_.erase(smallest);
    }
  }
  std::mutex mu_;
  std::vector<std::pair<uint16_t*, size_t>> free_;
};

BufferPool& XPool() {
  static BufferPool* pool = new BufferPool;  // never destroyed: helpers may return buffers at exit
  return *pool;
}

// 16 x 16 32-bit values transposed in registers (rows r[0..15] -> columns).
inline void Transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Token group g of x split into its parts (rows past M are zeros): for each k step, the 16 tokens'
// 32 values as bf16 parts, one row of 16 (k, k + 1) pairs per token, transposed into the tile layout.
void SplitX(const MatmulJob& job, int64_t g) {
  for (int64_t s = 0; s < job.k_steps; ++s) {
    __m512i rows[kParts][16];
    for (int64_t t = 0; t < 16; ++t) {
      const int64_t i = g * 16 + t;
      if (i >= job.m) {
        for (int p = 0; p < kParts; ++p) rows[p][t] = _mm512_setzero_si512();
        continue;
      }
      __m256bh lo[kParts], hi[kParts];
      Split(_mm512_loadu_ps(job.x + i * job.k + 32 * s), lo);
      Split(_mm512_loadu_ps(job.x + i * job.k + 32 * s + 16), hi);
      for (int p = 0; p < kParts; ++p)
        rows[p][t] = _mm512_inserti64x4(_mm512_castsi256_si512(reinterpret_cast<__m256i>(lo[p])),
                                        reinterpret_cast<__m256i>(hi[p]), 1);
    }
    for (int p = 0; p < kParts; ++p) {
      Transpose16(rows[p]);
      uint16_t* tile = job.xparts + ((g * job.k_steps + s) * kParts + p) * 512;
      for (int kk = 0; kk < 16; ++kk) _mm512_storeu_si512(tile + kk * 32, rows[p][kk]);
    }
  }
}

// Rows [r0, r0 + kRowsPerPiece) (those < N) of w, k values [k0, k0 + kb), into `out`:
// [row groups][kb / 32 steps][part][16 rows][32 k] bf16 (one A tile per group, step, part).
template <int T>
void UnpackBlock(const MatmulJob& job, int64_t r0, int64_t k0, int64_t kb, uint16_t* out) {
  using F = Fmt<T>;
  const int64_t steps = kb / 32;
  for (int64_t r = 0; r < kRowsPerPiece; ++r) {
    uint16_t* group = out + (r / 16) * steps * kParts * 512 + (r % 16) * 32;
    if (r0 + r >= job.n) {
      for (int64_t s = 0; s < steps; ++s)
        for (int p = 0; p < kParts; ++p) std::memset(group + (s * kParts + p) * 512, 0, 64);
      continue;
    }
    const uint8_t* row = job.w + (r0 + r) * job.row_bytes + (k0 / F::BS) * F::TS;
    for (int64_t blk = 0; blk < kb / F::BS; ++blk) {
      auto sink = [&](int e, F16v w) {
        const int64_t at = blk * F::BS + e, s = at / 32;
        __m512 v;
        std::memcpy(&v, &w, sizeof v);
        __m256bh parts[kParts];
        Split(v, parts);
        for (int p = 0; p < kParts; ++p) std::memcpy(group + (s * kParts + p) * 512 + at % 32, &parts[p], 32);
      };
      F::Block(row + blk * F::TS, sink);
    }
  }
}

// The six part products of one k step into the four C tiles: C[a][b] += A_a . B_b for output groups
// a (tiles 4, 5) and token groups b (tiles 6, 7). Tile loads, not the products, bound this loop (a 1 KB
// tile load takes ~3.4 products' time on the Xeon VM), so each next pair changes only one operand pair:
// 16 loads a step (each pair loading its own B would take 18; 6% faster in a microbenchmark).
inline void Step(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1) {
  // (weight part, x part): hi.hi, hi.mid, hi.lo, mid.mid, mid.hi, lo.hi
  constexpr int kPairs[6][2] = {{0, 0}, {0, 1}, {0, 2}, {1, 1}, {1, 0}, {2, 0}};
  int loaded_a = -1, loaded_b = -1;
  for (const auto& pq : kPairs) {
    if (pq[0] != loaded_a) {
      _tile_loadd(4, a0 + pq[0] * 512, 64);
      _tile_loadd(5, a1 + pq[0] * 512, 64);
      loaded_a = pq[0];
    }
    if (pq[1] != loaded_b) {
      _tile_loadd(6, b0 + pq[1] * 512, 64);
      _tile_loadd(7, b1 + pq[1] * 512, 64);
      loaded_b = pq[1];
    }
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// One piece: output rows [r0, r0 + kRowsPerPiece) for every token.
void Piece(const MatmulJob& job, int64_t piece) {
  thread_local std::vector<uint16_t> wbuf;
  thread_local std::vector<float> acc;  // [row groups][m_groups][16 rows][16 tokens]
  const int64_t r0 = piece * kRowsPerPiece, groups = job.m_groups;
  wbuf.resize(kGroupsPerPiece * (kKBlock / 32) * kParts * 512);
  acc.resize(kGroupsPerPiece * groups * 256);
  ConfigureTiles();
  for (int64_t k0 = 0; k0 < job.k; k0 += kKBlock) {
    const int64_t kb = std::min(kKBlock, job.k - k0), steps = kb / 32, s0 = k0 / 32;
    const bool first = k0 == 0;
    job.unpack(job, r0, k0, kb, wbuf.data());
    for (int64_t tg = 0; tg < groups; tg += 2) {
      const int64_t tg1 = std::min(tg + 1, groups - 1);  // an odd last group is done twice, kept once
      for (int64_t og = 0; og < kGroupsPerPiece; og += 2) {
        if (r0 + og * 16 >= job.n) break;
        float* c[4] = {&acc[(og * groups + tg) * 256], &acc[(og * groups + tg1) * 256],
                       &acc[((og + 1) * groups + tg) * 256], &acc[((og + 1) * groups + tg1) * 256]};
        if (first) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c[0], 64);
          _tile_loadd(1, c[1], 64);
          _tile_loadd(2, c[2], 64);
          _tile_loadd(3, c[3], 64);
        }
        const uint16_t* a0 = wbuf.data() + og * steps * kParts * 512;
        const uint16_t* a1 = a0 + steps * kParts * 512;
        for (int64_t s = 0; s < steps; ++s)
          Step(a0 + s * kParts * 512, a1 + s * kParts * 512, job.XTile(tg, s0 + s, 0), job.XTile(tg1, s0 + s, 0));
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
      }
    }
  }
  _tile_release();
  // acc [og][tg][16 outputs][16 tokens] -> y [M, N]
  for (int64_t og = 0; og < kGroupsPerPiece && r0 + og * 16 < job.n; ++og)
    for (int64_t tg = 0; tg < groups; ++tg) {
      const float* c = &acc[(og * groups + tg) * 256];
      for (int64_t t = 0; t < 16 && tg * 16 + t < job.m; ++t) {
        float* out = job.y + (tg * 16 + t) * job.n + r0 + og * 16;
        const int64_t cols = std::min<int64_t>(16, job.n - r0 - og * 16);
        for (int64_t o = 0; o < cols; ++o) out[o] = c[o * 16 + t];
      }
    }
}

struct Kind {
  void (*unpack)(const MatmulJob&, int64_t, int64_t, int64_t, uint16_t*);
  int bs, ts;
};
template <int T>
struct MakeKind {
  static Kind Get() { return {&UnpackBlock<T>, Fmt<T>::BS, Fmt<T>::TS}; }
};

Kind Lookup(int32_t qtype) { return ForFormat<MakeKind>(qtype); }

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                   ffi::ResultBuffer<ffi::F32> y, int32_t qtype) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const Kind kind = Lookup(qtype);
  if (kind.unpack == nullptr) return ffi::Error::InvalidArgument("qmatmul: no kernel for this quant type");
  if (!RequestAmx()) return ffi::Error::Internal("qmatmul: the kernel refused AMX tile state (arch_prctl)");
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[0] ||
      xd[1] % kind.bs != 0 || xd[1] % 32 != 0 || wd[1] != xd[1] / kind.bs * kind.ts)
    return ffi::Error::InvalidArgument("qmatmul: expected x [M, K], w [N, K / block * block_bytes], y [M, N]");
  auto job = std::make_shared<MatmulJob>();
  job->x = x.typed_data(), job->w = w.typed_data(), job->y = y->typed_data();
  job->m = xd[0], job->n = wd[0], job->k = xd[1], job->row_bytes = wd[1];
  job->m_groups = (job->m + 15) / 16, job->k_steps = job->k / 32;
  job->bs = kind.bs, job->ts = kind.ts, job->unpack = kind.unpack;
  std::shared_ptr<uint16_t> xparts = XPool().Take(job->m_groups * job->k_steps * kParts * 512);
  job->xparts = xparts.get();
  ShareAmongThreads(pool, job->m_groups, [job](int64_t g) { SplitX(*job, g); });
  ShareAmongThreads(pool, (job->n + kRowsPerPiece - 1) / kRowsPerPiece, [job](int64_t p) { Piece(*job, p); });
  return ffi::Error::Success();
}

#else  // no AMX at compile time: the entry point exists and says so

ffi::Error QMatmul(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::ResultBuffer<ffi::F32>,
                   int32_t) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "qmatmul: built without AMX (the CPU or compiler lacks it)");
}

#endif

}  // namespace

// Whether the AMX product runs here: built with AMX and the kernel granted the tile state (ctypes).
extern "C" int LlavaAmxAvailable() {
#if defined(LLAVA_AMX)
  return RequestAmx() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlavaQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("qtype"));
