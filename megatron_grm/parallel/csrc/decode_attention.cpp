// One decode step's attention on the CPU, reading the KV cache once at close to the memory's rate.
//
// For each (row, KV group) the group's query heads (R of them, or a group of rows' stacked queries)
// attend over keys/values at positions [start, end): scores, an online softmax and the weighted values
// block by block, so each key and value is read from memory once and used while it is in L1. torch's
// batched matmuls do the same work in three passes over the cache (scores, softmax, weighted sum) and read
// it at ~17-19 GB/s on the project's 2-core AMD EPYC; this loop is bound by the memory instead (see
// megatron_grm/parallel/cpu_decode_kernel.py for the measurements). For heads of 16, 32, 64 or 128 channels,
// attend_tiles scores a few positions at once in AVX2 registers and prefetches the block it reads next, so
// the reads overlap the arithmetic; AVX-512 builds run it too. On a 2-core AVX-512 Xeon (session 45) it read a
// step of bench/rollout.py's cache (32 rows of ~1,200 positions, 4 layers) in 10.6 ms against 13.4 for the
// AVX-512 kernel that kept the queries and the weighted values in zmm registers (one horizontal sum per
// position and query) and 10.0 for a plain read; 1.1-1.6x faster than it also in bf16, with 1 or 4 query
// heads per KV head and with heads of 128, so that kernel was removed.
//
// Output per query: the maximum score, the sum of exp(score - max) and the softmax-weighted values
// (normalised), which is how megatron_grm.parallel.cpu_decode merges parts of a split softmax. A query
// that sees no key (all masked) gives max -inf, sum 0 and output 0.
//
// Built by cpu_decode_kernel.py with the machine's C++ compiler (-O3 -march=native -fopenmp, no
// -ffast-math: masks are -inf), once per cache dtype (-DMGRM_DECODE_DTYPE=0, 1 or 2; the fp32 unit holds the
// entry points): each dtype instantiates every head size's kernels, and as one unit they were 17 of a build's
// 25 CPU-seconds, which the build's compilers could not share. OpenMP resolves to the runtime torch already
// loaded, so the kernel runs on torch's threads.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernel_math.h"
#include "simd16.h"

#ifndef MGRM_DECODE_DTYPE
#error "decode_attention.cpp is compiled once per cache dtype: -DMGRM_DECODE_DTYPE=0 (fp32), 1 (bf16) or 2 (fp16)"
#endif

namespace mgrm {

struct Strides {
  int64_t row, group, position;  // in elements; channels are contiguous
};

// One call of mgrm_decode_attention (below), less its dtype: what a dtype's unit receives.
struct DecodeCall {
  int threads;
  const float* q;
  int64_t B, G, R, D;
  const void* k;
  Strides ks;
  const void* v;
  Strides vs;
  const float* mask;
  int64_t mask_row;
  const int64_t* row_start;
  int64_t start, end;
  float scale;
  float *max_out, *sum_out, *out;
};

// Each defined in its dtype's unit.
void decode_attention_fp32(const DecodeCall& call);
void decode_attention_bf16(const DecodeCall& call);
#ifdef MGRM_HAVE_FP16
void decode_attention_fp16(const DecodeCall& call);
#endif

}  // namespace mgrm

