// One decode step's attention on the CPU, reading the KV cache once at close to the memory's rate.
//
// For each (row, KV group) the group's query heads (R of them, or a group of rows' stacked queries)
// attend over keys/values at positions [start, end): scores, an online softmax and the weighted values
// block by block, so each key and value is read from memory once and used while it is in L1. torch's
// batched matmuls do the same work in three passes over the cache (scores, softmax, weighted sum) and read
// it at ~17-19 GB/s on the project's 2-core AMD EPYC; this loop is bound by the memory instead (see
// megatron_grm/parallel/cpu_decode_kernel.py for the measurements). With AVX-512 and up to 4 query heads
// of 64 or 128 channels per KV head, attend_registers keeps the queries and the weighted values in
// registers and widens each key and value once.
//
// Output per query: the maximum score, the sum of exp(score - max) and the softmax-weighted values
// (normalised), which is how megatron_grm.parallel.cpu_decode merges parts of a split softmax. A query
// that sees no key (all masked) gives max -inf, sum 0 and output 0.
//
// Built by cpu_decode_kernel.py with the machine's C++ compiler (-O3 -march=native -fopenmp, no
// -ffast-math: masks are -inf). OpenMP resolves to the runtime torch already loaded, so the kernel runs on
// torch's threads.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_math.h"
#include "simd16.h"

