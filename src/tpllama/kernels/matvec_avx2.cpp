// tpllama CPU kernels: weight-only quantized matrix-vector products (AVX2 + FMA + F16C; built a
// second time with AVX-512 + VNNI for the avx512 kernel path, whose tiles in matvec_avx512.inc
// give bit-identical results and whose prefill GEMM there sums in another order).
//
// Weight formats (block size 32 along the input dimension, rows = output features):
//   int8 : qweight int8  [N, K],    scales f16|f32 [N, K/32]          w = d * q
//   int4 : qweight uint8 [N, K/2],  scales, mins f16|f32 [N, K/32]    w = d * q + m, q in 0..15
//          per 32-block of 16 bytes: byte j = element j (low nibble) | element j+16 (high nibble)
//          (identical to the GGUF Q4_0 / Q4_1 nibble order).
//
// In memory (not in the stored form) the weights are repacked by tpllama.quant into tiles of
// RT = 4 output rows, padded with zero rows to a multiple of 4, so that one pass over a tile
// reads a single linear stream:
//   int8 : qpack int8  [T, K/32, 4, 32],  spack [T, K/32, 4]
//   int4 : qpack uint8 [T, K/32, 4, 16],  spack, mpack [T, K/32, 4]
//
// Decode path (few activation rows): the activations are quantized per 32-block to int8
// (scale da = amax/127, and for int4 also sa = da * sum(q)), then
//   y[n] = sum_b  dw[n,b]*da[b] * dot_i8(qw[n,b,:], qa[b,:])   (+ mw[n,b] * sa[b] for int4).
// Tiles are split across the threads torch is set to (at::parallel_for); within a tile all
// activation rows are processed while the tile is hot in L1, two (int8) or four (int4) at a time
// against the same weight loads, so that many rows (prefill) make an int8 GEMM; activation rows
// are taken in L2-sized chunks. Every row's result is bit-identical to the one-row kernel.
//
// Built with -ffp-contract=off so that the dequantize kernels round exactly like the
// PyTorch reference (separate multiply and add).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define TPL_AVX512 1
#define TPL_TILE(name) name##_512
#else
#define TPL_AVX512 0
#define TPL_TILE(name) name
#endif

namespace {

constexpr int64_t QK = 32;

inline float hsum_ps(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

inline float hsum128(__m128 v) {
  __m128 sh = _mm_movehdup_ps(v);
  v = _mm_add_ps(v, sh);
  sh = _mm_movehl_ps(sh, v);
  return _mm_cvtss_f32(_mm_add_ss(v, sh));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// scale loaders: 8 consecutive scales as fp32
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float load1(const at::Half* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}
inline float load1(const float* p) { return *p; }
// 4 consecutive scales as fp32
inline __m128 load4(const at::Half* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }

// Quantize one activation row of K floats (K % 32 == 0) to int8 per 32-block.
// q: K int8, d: K/32 scales, s: K/32 values d * sum(q).
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  const __m256 signmask = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int64_t nb = K / QK;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    __m256 v0 = _mm256_loadu_ps(xb);
    __m256 v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16);
    __m256 v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signmask, v0), _mm256_andnot_ps(signmask, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(signmask, v2), _mm256_andnot_ps(signmask, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float dd = amax / 127.0f;
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
    __m256i p01 = _mm256_packs_epi32(i0, i1);
    __m256i p23 = _mm256_packs_epi32(i2, i3);
    __m256i sum16 = _mm256_add_epi16(p01, p23);
    __m256i p = _mm256_packs_epi16(p01, p23);
    p = _mm256_permutevar8x32_epi32(p, perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), p);
    d[b] = dd;
    s[b] = dd * static_cast<float>(hsum_epi32(_mm256_madd_epi16(sum16, ones16)));
  }
}