namespace {

using mgrm::softmax_block;
using mgrm::Strides;
using mgrm::to_float;

constexpr int64_t kBlock = 64;  // positions per block: 64 keys + 64 values of 64 fp32 channels = 32 KB

// One (row, group): queries q[R][D] over positions [start, end). `scratch` holds R * (kBlock + D) floats.
template <typename T, int64_t kDim>
void attend(const float* __restrict q, const T* __restrict k, const T* __restrict v, int64_t k_step,
            int64_t v_step, const float* __restrict mask, int64_t start, int64_t end, int64_t R, int64_t dim_arg,
            float scale, float* __restrict scratch, float* __restrict max_out, float* __restrict sum_out,
            float* __restrict out) {
  const int64_t D = kDim > 0 ? kDim : dim_arg;
  float* __restrict scores = scratch;          // [R][kBlock]
  float* __restrict acc = scratch + R * kBlock;  // [R][D]
  for (int64_t r = 0; r < R; ++r) {
    max_out[r] = -INFINITY;
    sum_out[r] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * R * D);
  for (int64_t t0 = start; t0 < end; t0 += kBlock) {
    const int64_t n = end - t0 < kBlock ? end - t0 : kBlock;
    for (int64_t t = 0; t < n; ++t) {
      const T* __restrict key = k + (t0 + t) * k_step;
      const float add = mask ? mask[t0 + t] : 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        const float* __restrict qr = q + r * D;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_float(key[d]);
        scores[r * kBlock + t] = dot * scale + add;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const float c = softmax_block(scores + r * kBlock, n, max_out[r], sum_out[r]);
      if (c != 1.0f) {  // rescale what was accumulated under the old maximum
        float* __restrict a = acc + r * D;
        for (int64_t d = 0; d < D; ++d) a[d] *= c;
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const T* __restrict value = v + (t0 + t) * v_step;
      for (int64_t r = 0; r < R; ++r) {
        const float p = scores[r * kBlock + t];
        float* __restrict a = acc + r * D;
        for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(value[d]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = sum_out[r] > 0.0f ? 1.0f / sum_out[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = acc[r * D + d] * inv;
  }
}

#ifdef MGRM_SIMD16
// attend()'s arithmetic in AVX2 register tiles (8 lanes: AVX-512 CPUs run them too), and the next reads
// prefetched while it runs. On the project's 2-core AVX2 EPYC the loop above spent ~58 cycles a position (2
// query heads of 64, cache in L3) on the dot products' horizontal sums and the weighted values' accumulators
// in memory, and a step's reads waited on that arithmetic instead of overlapping it: one step of
// bench/decode_attention.py's shapes took 13.2-13.9 ms where a loop with the same reads and almost no
// arithmetic took 9.3 (session 43). Here up to 4 query heads at a time score P positions at once (R x P
// accumulators, their lane sums reduced together), the weighted values run over chunks of channels held in
// registers through a block, and prefetches ask for a block's values while its keys are scored and for the
// next block's keys while the values are summed: 11.96 against 13.51 ms a step, alternating in one process
// (median of 14 rounds).

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const uint16_t* x) {
  return mgrm::widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
#ifdef MGRM_HAVE_FP16
inline __m256 load8(const _Float16* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
#endif

// Ask for the cache lines of `count` rows of `bytes` each, `step` elements apart (prefetcht2: the block is
// read within microseconds, so there is no need to push the lines in use out of L1).
template <typename T>
inline void prefetch_rows(const T* first, int64_t step, int64_t count, int64_t bytes) {
  for (int64_t t = 0; t < count; ++t)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(first + t * step) + b, 0, 1);
}

// The lane sums of a[0:P] into s[0:P].
template <int P>
inline void lane_sums(const __m256* a, float* s) {
  if constexpr (P == 1) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a[0]), _mm256_extractf128_ps(a[0], 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    s[0] = _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  } else if constexpr (P == 2) {
    const __m256 h = _mm256_hadd_ps(a[0], a[1]);
    const __m128 x = _mm_hadd_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_setzero_ps());
    s[0] = _mm_cvtss_f32(x);
    s[1] = _mm_cvtss_f32(_mm_movehdup_ps(x));
  } else {
    static_assert(P % 4 == 0, "lane_sums: P is 1, 2 or a multiple of 4");
    for (int p = 0; p < P; p += 4) {
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[p], a[p + 1]), _mm256_hadd_ps(a[p + 2], a[p + 3]));
      _mm_storeu_ps(s + p, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
}

// Unscaled scores of R queries q[R][D] against P consecutive keys: s[r * s_stride + p] = q[r] . key[p]. Each
// key is read in order (the queries come from L1), which kept the hardware's prefetch on the stream.
template <typename T, int R, int P, int D>
inline void score_tile(const float* __restrict q, const T* __restrict key, int64_t k_step, float* __restrict s,
                       int64_t s_stride) {
  __m256 a[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) a[r][p] = _mm256_setzero_ps();
  for (int p = 0; p < P; ++p) {
    for (int c = 0; c < D / 8; ++c) {
      const __m256 kv = load8(key + p * k_step + 8 * c);
      for (int r = 0; r < R; ++r) a[r][p] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + 8 * c), kv, a[r][p]);
    }
  }
  for (int r = 0; r < R; ++r) lane_sums<P>(a[r], s + r * s_stride);
}

// Channels [8*c0, 8*(c0+CC)) of acc[R][D] become acc * factor[r] + the sum over t < n of w[r][t] * value[t],
// added in t's order (attend()'s arithmetic). The first chunk also prefetches `next_count` rows of
// `next_keys`.
template <typename T, int R, int CC, int D>
inline void value_chunk(const float* __restrict w, int64_t w_stride, const T* __restrict value, int64_t v_step,
                        int64_t n, int c0, const float* __restrict factor, float* __restrict acc,
                        const T* next_keys, int64_t k_step, int64_t next_count) {
  __m256 a[R][CC];
  for (int r = 0; r < R; ++r) {
    const __m256 f = _mm256_set1_ps(factor[r]);
    for (int c = 0; c < CC; ++c) a[r][c] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + 8 * (c0 + c)), f);
  }
  for (int64_t t = 0; t < n; ++t) {
    if (t < next_count) prefetch_rows(next_keys + t * k_step, k_step, 1, D * int64_t(sizeof(T)));
    __m256 wt[R];
    for (int r = 0; r < R; ++r) wt[r] = _mm256_broadcast_ss(w + r * w_stride + t);
    for (int c = 0; c < CC; ++c) {
      const __m256 vv = load8(value + t * v_step + 8 * (c0 + c));
      for (int r = 0; r < R; ++r) a[r][c] = _mm256_fmadd_ps(wt[r], vv, a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CC; ++c) _mm256_storeu_ps(acc + r * D + 8 * (c0 + c), a[r][c]);
}

// One block [t0, t0 + n) for R (<= 4) queries: scores, the online softmax, the weighted values. P positions
// per score tile and CC channel vectors per values pass keep R x P and R x CC accumulators within 8 of the
// 16 ymm registers. `prefetch` (the first query group): this block's values while scoring, the next block's
// `next_count` keys while summing.
template <typename T, int R, int D>
inline void block_group(const float* q, const T* k, const T* v, int64_t k_step, int64_t v_step, const float* mask,
                        int64_t t0, int64_t n, float scale, float* scores, int64_t s_stride, float* top,
                        float* total, float* acc, bool prefetch, int64_t next_count) {
  constexpr int P = R == 1 ? 8 : R == 2 ? 4 : 2;
  constexpr int kMostCC = R == 1 ? 8 : R == 2 ? 4 : 2;
  constexpr int CC = kMostCC < D / 8 ? kMostCC : D / 8;  // a head of 16 or 32 channels has only 2 or 4 vectors
  constexpr int64_t kRowBytes = D * int64_t(sizeof(T));
  int64_t t = 0;
  for (; t + P <= n; t += P) {
    if (prefetch) prefetch_rows(v + (t0 + t) * v_step, v_step, P, kRowBytes);
    score_tile<T, R, P, D>(q, k + (t0 + t) * k_step, k_step, scores + t, s_stride);
  }
  for (; t < n; ++t) {
    if (prefetch) prefetch_rows(v + (t0 + t) * v_step, v_step, 1, kRowBytes);
    score_tile<T, R, 1, D>(q, k + (t0 + t) * k_step, k_step, scores + t, s_stride);
  }
  float factor[R];
  for (int r = 0; r < R; ++r) {
    float* s = scores + r * s_stride;
    for (int64_t i = 0; i < n; ++i) s[i] = s[i] * scale + (mask ? mask[t0 + i] : 0.0f);
    factor[r] = mgrm::softmax_block(s, n, top[r], total[r]);
  }
  const T* next_keys = k + (t0 + n) * k_step;
  for (int c0 = 0; c0 < D / 8; c0 += CC)
    value_chunk<T, R, CC, D>(scores, s_stride, v + t0 * v_step, v_step, n, c0, factor, acc, next_keys, k_step,
                             prefetch && c0 == 0 ? next_count : 0);
}

// attend() for heads of D (16, 32, 64 or 128) channels and any number of query heads, taken 4 at a time
// over each block of keys and values while the block is in L1 (at most 16 KB of fp32 keys: 64 positions of
// up to 64 channels, 32 of 128). Heads of 16 (conf/model/tiny.yaml) and 32 (the CPU demo's tiny_grm) took
// the plain loop until session 51: a decode step of 150 rows of ~400 positions, 4 layers of 4 heads of 32,
// at 75% of a plain read of the cache (bench/decode_attention.py --rows 150 --positions 400 --kv-heads 4
// --rep 1 --dim 32: 14.55 ms), here 9.61 ms.
template <typename T, int D>
void attend_tiles(const float* __restrict q, const T* __restrict k, const T* __restrict v, int64_t k_step,
                  int64_t v_step, const float* __restrict mask, int64_t start, int64_t end, int64_t R, float scale,
                  float* __restrict scratch, float* __restrict max_out, float* __restrict sum_out,
                  float* __restrict out) {
  constexpr int64_t kTileBlock = 4096 / D < kBlock ? 4096 / D : kBlock;
  static_assert(kTileBlock <= kBlock, "the scratch holds kBlock scores per query");
  float* scores = scratch;            // [R][kTileBlock]
  float* acc = scratch + R * kBlock;  // [R][D]
  for (int64_t r = 0; r < R; ++r) {
    max_out[r] = -INFINITY;
    sum_out[r] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * R * D);
  for (int64_t t0 = start; t0 < end; t0 += kTileBlock) {
    const int64_t n = end - t0 < kTileBlock ? end - t0 : kTileBlock;
    const int64_t after = end - t0 - n;
    const int64_t next_count = after < kTileBlock ? after : kTileBlock;
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      mgrm::with_rows<4>(int(R - r0 < 4 ? R - r0 : 4), [&](auto G) {
        block_group<T, decltype(G)::value, D>(q + r0 * D, k, v, k_step, v_step, mask, t0, n, scale,
                                              scores + r0 * kTileBlock, kTileBlock, max_out + r0, sum_out + r0,
                                              acc + r0 * D, r0 == 0, next_count);
      });
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = sum_out[r] > 0.0f ? 1.0f / sum_out[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = acc[r * D + d] * inv;
  }
}
#endif  // MGRM_SIMD16

// One (row, group): attend_tiles for heads of 16, 32, 64 or 128 channels with AVX2 or AVX-512, else attend()
// (kDim 0: a head size known only at run time).
template <typename T, int64_t kDim>
void attend_any(const float* q, const T* k, const T* v, int64_t k_step, int64_t v_step, const float* mask,
                int64_t start, int64_t end, int64_t R, int64_t D, float scale, float* scratch, float* max_out,
                float* sum_out, float* out) {
#ifdef MGRM_SIMD16
  if constexpr (kDim == 16 || kDim == 32 || kDim == 64 || kDim == 128) {
    attend_tiles<T, kDim>(q, k, v, k_step, v_step, mask, start, end, R, scale, scratch, max_out, sum_out, out);
    return;
  }
#endif
  attend<T, kDim>(q, k, v, k_step, v_step, mask, start, end, R, D, scale, scratch, max_out, sum_out, out);
}

template <typename T>
void run(const mgrm::DecodeCall& c) {
  const int threads = c.threads;
  const float *q = c.q, *mask = c.mask;
  const int64_t B = c.B, G = c.G, R = c.R, D = c.D, mask_row = c.mask_row, start = c.start, end = c.end;
  const int64_t* row_start = c.row_start;
  const Strides ks = c.ks, vs = c.vs;
  const float scale = c.scale;
  float *max_out = c.max_out, *sum_out = c.sum_out, *out = c.out;
  const T* k = static_cast<const T*>(c.k);
  const T* v = static_cast<const T*>(c.v);
  // (row, group) pairs per dynamic chunk (rows differ in length where padding is skipped): up to 8, two
  // rows of 4 KV heads that one thread reads as one run of a head-major cache, while every thread still
  // gets several chunks. 8 against 2 in a rollout of bench/rollout.py's model and prompts (32 rows, the
  // library swapped in one process, 5 pairs): median decode step 22.47 -> 22.02 ms, faster in each pair.
  const int64_t quarter_share = B * G / (4 * int64_t(threads));  // a quarter of each thread's pairs
  const int64_t chunk = quarter_share < 1 ? 1 : (quarter_share > 8 ? 8 : quarter_share);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(R * (kBlock + D));
#pragma omp for collapse(2) schedule(dynamic, chunk)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t query = (b * G + g) * R;
        const T* kb = k + b * ks.row + g * ks.group;
        const T* vb = v + b * vs.row + g * vs.group;
        const float* mb = mask ? mask + b * mask_row : nullptr;
        const int64_t first = row_start && row_start[b] > start ? (row_start[b] < end ? row_start[b] : end) : start;
        const auto with_dim = [&](auto dim) {  // the head size as a compile-time constant (0: any)
          attend_any<T, decltype(dim)::value>(q + query * D, kb, vb, ks.position, vs.position, mb, first, end, R,
                                              D, scale, scratch.data(), max_out + query, sum_out + query,
                                              out + query * D);
        };
        switch (D) {
          case 16: with_dim(std::integral_constant<int64_t, 16>{}); break;
          case 32: with_dim(std::integral_constant<int64_t, 32>{}); break;
          case 64: with_dim(std::integral_constant<int64_t, 64>{}); break;
          case 128: with_dim(std::integral_constant<int64_t, 128>{}); break;
          default: with_dim(std::integral_constant<int64_t, 0>{});
        }
      }
    }
  }
}

}  // namespace