namespace {

using mgrm::softmax_block;
using mgrm::to_float;

constexpr int64_t kBlock = 64;  // positions per block: 64 keys + 64 values of 64 fp32 channels = 32 KB

struct Strides {
  int64_t row, group, position;  // in elements; channels are contiguous
};

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
// attend() for up to 4 query heads of 64 or 128 channels: each key and value is widened and loaded once for
// all R queries. With AVX-512 the queries and the weighted values stay in registers. One step of
// bench/rollout.py's 4 layers (32 rows x 1,230 positions, 4 KV heads of 64), the two builds alternating in
// one process: 1.17x faster in bf16 and 1.04-1.18x in fp32 with 2 query heads per KV head, 1.64-1.69x with 3
// or 4, 1.15x and 1.63x for heads of 128 (session 36). Only with AVX-512: AVX2's 16 registers hold 8 F32x16,
// and there it ran at 0.81-0.88x (fp32) and 0.93-0.94x (bf16) the loop above's speed, also with the values'
// pass 16 channels at a time (session 37). More query heads (or a group of rows' stacked queries) take the
// loop above.
template <typename T, int R, int D>
void attend_registers(const float* __restrict q, const T* __restrict k, const T* __restrict v, int64_t k_step,
                      int64_t v_step, const float* __restrict mask, int64_t start, int64_t end, float scale,
                      float* __restrict scratch, float* __restrict max_out, float* __restrict sum_out,
                      float* __restrict out) {
  using namespace mgrm;
  constexpr int C = D / 16;
  float* __restrict scores = scratch;  // [R][kBlock]
  F32x16 query[R][C], acc[R][C];
  float top[R], total[R];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      query[r][c] = load16(q + r * D + 16 * c);
      acc[r][c] = zero16();
    }
    top[r] = -INFINITY;
    total[r] = 0.0f;
  }
  for (int64_t t0 = start; t0 < end; t0 += kBlock) {
    const int64_t n = end - t0 < kBlock ? end - t0 : kBlock;
    for (int64_t t = 0; t < n; ++t) {
      const T* key = k + (t0 + t) * k_step;
      F32x16 kv[C];
      for (int c = 0; c < C; ++c) kv[c] = load16(key + 16 * c);
      const float add = mask ? mask[t0 + t] : 0.0f;
      for (int r = 0; r < R; ++r) {
        F32x16 dot = mul16(query[r][0], kv[0]);
        for (int c = 1; c < C; ++c) dot = fmadd16(query[r][c], kv[c], dot);
        scores[r * kBlock + t] = sum16(dot) * scale + add;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float factor = softmax_block(scores + r * kBlock, n, top[r], total[r]);
      if (factor != 1.0f)  // rescale what was accumulated under the old maximum
        for (int c = 0; c < C; ++c) acc[r][c] = mul16(acc[r][c], set16(factor));
    }
    for (int64_t t = 0; t < n; ++t) {
      const T* value = v + (t0 + t) * v_step;
      F32x16 vv[C];
      for (int c = 0; c < C; ++c) vv[c] = load16(value + 16 * c);
      for (int r = 0; r < R; ++r) {
        const F32x16 weight = set16(scores[r * kBlock + t]);
        for (int c = 0; c < C; ++c) acc[r][c] = fmadd16(weight, vv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    max_out[r] = top[r];
    sum_out[r] = total[r];
    const F32x16 inv = set16(total[r] > 0.0f ? 1.0f / total[r] : 0.0f);
    for (int c = 0; c < C; ++c) store16(out + r * D + 16 * c, mul16(acc[r][c], inv));
  }
}

#endif  // MGRM_SIMD16

// One (row, group): attend_registers where it applies, else attend().
template <typename T, int64_t kDim>
void attend_any(const float* q, const T* k, const T* v, int64_t k_step, int64_t v_step, const float* mask,
                int64_t start, int64_t end, int64_t R, int64_t D, float scale, float* scratch, float* max_out,
                float* sum_out, float* out) {
#ifdef MGRM_SIMD16
  if constexpr ((kDim == 64 || kDim == 128) && mgrm::kVectorRegisters16 >= 16) {
    using Kernel = void (*)(const float*, const T*, const T*, int64_t, int64_t, const float*, int64_t, int64_t,
                            float, float*, float*, float*, float*);
    constexpr Kernel kernels[] = {attend_registers<T, 1, kDim>, attend_registers<T, 2, kDim>,
                                  attend_registers<T, 3, kDim>, attend_registers<T, 4, kDim>};
    if (R >= 1 && R <= 4) {
      kernels[R - 1](q, k, v, k_step, v_step, mask, start, end, scale, scratch, max_out, sum_out, out);
      return;
    }
  }
#endif
  attend<T, kDim>(q, k, v, k_step, v_step, mask, start, end, R, D, scale, scratch, max_out, sum_out, out);
}

template <typename T>
void run(int threads, const float* q, int64_t B, int64_t G, int64_t R, int64_t D, const void* k_base, Strides ks,
         const void* v_base, Strides vs, const float* mask, int64_t mask_row, const int64_t* row_start,
         int64_t start, int64_t end, float scale, float* max_out, float* sum_out, float* out) {
  const T* k = static_cast<const T*>(k_base);
  const T* v = static_cast<const T*>(v_base);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(R * (kBlock + D));
#pragma omp for collapse(2) schedule(dynamic, 2)  // rows differ in length where padding is skipped
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t query = (b * G + g) * R;
        const T* kb = k + b * ks.row + g * ks.group;
        const T* vb = v + b * vs.row + g * vs.group;
        const float* mb = mask ? mask + b * mask_row : nullptr;
        const int64_t first = row_start && row_start[b] > start ? (row_start[b] < end ? row_start[b] : end) : start;
        if (D == 64) {
          attend_any<T, 64>(q + query * D, kb, vb, ks.position, vs.position, mb, first, end, R, D, scale,
                        scratch.data(), max_out + query, sum_out + query, out + query * D);
        } else if (D == 128) {
          attend_any<T, 128>(q + query * D, kb, vb, ks.position, vs.position, mb, first, end, R, D, scale,
                         scratch.data(), max_out + query, sum_out + query, out + query * D);
        } else {
          attend<T, 0>(q + query * D, kb, vb, ks.position, vs.position, mb, first, end, R, D, scale,
                       scratch.data(), max_out + query, sum_out + query, out + query * D);
        }
      }
    }
  }
}

}  // namespace

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
  const Strides ks{k_row, k_group, k_position}, vs{v_row, v_group, v_position};
  switch (dtype) {
    case 0:
      run<float>(threads, q, B, G, R, D, k, ks, v, vs, mask, mask_row, row_start, start, end, scale, max_out,
                 sum_out, out);
      return 0;
    case 1:
      run<uint16_t>(threads, q, B, G, R, D, k, ks, v, vs, mask, mask_row, row_start, start, end, scale, max_out,
                    sum_out, out);
      return 0;
#ifdef MGRM_HAVE_FP16
    case 2:
      run<_Float16>(threads, q, B, G, R, D, k, ks, v, vs, mask, mask_row, row_start, start, end, scale, max_out,
                    sum_out, out);
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