constexpr int RT = 4;  // rows per tile
// Software prefetch distance in the packed weight stream (kernels.bench_matvec on a 13824 x 5120
// matrix, builds alternated, -DTPL_PF / -DTPL_PF4 to try others). On Zen 3 (15-27 GB/s), one
// thread read int4 at 9.3-9.5 GB/s with 1024 bytes, 10.8-12.6 GB/s with 2048. On Zen 5 (38 GB/s
// one-thread probe), further is better: int8 24.7-25.3 GB/s with 1024 bytes, 27.8-30.0 with
// 4096, 26.8-28.4 with 8192; int4 23.1-26.5 with 2048, 28.9-31.5 with 8192, 23.7-26.9 with 16384
// (two threads: int8 40-41 -> 45-51, int4 37.6-42.5 -> 42.8-49.1).
#ifndef TPL_PF
#define TPL_PF 4096
#endif
#ifndef TPL_PF4
#define TPL_PF4 8192
#endif
constexpr int64_t PF_BYTES = TPL_PF;
constexpr int64_t PF_BYTES_Q4 = TPL_PF4;
inline void pf(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

struct QAct {
  std::vector<int8_t> q;  // M*K
  std::vector<float> d4;  // M*nb*4: activation scale of each block, repeated for the 4 rows of a tile
  std::vector<float> s4;  // M*nb*4: d * sum(q) of each block, repeated 4 times
};

QAct quantize_act(const float* x, int64_t M, int64_t K) {
  QAct a;
  const int64_t nb = K / QK;
  a.q.resize(M * K);
  a.d4.resize(M * nb * RT);
  a.s4.resize(M * nb * RT);
  auto rows = [&](int64_t m0, int64_t m1) {
    std::vector<float> d(nb), s(nb);
    for (int64_t m = m0; m < m1; ++m) {
      quantize_row(x + m * K, K, a.q.data() + m * K, d.data(), s.data());
      for (int64_t b = 0; b < nb; ++b)
        for (int r = 0; r < RT; ++r) {
          a.d4[(m * nb + b) * RT + r] = d[b];
          a.s4[(m * nb + b) * RT + r] = s[b];
        }
    }
  };
  if (M * K >= (1 << 16))
    at::parallel_for(0, M, 8, rows);  // prefill: both threads quantize
  else
    rows(0, M);
  return a;
}

// c[i] = scale[i] * d4[i] for the n = 4*nb interleaved scales of a tile
template <typename ST>
inline void combine_scales(const ST* S, int64_t n, const float* d4, float* c) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(c + i, _mm256_mul_ps(load8(S + i), _mm256_loadu_ps(d4 + i)));
  for (; i < n; ++i) c[i] = load1(S + i) * d4[i];
}

// out[r] = sum_b mins[b*4 + r] * s4[b*4 + r]  (n = 4*nb, so 8 lanes = 2 blocks x 4 rows)
template <typename ST>
inline void dot_mins4(const ST* Mn, int64_t n, const float* s4, float* out) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(Mn + i), _mm256_loadu_ps(s4 + i), acc);
  __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  float tmp[4];
  _mm_storeu_ps(tmp, a4);
  for (; i < n; ++i) tmp[i % 4] += load1(Mn + i) * s4[i];
  for (int r = 0; r < 4; ++r) out[r] += tmp[r];
}

// One 32-block of int8 weights at w dotted with the int8 activations a, as 8 fp32 partial sums.
inline __m256 dot_q8(const int8_t* w_ptr, __m256i a, __m256i ones16) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_ptr));
  // |w| (unsigned) x sign(w)*a (signed); |w|,|a| <= 127 so the int16 pair sums cannot saturate
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones16));
}


// One tile (4 rows) x one activation row. Accumulators are named registers (an array makes
// GCC spill them to the stack). c: 4*nb combined scales (scratch), y: 4 results.
template <typename ST>
inline void q8_tile(const int8_t* W, const ST* S, int64_t nb, const int8_t* qa, const float* d4, float* c,
                    float* y) {
  combine_scales(S, nb * RT, d4, c);
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* w = W + b * (RT * QK);
    pf(w + PF_BYTES);
    pf(w + PF_BYTES + 64);
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + b * QK));
    const float* cb = c + b * RT;
    acc0 = _mm256_fmadd_ps(dot_q8(w, a, ones16), _mm256_broadcast_ss(cb), acc0);
    acc1 = _mm256_fmadd_ps(dot_q8(w + QK, a, ones16), _mm256_broadcast_ss(cb + 1), acc1);
    acc2 = _mm256_fmadd_ps(dot_q8(w + 2 * QK, a, ones16), _mm256_broadcast_ss(cb + 2), acc2);
    acc3 = _mm256_fmadd_ps(dot_q8(w + 3 * QK, a, ones16), _mm256_broadcast_ss(cb + 3), acc3);
  }
  y[0] = hsum_ps(acc0);
  y[1] = hsum_ps(acc1);
  y[2] = hsum_ps(acc2);
  y[3] = hsum_ps(acc3);
}

