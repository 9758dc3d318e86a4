// 16 fp32 lanes as the attention kernels' unit of vector work: one AVX-512 register, or a pair of AVX2
// ones. The kernels are written once against F32x16; what differs between the two instruction sets is how
// many such vectors fit the register file (kVectorRegisters16), which sets their tile shapes. Built with
// neither (-march=native on an older CPU, or another architecture), MGRM_SIMD16 is undefined and only the
// scalar loops are compiled.
//
// AVX2 needs FMA and F16C with it (every x86-64 CPU with AVX2 since Haswell / Zen 1 has both): the AMD EPYC
// hosts of DGX A100 nodes (Zen 2) and Zen 3 servers have no AVX-512.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#define MGRM_SIMD16 1

namespace mgrm {

// 8 bf16: the high halves of 8 fp32 (AVX2, which every AVX-512 CPU has too).
inline __m256 widen_bf16(__m128i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)); }

#if defined(__AVX512F__)

// constexpr, not inline: an inline variable is one GNU-unique symbol across every library loaded in a process,
// so a second build (for an older CPU) would report the first one's name.
constexpr const char* kSimdName = "AVX-512";
constexpr int kVectorRegisters16 = 32;  // zmm registers, one F32x16 each

struct F32x16 {
  __m512 v;
};
inline F32x16 zero16() { return {_mm512_setzero_ps()}; }
inline F32x16 set16(float x) { return {_mm512_set1_ps(x)}; }
inline F32x16 load16(const float* x) { return {_mm512_loadu_ps(x)}; }
inline F32x16 load16(const uint16_t* x) {  // bf16: the high half of an fp32
  return {_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16))};
}
#ifdef __FLT16_MAX__
inline F32x16 load16(const _Float16* x) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)))};
}
#endif
inline void store16(float* x, F32x16 a) { _mm512_storeu_ps(x, a.v); }
inline F32x16 fmadd16(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F32x16 mul16(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline float sum16(F32x16 a) { return _mm512_reduce_add_ps(a.v); }
inline F32x16 add16(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F32x16 sub16(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
// The larger lane by lane, `a`'s lane where either is NaN (a NaN in `b` is skipped).
inline F32x16 max16(F32x16 a, F32x16 b) { return {_mm512_max_ps(b.v, a.v)}; }
inline float max_lane16(F32x16 a) { return _mm512_reduce_max_ps(a.v); }
inline F32x16 fnmadd16(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline F32x16 round16(F32x16 a) {  // to the nearest whole number
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline F32x16 pow2_16(F32x16 n) {  // 2^n for whole n in [-126, 127]
  const __m512i exponent = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23))};
}
inline F32x16 zero_below16(F32x16 x, float limit, F32x16 v) {  // 0 where x < limit, else v
  const __mmask16 below = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(limit), _CMP_LT_OQ);
  return {_mm512_maskz_mov_ps(static_cast<__mmask16>(~below), v.v)};
}

#else  // AVX2 + FMA + F16C

constexpr const char* kSimdName = "AVX2";
constexpr int kVectorRegisters16 = 8;  // 16 ymm registers, two per F32x16

struct F32x16 {
  __m256 lo, hi;
};
inline F32x16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F32x16 set16(float x) {
  const __m256 v = _mm256_set1_ps(x);
  return {v, v};
}
inline F32x16 load16(const float* x) { return {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)}; }
inline F32x16 load16(const uint16_t* x) {
  return {widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))),
          widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8)))};
}
#ifdef __FLT16_MAX__
inline F32x16 load16(const _Float16* x) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8)))};
}
#endif
inline void store16(float* x, F32x16 a) {
  _mm256_storeu_ps(x, a.lo);
  _mm256_storeu_ps(x + 8, a.hi);
}
inline F32x16 fmadd16(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 mul16(F32x16 a, F32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
// The 16 lanes folded into one by `op8` on halves, then `op4` (the same operation on 8 and 4 lanes).
template <typename Op8, typename Op4>
inline float fold16(F32x16 a, Op8 op8, Op4 op4) {
  const __m256 eight = op8(a.lo, a.hi);
  __m128 four = op4(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  four = op4(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(op4(four, _mm_movehdup_ps(four)));
}
inline float sum16(F32x16 a) {
  return fold16(a, [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); },
                [](__m128 x, __m128 y) { return _mm_add_ps(x, y); });
}
inline F32x16 add16(F32x16 a, F32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F32x16 sub16(F32x16 a, F32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
// The larger lane by lane, `a`'s lane where either is NaN (a NaN in `b` is skipped).
inline F32x16 max16(F32x16 a, F32x16 b) { return {_mm256_max_ps(b.lo, a.lo), _mm256_max_ps(b.hi, a.hi)}; }
inline float max_lane16(F32x16 a) {
  return fold16(a, [](__m256 x, __m256 y) { return _mm256_max_ps(x, y); },
                [](__m128 x, __m128 y) { return _mm_max_ps(x, y); });
}
inline F32x16 fnmadd16(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 round16(F32x16 a) {  // to the nearest whole number
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kNearest), _mm256_round_ps(a.hi, kNearest)};
}
inline __m256 pow2_8(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F32x16 pow2_16(F32x16 n) { return {pow2_8(n.lo), pow2_8(n.hi)}; }  // 2^n for whole n in [-126, 127]
inline F32x16 zero_below16(F32x16 x, float limit, F32x16 v) {  // 0 where x < limit, else v
  const __m256 l = _mm256_set1_ps(limit);
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.lo, l, _CMP_LT_OQ), v.lo),
          _mm256_andnot_ps(_mm256_cmp_ps(x.hi, l, _CMP_LT_OQ), v.hi)};
}

#endif

// exp(x) for x <= 0, 16 lanes: kernel_math.h's exp_nonpositive lane by lane (the same range reduction and
// polynomial, its multiply-adds fused): 0 below -87 and at -inf, NaN kept. The softmax's exps as scalar calls
// the compiler vectorised cost ~10% of the prefill attention's time (session 44).
inline F32x16 exp16_nonpositive(F32x16 x) {
  const F32x16 clamped = max16(x, set16(-87.0f));  // a NaN in x stays
  const F32x16 n = round16(mul16(clamped, set16(1.44269504088896341f)));
  const F32x16 r = fmadd16(n, set16(2.12194440e-4f), fnmadd16(n, set16(0.693359375f), clamped));
  F32x16 p = set16(1.0f / 720.0f);
  for (const float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) p = fmadd16(p, r, set16(c));
  return zero_below16(x, -87.0f, mul16(p, pow2_16(n)));
}

}  // namespace mgrm

#endif  // MGRM_SIMD16

namespace mgrm {

// Calls f(std::integral_constant<int, n>{}) for a runtime n in [1, Max]: a micro-kernel templated on its row
// count, picked at run time without a switch per call site.
template <int Max, typename F>
inline void with_rows(int n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_rows<Max - 1>(n, static_cast<F&&>(f));
  }
  f(std::integral_constant<int, Max>{});
}

}  // namespace mgrm