#if MGRM_DECODE_DTYPE == 0
void mgrm::decode_attention_fp32(const DecodeCall& call) { run<float>(call); }
#elif MGRM_DECODE_DTYPE == 1
void mgrm::decode_attention_bf16(const DecodeCall& call) { run<uint16_t>(call); }
#elif MGRM_DECODE_DTYPE == 2 && defined(MGRM_HAVE_FP16)
void mgrm::decode_attention_fp16(const DecodeCall& call) { run<_Float16>(call); }
#endif

#if MGRM_DECODE_DTYPE == 0
extern "C" {

// dtype: 0 fp32, 1 bf16, 2 fp16 (the cache's; queries are fp32). q [B, G, R, D] contiguous; keys/values
// element (b, g, t, d) at b*row + g*group + t*position + d; mask (additive fp32, may be null) element (b, t)
// at b*mask_row + t; row_start (may be null): row b reads from max(start, row_start[b]), skipping a left
// padding without reading it; outputs max/sum [B, G, R], out [B, G, R, D]. Returns 0, or -1 for a dtype not
// compiled in (mgrm_decode_attention_dtypes).
int mgrm_decode_attention(int dtype, int threads, const float* q, int64_t B, int64_t G, int64_t R, int64_t D,
                          const void* k, int64_t k_row, int64_t k_group, int64_t k_position, const void* v,
                          int64_t v_row, int64_t v_group, int64_t v_position, const float* mask, int64_t mask_row,
                          const int64_t* row_start, int64_t start, int64_t end, float scale, float* max_out,
                          float* sum_out, float* out) {
  const mgrm::DecodeCall call{threads, q, B, G, R, D, k, {k_row, k_group, k_position}, v,
                              {v_row, v_group, v_position}, mask, mask_row, row_start, start, end, scale,
                              max_out, sum_out, out};
  switch (dtype) {
    case 0:
      mgrm::decode_attention_fp32(call);
      return 0;
    case 1:
      mgrm::decode_attention_bf16(call);
      return 0;
#ifdef MGRM_HAVE_FP16
    case 2:
      mgrm::decode_attention_fp16(call);
      return 0;
#endif
    default:
      return -1;
  }
}

// The vector instructions the kernels were built for (simd16.h): "AVX-512", "AVX2", or "scalar" (no prefill
// kernel, the decode kernel's plain loops).
const char* mgrm_attention_simd() {
#ifdef MGRM_SIMD16
  return mgrm::kSimdName;
#else
  return "scalar";
#endif
}

// Bit d set: dtype code d is compiled in.
int mgrm_decode_attention_dtypes() {
#ifdef MGRM_HAVE_FP16
  return 0b111;
#else
  return 0b011;
#endif
}

}  // extern "C"
#endif