// int4: rows r and r+1 of a tile are adjacent 16-byte runs, so one 32-byte load holds one
// block of two rows: lane 0 = row r, lane 1 = row r+1. Low nibbles are elements 0..15 and
// high nibbles elements 16..31, multiplied against the matching activation half broadcast
// to both lanes. The 4 int32 sums of each lane are scaled by that row's combined scale.
// The combined scales (combine_scales) and the mins' term (dot_mins4) are computed inside the
// block loop rather than in passes of their own over the tile's scales (about a tenth faster
// on SmolLM2's 576-wide matrices), with the same products and the same summation order (mins:
// even blocks in one accumulator, odd blocks in another, an odd last block added after the
// two), so the results stay bit-identical to q4_tile_x4's. (The same folding made q8_tile
// slower: its four per-row scale broadcasts then need lane permutes instead of loads.)
template <typename ST>
inline void q4_tile(const uint8_t* W, const ST* S, const ST* Mn, int64_t nb, const int8_t* qa, const float* d4,
                    const float* s4, float* y) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i sel01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i sel23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  constexpr int64_t QB = QK / 2;  // bytes per block per row
  __m256 acc01 = _mm256_setzero_ps(), acc23 = _mm256_setzero_ps();
  __m128 mins_even = _mm_setzero_ps(), mins_odd = _mm_setzero_ps();
  auto block = [&](int64_t b) {
    const uint8_t* w = W + b * (RT * QB);
    pf(w + PF_BYTES_Q4);
    const __m256i alo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa + b * QK)));
    const __m256i ahi =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa + b * QK + 16)));
    const __m256 cb = _mm256_castps128_ps256(_mm_mul_ps(load4(S + b * RT), _mm_loadu_ps(d4 + b * RT)));
    const __m256i v01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i v23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * QB));
    // pair sums <= 2*15*127 per maddubs, two of them added: no int16 overflow
    const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v01, low4), alo),
                                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v01, 4), low4), ahi));
    const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v23, low4), alo),
                                         _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v23, 4), low4), ahi));
    acc01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p01, ones16)), _mm256_permutevar8x32_ps(cb, sel01),
                            acc01);
    acc23 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p23, ones16)), _mm256_permutevar8x32_ps(cb, sel23),
                            acc23);
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b);
    mins_even = _mm_fmadd_ps(load4(Mn + b * RT), _mm_loadu_ps(s4 + b * RT), mins_even);
    block(b + 1);
    mins_odd = _mm_fmadd_ps(load4(Mn + (b + 1) * RT), _mm_loadu_ps(s4 + (b + 1) * RT), mins_odd);
  }
  __m128 mins = _mm_add_ps(mins_even, mins_odd);
  if (b < nb) {
    block(b);
    mins = _mm_add_ps(mins, _mm_mul_ps(load4(Mn + b * RT), _mm_loadu_ps(s4 + b * RT)));
  }
  float m[4];
  _mm_storeu_ps(m, mins);
  y[0] = hsum128(_mm256_castps256_ps128(acc01)) + m[0];
  y[1] = hsum128(_mm256_extractf128_ps(acc01, 1)) + m[1];
  y[2] = hsum128(_mm256_castps256_ps128(acc23)) + m[2];
  y[3] = hsum128(_mm256_extractf128_ps(acc23, 1)) + m[3];
}

#if TPL_AVX512
#include "matvec_avx512.inc"
#endif

