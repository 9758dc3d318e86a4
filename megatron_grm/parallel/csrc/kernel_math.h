// Helpers the CPU attention kernels share (decode_attention.cpp, prefill_attention.cpp): 16-bit floats
// widened to fp32, exp(x) for x <= 0 without libm, and a block of an online softmax (16 lanes at a time where
// simd16.h has vectors: GCC left the maximum's loop scalar and branchy without -ffinite-math-only).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd16.h"

namespace mgrm {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
#ifdef __FLT16_MAX__  // the compiler has _Float16 (GCC >= 12 and clang on x86-64, aarch64)
#define MGRM_HAVE_FP16 1
inline float to_float(_Float16 x) { return static_cast<float>(x); }
#endif

// fp32 stored in an output's dtype: bf16 rounded to nearest even (torch's rounding), a NaN kept a NaN.
inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  *out = std::isnan(x) ? static_cast<uint16_t>(0x7FC0)
                       : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
#ifdef MGRM_HAVE_FP16
inline void narrow(float x, _Float16* out) { *out = static_cast<_Float16>(x); }
#endif

// exp(x) for x <= 0 (scores minus their maximum) in plain arithmetic the compiler vectorises (libm's
// expf only vectorises under -ffast-math, which would also assume no infinities). Range reduction to
// 2^n * e^r, |r| <= ln2/2, and a degree-6 polynomial: relative error ~2e-7. Below -87 (and -inf) gives 0.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// The largest of s[0:n] (-inf for none), NaNs skipped: 16 lanes at a time where simd16.h has vectors.
inline float max_of(const float* __restrict s, int64_t n) {
  float top = -INFINITY;
  int64_t t = 0;
#ifdef MGRM_SIMD16
  if (n >= 16) {
    F32x16 lanes = set16(-INFINITY);
    for (; t + 16 <= n; t += 16) lanes = max16(lanes, load16(s + t));
    top = max_lane16(lanes);
  }
#endif
  for (; t < n; ++t) top = s[t] > top ? s[t] : top;
  return top;
}

// sum(exp(s[0:n] - top)) for top >= every s (NaN propagates), each exp also written to out[0:n] when out is
// given (it may be s): 16 lanes at a time where simd16.h has vectors.
inline float sum_exp(const float* s, int64_t n, float top, float* out = nullptr) {
  float sum = 0.0f;
  int64_t t = 0;
#ifdef MGRM_SIMD16
  if (n >= 16) {
    const F32x16 shift = set16(top);
    F32x16 sums = zero16();
    for (; t + 16 <= n; t += 16) {
      const F32x16 p = exp16_nonpositive(sub16(load16(s + t), shift));
      if (out) store16(out + t, p);
      sums = add16(sums, p);
    }
    sum = sum16(sums);
  }
#endif
  for (; t < n; ++t) {
    const float p = exp_nonpositive(s[t] - top);
    if (out) out[t] = p;
    sum += p;
  }
  return sum;
}

// One block of a query's online softmax (flash attention's): the scores s[0:n] (-inf where masked) become
// exp(s - top) under the running maximum `top`, raised first to the block's own; the running sum of exp
// `total` is rescaled and the block's sum added. Returns the factor the query's accumulated weighted values
// need (1 when the maximum stayed; 0 at its first visible key). A block with no visible key becomes zeros.
// NaN scores are skipped by the maximum and stay NaN.
inline float softmax_block(float* __restrict s, int64_t n, float& top, float& total) {
  const float block_max = max_of(s, n);
  if (block_max == -INFINITY) {
    for (int64_t t = 0; t < n; ++t) s[t] = 0.0f;
    return 1.0f;
  }
  float factor = 1.0f;
  if (block_max > top) {
    factor = exp_nonpositive(top - block_max);
    total *= factor;
    top = block_max;
  }
  total += sum_exp(s, n, top, s);
  return factor;
}

}  // namespace mgrm