// Checks a packed weight: q [T, nb, 4, qb] of dtype qdt, scales [T, nb, 4]; returns {T, nb}.
std::pair<int64_t, int64_t> check_packed(const torch::Tensor& q, at::ScalarType qdt, int64_t qb,
                                         const torch::Tensor& s, const torch::Tensor* mn, int64_t N) {
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && q.scalar_type() == qdt && q.dim() == 4 &&
                  q.size(2) == RT && q.size(3) == qb,
              "packed qweight must be a contiguous CPU [T, K/32, 4, ", qb, "] tensor of ", qdt);
  const int64_t T = q.size(0), nb = q.size(1);
  TORCH_CHECK(N >= 0 && N <= T * RT && N > (T - 1) * RT - (T == 0 ? 1 : 0), "N=", N, " does not match ", T,
              " tiles of 4 rows");
  auto chk = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kFloat, name,
                " must be float16 or float32");
    TORCH_CHECK(t.dim() == 3 && t.size(0) == T && t.size(1) == nb && t.size(2) == RT, name, " must be [", T,
                ", ", nb, ", 4]");
  };
  chk(s, "packed scales");
  if (mn) {
    chk(*mn, "packed mins");
    TORCH_CHECK(mn->scalar_type() == s.scalar_type(), "scales and mins must have the same dtype");
  }
  return {T, nb};
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
}

// ---- several activation rows at once (batched decode and prefill: an int8 GEMM) ----
// One tile (4 weight rows) against 2 activation rows: the weight loads and |w| are shared by
// both rows. Each (row, activation row) pair sums its blocks in the same order as q8_tile, so
// the results are bit-identical to two calls of q8_tile.
template <typename ST>
inline void q8_tile_x2(const int8_t* W, int64_t nb, const int8_t* qa0, const int8_t* qa1, const float* c0,
                       const float* c1, float* y0, float* y1) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 a00 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(), a20 = _mm256_setzero_ps(), a30 = _mm256_setzero_ps();
  __m256 a01 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* w = W + b * (RT * QK);
    pf(w + PF_BYTES);
    pf(w + PF_BYTES + 64);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa0 + b * QK));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa1 + b * QK));
    const float* s0 = c0 + b * RT;
    const float* s1 = c1 + b * RT;
#define TPL_Q8_ROW(r, acc0, acc1)                                                                          \
  {                                                                                                        \
    const __m256i wr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (r) * QK));                \
    const __m256i uw = _mm256_sign_epi8(wr, wr);                                                           \
    acc0 = _mm256_fmadd_ps(                                                                                \
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(uw, _mm256_sign_epi8(x0, wr)), ones16)), \
        _mm256_broadcast_ss(s0 + (r)), acc0);                                                              \
    acc1 = _mm256_fmadd_ps(                                                                                \
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(uw, _mm256_sign_epi8(x1, wr)), ones16)), \
        _mm256_broadcast_ss(s1 + (r)), acc1);                                                              \
  }
    TPL_Q8_ROW(0, a00, a01)
    TPL_Q8_ROW(1, a10, a11)
    TPL_Q8_ROW(2, a20, a21)
    TPL_Q8_ROW(3, a30, a31)
#undef TPL_Q8_ROW
  }
  y0[0] = hsum_ps(a00); y0[1] = hsum_ps(a10); y0[2] = hsum_ps(a20); y0[3] = hsum_ps(a30);
  y1[0] = hsum_ps(a01); y1[1] = hsum_ps(a11); y1[2] = hsum_ps(a21); y1[3] = hsum_ps(a31);
}

// Activation rows are taken in chunks that fit in L2 (ACT_CHUNK_BYTES of int8), and within a
// chunk every tile of the thread's share meets every row while the tile is in L1/L2.
constexpr int64_t ACT_CHUNK_BYTES = 192 << 10;
inline int64_t act_chunk_rows(int64_t K) { return std::max<int64_t>(2, (ACT_CHUNK_BYTES / std::max<int64_t>(K, 1)) & ~1); }

template <typename ST>
void q8_matvec_impl(const float* x, int64_t M, int64_t nb, const int8_t* W, const ST* S, int64_t T, int64_t N,
                    float* y) {
  const int64_t K = nb * QK;
  QAct a = quantize_act(x, M, K);
#if TPL_AVX512
  if (M >= GEMM_VNNI_MIN_ROWS) return gemm_vnni<ST, false>(a, M, nb, W, S, static_cast<const ST*>(nullptr), T, N, y);
#endif
  const int64_t MC = act_chunk_rows(K);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> c(RT * nb), c1(RT * nb);
    float out[RT], out1[RT];
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t me = std::min(M, mc + MC);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * RT;
        const int64_t R = std::min<int64_t>(RT, N - n0);
        const int8_t* Wt = W + t * nb * RT * QK;
        const ST* St = S + t * nb * RT;
        int64_t m = mc;
        for (; m + 2 <= me; m += 2) {
          combine_scales(St, nb * RT, a.d4.data() + m * nb * RT, c.data());
          combine_scales(St, nb * RT, a.d4.data() + (m + 1) * nb * RT, c1.data());
          TPL_TILE(q8_tile_x2)<ST>(Wt, nb, a.q.data() + m * K, a.q.data() + (m + 1) * K, c.data(), c1.data(), out, out1);
          for (int64_t r = 0; r < R; ++r) {
            y[m * N + n0 + r] = out[r];
            y[(m + 1) * N + n0 + r] = out1[r];
          }
        }
        for (; m < me; ++m) {
          TPL_TILE(q8_tile)(Wt, St, nb, a.q.data() + m * K, a.d4.data() + m * nb * RT, c.data(), out);
          for (int64_t r = 0; r < R; ++r) y[m * N + n0 + r] = out[r];
        }
      }
    }
  });
}

// int4: one tile against 4 activation rows; the nibbles are unpacked once per block for all
// four. Same per-pair summation order and scale lanes as q4_tile (bit-identical results).
// c[j]: the combined scales (combine_scales) of activation row j, 4 per block. out[j][r]: the
// sums of activation row j and tile row r, before the mins' term.
inline void q4_tile_x4(const uint8_t* W, int64_t nb, const int8_t* const* qa, const float* const* c,
                       float (*out)[RT]) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i sel01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i sel23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  constexpr int64_t QB = QK / 2;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = W + b * (RT * QB);
    pf(w + PF_BYTES_Q4);
    const __m256i v01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i v23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * QB));
    const __m256i l01 = _mm256_and_si256(v01, low4), h01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), low4);
    const __m256i l23 = _mm256_and_si256(v23, low4), h23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), low4);
#define TPL_Q4_ROW(j)                                                                                             \
  {                                                                                                               \
    const __m256i alo =                                                                                           \
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa[j] + b * QK)));          \
    const __m256i ahi =                                                                                           \
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa[j] + b * QK + 16)));     \
    const __m256 cb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(c[j] + b * RT));                        \
    const __m256i p01 = _mm256_add_epi16(_mm256_maddubs_epi16(l01, alo), _mm256_maddubs_epi16(h01, ahi));         \
    const __m256i p23 = _mm256_add_epi16(_mm256_maddubs_epi16(l23, alo), _mm256_maddubs_epi16(h23, ahi));         \
    acc[2 * (j)] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p01, ones16)),                            \
                                   _mm256_permutevar_ps(cb, sel01), acc[2 * (j)]);                                \
    acc[2 * (j) + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p23, ones16)),                        \
                                       _mm256_permutevar_ps(cb, sel23), acc[2 * (j) + 1]);                        \
  }
    TPL_Q4_ROW(0)
    TPL_Q4_ROW(1)
    TPL_Q4_ROW(2)
    TPL_Q4_ROW(3)
#undef TPL_Q4_ROW
  }
  for (int j = 0; j < 4; ++j) {
    out[j][0] = hsum128(_mm256_castps256_ps128(acc[2 * j]));
    out[j][1] = hsum128(_mm256_extractf128_ps(acc[2 * j], 1));
    out[j][2] = hsum128(_mm256_castps256_ps128(acc[2 * j + 1]));
    out[j][3] = hsum128(_mm256_extractf128_ps(acc[2 * j + 1], 1));
  }
}

template <typename ST>
void q4_matvec_impl(const float* x, int64_t M, int64_t nb, const uint8_t* W, const ST* S, const ST* Mn, int64_t T,
                    int64_t N, float* y) {
  const int64_t K = nb * QK;
  QAct a = quantize_act(x, M, K);
#if TPL_AVX512
  if (M >= GEMM_VNNI_MIN_ROWS) return gemm_vnni<ST, true>(a, M, nb, W, S, Mn, T, N, y);
#endif
  const int64_t MC = act_chunk_rows(K);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> c4(4 * RT * nb);
    float out[RT];
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t me = std::min(M, mc + MC);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * RT;
        const int64_t R = std::min<int64_t>(RT, N - n0);
        const uint8_t* Wt = W + t * nb * RT * (QK / 2);
        const ST* St = S + t * nb * RT;
        const ST* Mt = Mn + t * nb * RT;
        int64_t m = mc;
        for (; m + 4 <= me; m += 4) {
          const int8_t* qa[4];
          const float* cs[4];
          for (int j = 0; j < 4; ++j) {
            qa[j] = a.q.data() + (m + j) * K;
            cs[j] = c4.data() + j * RT * nb;
            combine_scales(St, nb * RT, a.d4.data() + (m + j) * nb * RT, c4.data() + j * RT * nb);
          }
          float out4[4][RT];
          TPL_TILE(q4_tile_x4)(Wt, nb, qa, cs, out4);
          for (int j = 0; j < 4; ++j) {
            dot_mins4(Mt, nb * RT, a.s4.data() + (m + j) * nb * RT, out4[j]);
            for (int64_t r = 0; r < R; ++r) y[(m + j) * N + n0 + r] = out4[j][r];
          }
        }
        for (; m < me; ++m) {
          TPL_TILE(q4_tile)(Wt, St, Mt, nb, a.q.data() + m * K, a.d4.data() + m * nb * RT, a.s4.data() + m * nb * RT, out);
          for (int64_t r = 0; r < R; ++r) y[m * N + n0 + r] = out[r];
        }
      }
    }
  });
}

// ---- dequantization of packed tiles to float32 [T*4, K] (bit-exact with the PyTorch
// reference: d*q, then + m) ----
template <typename ST>
void q8_dequant_impl(const int8_t* W, const ST* S, int64_t T, int64_t nb, float* out) {
  const int64_t K = nb * QK;
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < nb; ++b)
        for (int r = 0; r < RT; ++r) {
          const int64_t i = (t * nb + b) * RT + r;
          const __m256 d = _mm256_set1_ps(load1(S + i));
          const int8_t* w = W + i * QK;
          float* o = out + (t * RT + r) * K + b * QK;
          for (int j = 0; j < 4; ++j) {
            const __m256i wi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * j)));
            _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(wi), d));
          }
        }
  });
}

template <typename ST>
void q4_dequant_impl(const uint8_t* W, const ST* S, const ST* Mn, int64_t T, int64_t nb, float* out) {
  const int64_t K = nb * QK;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < nb; ++b)
        for (int r = 0; r < RT; ++r) {
          const int64_t i = (t * nb + b) * RT + r;
          const __m256 d = _mm256_set1_ps(load1(S + i));
          const __m256 m = _mm256_set1_ps(load1(Mn + i));
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W + i * (QK / 2)));
          const __m128i lo = _mm_and_si128(raw, low4);
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
          float* o = out + (t * RT + r) * K + b * QK;
          const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
          for (int j = 0; j < 4; ++j) {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
            _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_mul_ps(q, d), m));
          }
        }
  });
}

}  // namespace

// y[M, N] = x[M, K] @ dequant(W)^T, W packed int8 tiles, N = number of real rows
torch::Tensor q8_matvec(torch::Tensor x, torch::Tensor qpack, torch::Tensor spack, int64_t N) {
  auto [T, nb] = check_packed(qpack, at::kChar, QK, spack, nullptr, N);
  check_x(x, nb * QK);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (nb == 0) return y.zero_();
  if (spack.scalar_type() == at::kHalf)
    q8_matvec_impl(x.data_ptr<float>(), M, nb, qpack.data_ptr<int8_t>(), spack.data_ptr<at::Half>(), T, N,
                   y.data_ptr<float>());
  else
    q8_matvec_impl(x.data_ptr<float>(), M, nb, qpack.data_ptr<int8_t>(), spack.data_ptr<float>(), T, N,
                   y.data_ptr<float>());
  return y;
}

torch::Tensor q4_matvec(torch::Tensor x, torch::Tensor qpack, torch::Tensor spack, torch::Tensor mpack,
                        int64_t N) {
  auto [T, nb] = check_packed(qpack, at::kByte, QK / 2, spack, &mpack, N);
  check_x(x, nb * QK);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (nb == 0) return y.zero_();
  if (spack.scalar_type() == at::kHalf)
    q4_matvec_impl(x.data_ptr<float>(), M, nb, qpack.data_ptr<uint8_t>(), spack.data_ptr<at::Half>(),
                   mpack.data_ptr<at::Half>(), T, N, y.data_ptr<float>());
  else
    q4_matvec_impl(x.data_ptr<float>(), M, nb, qpack.data_ptr<uint8_t>(), spack.data_ptr<float>(),
                   mpack.data_ptr<float>(), T, N, y.data_ptr<float>());
  return y;
}

// float32 [T*4, K] from packed tiles (the caller slices off padding rows)
torch::Tensor q8_dequant(torch::Tensor qpack, torch::Tensor spack) {
  auto [T, nb] = check_packed(qpack, at::kChar, QK, spack, nullptr, qpack.size(0) * RT);
  auto out = torch::empty({T * RT, nb * QK}, qpack.options().dtype(at::kFloat));
  if (T == 0 || nb == 0) return out;
  if (spack.scalar_type() == at::kHalf)
    q8_dequant_impl(qpack.data_ptr<int8_t>(), spack.data_ptr<at::Half>(), T, nb, out.data_ptr<float>());
  else
    q8_dequant_impl(qpack.data_ptr<int8_t>(), spack.data_ptr<float>(), T, nb, out.data_ptr<float>());
  return out;
}

torch::Tensor q4_dequant(torch::Tensor qpack, torch::Tensor spack, torch::Tensor mpack) {
  auto [T, nb] = check_packed(qpack, at::kByte, QK / 2, spack, &mpack, qpack.size(0) * RT);
  auto out = torch::empty({T * RT, nb * QK}, qpack.options().dtype(at::kFloat));
  if (T == 0 || nb == 0) return out;
  if (spack.scalar_type() == at::kHalf)
    q4_dequant_impl(qpack.data_ptr<uint8_t>(), spack.data_ptr<at::Half>(), mpack.data_ptr<at::Half>(), T, nb,
                    out.data_ptr<float>());
  else
    q4_dequant_impl(qpack.data_ptr<uint8_t>(), spack.data_ptr<float>(), mpack.data_ptr<float>(), T, nb,
                    out.data_ptr<float>());
  return out;
}

#include "attention_avx2.inc"
#include "decode_layer.inc"

// The classes are module-local: the avx2 and avx512 builds are loaded side by side in one process
// (tests, A/B runs), and pybind11 would otherwise refuse a second global "PackedLinear".
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kernel_path", []() { return std::string(TPL_AVX512 ? "avx512" : "avx2"); },
        "the kernel path this module was built for");
#if TPL_AVX512
  // from this many activation rows on, q8_matvec/q4_matvec run the VNNI GEMM (matvec_avx512.inc)
  m.attr("vnni_gemm_min_rows") = GEMM_VNNI_MIN_ROWS;
#endif
  m.def("q8_matvec", &q8_matvec, "y = x @ dequant_int8(W)^T with int8-quantized activations (AVX2)");
  m.def("q4_matvec", &q4_matvec, "y = x @ dequant_int4(W)^T with int8-quantized activations (AVX2)");
  m.def("q8_dequant", &q8_dequant, "dequantize packed int8 tiles to float32 [T*4, K]");
  m.def("q4_dequant", &q4_dequant, "dequantize packed int4 tiles to float32 [T*4, K]");
  m.def("q8f_matvec", &q8f_matvec, "y = x @ dequant_int8(W)^T with float32 activations (AVX2)");
  m.def("decode_attention", &decode_attention, "single-query GQA attention over the KV cache (AVX2)");
  py::class_<PackedLinear>(m, "PackedLinear", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t>(), py::arg("qpack"),
           py::arg("spack"), py::arg("mpack"), py::arg("out_features"));
  py::class_<DecodeLayer>(m, "DecodeLayer", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, double, PackedLinear, PackedLinear, PackedLinear, PackedLinear, int64_t,
                    int64_t, int64_t>())
      .def("attention", &DecodeLayer::attention, "attention half of a block for one new token per row")
      .def("mlp", &DecodeLayer::mlp, "MLP half of a block for one new token per row");
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())
      .def(py::init<std::vector<DecodeLayer>>())
      .def("run", &DecodeStack::run, "every block of a decode step, all-reducing each half with reduce (or None)");
}
