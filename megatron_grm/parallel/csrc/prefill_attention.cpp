// A prefill's causal attention on the CPU, row by row, skipping each row's left padding.
//
// torch's CPU flash attention (SDPA's) splits queries in blocks of 256 and keys in blocks of 512 for
// prompts of >= 768 tokens, so its causal blocks on the diagonal compute many scores the mask then drops;
// one row of 1,080 positions (8 query heads over 4 KV heads of 64) took 10.4-11.6 ms, ~105-115 GFLOP/s
// counted causally, on the project's 2-core AMD EPYC. Here queries go in tiles of 12 positions of one head
// and keys in micro-tiles of 16, so a tile stops at its own last position: the same row took 7.7-8.6 ms
// (bench/prefill_attention.py: 1.5-1.8x SDPA over 8 such rows). Each (row, KV head)'s keys are packed
// transposed in tiles of 16 ([tile][channel][16]) and its values as fp32 rows, once; the threads work
// through one KV group's query heads at a time, so its keys and values stay in the caches, and two tiles
// (a span) use each key block while it is in L1. Scores, an online softmax and the weighted values go
// block by block (64 keys), as in flash attention; the arithmetic is fp32, 16-bit inputs are widened on
// load and the output rounded once. bf16 inputs on a CPU with AVX512-BF16 take vdpbf16ps instead (two
// channels or keys per lane, exact products, fp32 sums): the scores from the inputs' own bits, and the
// values weighed by weights rounded to bf16, as flash attention's GPU kernels round them. That made the
// kernel 1.33x faster in bf16 (bench/prefill_attention.py --dtype bf16: 45 against 60 ms), with errors
// against float64 equal to torch's SDPA's (session 36).
//
// The micro-kernels are written against simd16.h's 16-lane vectors: one AVX-512 register, or two AVX2
// ones (there a score micro-kernel takes 6 query rows, and the weighted values 16 channels per pass). On
// the 2-core AMD EPYC of session 37 (AVX2, no AVX-512) the kernel took 99 against SDPA's 157 ms in fp32
// (1.58x) and 111 against 150 ms in bf16 (1.35x; bf16 widened to fp32) in bench/prefill_attention.py.
// Built with neither (-march=native on another CPU), the entry point returns -1 and
// megatron_grm.parallel.cpu_decode keeps torch's kernel.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernel_math.h"
#include "simd16.h"

namespace {

#ifdef MGRM_SIMD16

constexpr int kTileQ = 12;   // query positions per tile (one query head)
constexpr int kTileK = 16;   // keys per score micro-tile: one F32x16
constexpr int kBlockK = 64;  // keys per softmax block
constexpr int kSpan = 2 * kTileQ;  // query positions that share each key block's pass
// Query rows per score micro-kernel call: one accumulator each, besides the keys and a broadcast query. With
// 32 AVX-512 registers a whole tile; with AVX2's 16 (two per F32x16) half of one.
constexpr int kScoreRows = mgrm::kVectorRegisters16 >= 16 ? kTileQ : kTileQ / 2;

using mgrm::F32x16;
using mgrm::fmadd16;
using mgrm::load16;
using mgrm::set16;
using mgrm::narrow;
using mgrm::softmax_block;
using mgrm::store16;
using mgrm::to_float;
using mgrm::with_rows;
using mgrm::zero16;


// S[r][0:16] = sum_d Q[r][d] * Kt[d][0:16] for R query rows.
template <int R, int D>
inline void score_tile(const float* __restrict Q, const float* __restrict Kt, float* __restrict S) {
  F32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = zero16();
  for (int d = 0; d < D; ++d) {
    const F32x16 key = load16(Kt + d * kTileK);
    for (int r = 0; r < R; ++r) acc[r] = fmadd16(set16(Q[r * D + d]), key, acc[r]);
  }
  for (int r = 0; r < R; ++r) store16(S + r * kBlockK, acc[r]);
}

#ifdef __AVX512BF16__
// bf16 inputs: the same scores from the inputs' own bits, two channels per lane (vdpbf16ps: exact products,
// fp32 sums), then scaled. Qp[r][i] holds query r's channels 2i and 2i + 1; Kp[i][0:16][2] those of 16 keys.
template <int R, int D>
inline void score_tile_bf16(const uint32_t* __restrict Qp, const uint16_t* __restrict Kp, float scale,
                            float* __restrict S) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int i = 0; i < D / 2; ++i) {
    const __m512bh keys = (__m512bh)_mm512_loadu_si512(Kp + i * 2 * kTileK);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(Qp[r * (D / 2) + i])), keys);
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(S + r * kBlockK, _mm512_mul_ps(acc[r], sc));
}

template <int D>
void score_rows_bf16(int rows, const uint32_t* Qp, const uint16_t* Kp, float scale, float* S) {
  with_rows<kTileQ>(rows, [&](auto r) { score_tile_bf16<decltype(r)::value, D>(Qp, Kp, scale, S); });
}
// O[r][0:D] += sum_k P[r][k] * V[k][0:D] with P rounded to bf16 (as flash attention's GPU kernels round it)
// and the values' own bf16 bits: Pp[r][j] holds row r's weights of keys 2j and 2j + 1, Vp[j][0:D][2] those
// keys' values.
template <int R, int D>
inline void weigh_values_bf16(const uint32_t* __restrict Pp, const uint16_t* __restrict Vp, int pairs,
                              float* __restrict O) {
  constexpr int C = D / 16;
  __m512 o[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) o[r][c] = _mm512_loadu_ps(O + r * D + 16 * c);
  for (int j = 0; j < pairs; ++j) {
    __m512bh value[C];
    for (int c = 0; c < C; ++c) value[c] = (__m512bh)_mm512_loadu_si512(Vp + (j * D + 16 * c) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pp[r * (kBlockK / 2) + j]));
      for (int c = 0; c < C; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], w, value[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(O + r * D + 16 * c, o[r][c]);
}

template <int D>
void weigh_rows_bf16(int rows, const float* P, const uint16_t* Vp, int keys, float* O) {
  alignas(64) uint32_t Pp[kTileQ * kBlockK / 2];
  for (int r = 0; r < rows; ++r)  // 64 weights -> 32 pairs of bf16, key 2j in the low half
    for (int j = 0; j < kBlockK; j += 32) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(P + r * kBlockK + j + 16),
                                                _mm512_loadu_ps(P + r * kBlockK + j));
      _mm512_storeu_si512(Pp + r * (kBlockK / 2) + j / 2, (__m512i)pair);
    }
  constexpr int kRows = D <= 64 ? 6 : 3;
  const int pairs = (keys + 1) / 2;
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const int n = rows - r0 < kRows ? rows - r0 : kRows;
    const uint32_t* pp = Pp + r0 * (kBlockK / 2);
    float* o = O + r0 * D;
    with_rows<kRows>(n, [&](auto r) { weigh_values_bf16<decltype(r)::value, D>(pp, Vp, pairs, o); });
  }
}

template <typename T>
constexpr bool kBf16Dot = std::is_same_v<T, uint16_t>;
#else
template <typename T>
constexpr bool kBf16Dot = false;
// Declared, never defined or called (kBf16Dot is false): attend_span's discarded branches name them.
template <int D>
void score_rows_bf16(int rows, const uint32_t* Qp, const uint16_t* Kp, float scale, float* S);
template <int D>
void weigh_rows_bf16(int rows, const float* P, const uint16_t* Vp, int keys, float* O);
#endif

template <int D>
void score_rows(int rows, const float* Q, const float* Kt, float* S) {
  for (int r0 = 0; r0 < rows; r0 += kScoreRows) {
    const int n = rows - r0 < kScoreRows ? rows - r0 : kScoreRows;
    with_rows<kScoreRows>(n, [&](auto r) { score_tile<decltype(r)::value, D>(Q + r0 * D, Kt, S + r0 * kBlockK); });
  }
}

// O[r][0:D] += sum_k P[r][k] * V[k][0:D] for R query rows, CC F32x16 of channels at a time (R * CC
// accumulators): with AVX-512 all D channels in one pass, with AVX2 16 per pass over the block's values
// (which stay in L1).
template <int R, int D, int CC>
inline void weigh_values(const float* __restrict P, const float* __restrict V, int keys, float* __restrict O) {
  for (int c0 = 0; c0 < D / 16; c0 += CC) {
    F32x16 o[R][CC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CC; ++c) o[r][c] = load16(O + r * D + 16 * (c0 + c));
    for (int k = 0; k < keys; ++k) {
      F32x16 value[CC];
      for (int c = 0; c < CC; ++c) value[c] = load16(V + k * D + 16 * (c0 + c));
      for (int r = 0; r < R; ++r) {
        const F32x16 p = set16(P[r * kBlockK + k]);
        for (int c = 0; c < CC; ++c) o[r][c] = fmadd16(p, value[c], o[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CC; ++c) store16(O + r * D + 16 * (c0 + c), o[r][c]);
  }
}

template <int D>
void weigh_rows(int rows, const float* P, const float* V, int keys, float* O) {
  constexpr bool kWide = mgrm::kVectorRegisters16 >= 16;
  constexpr int kChunk = kWide ? D / 16 : 1;         // F32x16 of channels per pass
  constexpr int kRows = kWide && D > 64 ? 3 : 6;     // rows x kChunk accumulators: 6-24
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const int n = rows - r0 < kRows ? rows - r0 : kRows;
    with_rows<kRows>(n, [&](auto r) {
      weigh_values<decltype(r)::value, D, kChunk>(P + r0 * kBlockK, V, keys, O + r0 * D);
    });
  }
}

struct View {  // element (position t, head h, channel d) at t * position + h * head + d
  const void* data;
  int64_t row, position, head;
};

// One span of query positions [p0, p0 + rows) of query head h (rows <= kSpan) over keys [0, p0 + rows) of
// the packed group: key block by key block, each block's keys and values used by every tile of the span
// while they are in L1 (a long prompt's keys no longer fit L2, and a span reads them once, not per tile).
template <typename T, int D>
void attend_span(const T* q, int64_t q_position, const void* K, const void* V, int64_t p0, int rows, float scale,
                 T* out, int64_t o_position) {
  alignas(64) float Q[kBf16Dot<T> ? 1 : kSpan * D];  // fp32 scores: the scaled queries
  alignas(64) uint32_t Qp[kBf16Dot<T> ? kSpan * D / 2 : 1];  // bf16 dot products: their channel pairs
  alignas(64) float S[kTileQ * kBlockK];
  alignas(64) float O[kSpan * D];
  float top[kSpan], total[kSpan];
  for (int r = 0; r < rows; ++r) {
    const T* src = q + (p0 + r) * q_position;
    if constexpr (kBf16Dot<T>) {
      std::memcpy(Qp + r * (D / 2), src, sizeof(T) * D);
    } else {
      for (int d = 0; d < D; ++d) Q[r * D + d] = to_float(src[d]) * scale;
    }
    top[r] = -INFINITY;
    total[r] = 0.0f;
  }
  std::memset(O, 0, sizeof(float) * rows * D);
  const int64_t end = p0 + rows;
  for (int64_t k0 = 0; k0 < end; k0 += kBlockK) {
    for (int t0 = 0; t0 < rows; t0 += kTileQ) {
      const int tile_rows = rows - t0 < kTileQ ? rows - t0 : kTileQ;
      const int64_t last = p0 + t0 + tile_rows - 1;  // the tile's last query sees keys up to itself
      if (last < k0) continue;  // the whole block is after every query of the tile
      const int keys = static_cast<int>(last + 1 - k0 < kBlockK ? last + 1 - k0 : kBlockK);
      for (int j = 0; j < keys; j += kTileK) {
        const int64_t tile = (k0 + j) / kTileK * D * kTileK;
        if constexpr (kBf16Dot<T>) {
          score_rows_bf16<D>(tile_rows, Qp + t0 * (D / 2), static_cast<const uint16_t*>(K) + tile, scale, S + j);
        } else {
          score_rows<D>(tile_rows, Q + t0 * D, static_cast<const float*>(K) + tile, S + j);
        }
      }
      for (int i = 0; i < tile_rows; ++i) {
        const int r = t0 + i;
        float* s = S + i * kBlockK;
        // Query p0 + r sees keys up to itself: in this block, the first `seen` of them.
        int64_t seen = p0 + r - k0 + 1;
        seen = seen < 0 ? 0 : (seen > keys ? keys : seen);
        for (int j = static_cast<int>(seen); j < kBlockK; ++j) s[j] = -INFINITY;
        const float c = softmax_block(s, kBlockK, top[r], total[r]);  // the whole block: a fixed count
        if (c != 1.0f)  // rescale what was accumulated under the old maximum
          for (int d = 0; d < D; ++d) O[r * D + d] *= c;
      }
      if constexpr (kBf16Dot<T>) {
        weigh_rows_bf16<D>(tile_rows, S, static_cast<const uint16_t*>(V) + k0 * D, keys, O + t0 * D);
      } else {
        weigh_rows<D>(tile_rows, S, static_cast<const float*>(V) + k0 * D, keys, O + t0 * D);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float inv = 1.0f / total[r];  // > 0: every query sees at least itself
    T* dst = out + (p0 + r) * o_position;
    for (int d = 0; d < D; ++d) narrow(O[r * D + d] * inv, dst + d);
  }
}

template <typename T, int D>
void run(int threads, View q, View k, View v, View o, int64_t B, int64_t L, int64_t Hq, int64_t Hkv,
         const int64_t* pads, float scale) {
  const int64_t rep = Hq / Hkv;
  const int64_t key_tiles = (L + kTileK - 1) / kTileK;
  // Keys: fp32 [tile][channel][16], or for bf16 dot products the inputs' bits as [tile][pair][16][2].
  using Packed = std::conditional_t<kBf16Dot<T>, uint16_t, float>;
  std::vector<Packed> Kt(static_cast<size_t>(Hkv * key_tiles * D * kTileK));
  // Values: fp32 rows, or for bf16 dot products the inputs' bits as [pair of positions][channel][2].
  const int64_t value_group = (L + 1) / 2 * 2 * D;
  std::vector<Packed> V(static_cast<size_t>(Hkv * value_group));
  for (int64_t b = 0; b < B; ++b) {  // rows one after another: a row's packed keys and values stay in the caches
    const int64_t pad = pads ? pads[b] : 0;
    const int64_t n = L - pad;
    const T* qb = static_cast<const T*>(q.data) + b * q.row + pad * q.position;
    const T* kb = static_cast<const T*>(k.data) + b * k.row + pad * k.position;
    const T* vb = static_cast<const T*>(v.data) + b * v.row + pad * v.position;
    T* ob = static_cast<T*>(const_cast<void*>(o.data)) + b * o.row;
    const int64_t tiles = (n + kSpan - 1) / kSpan;  // spans
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t g = 0; g < Hkv; ++g) {
        Packed* kt = Kt.data() + g * key_tiles * D * kTileK;
        Packed* vg = V.data() + g * value_group;
        const int64_t tail = (n + kTileK - 1) / kTileK * kTileK;
        for (int64_t t = 0; t < tail; ++t) {
          Packed* dst = kt + t / kTileK * D * kTileK;
          const T* key = t < n ? kb + t * k.position + g * k.head : nullptr;
          const T* value = t < n ? vb + t * v.position + g * v.head : nullptr;
          if constexpr (kBf16Dot<T>) {
            // The last tile's missing keys, and an odd row's missing last value (weight 0): zeros.
            for (int d = 0; d < D; ++d) dst[(d / 2) * 2 * kTileK + (t % kTileK) * 2 + d % 2] = key ? key[d] : 0;
            if (key || (t == n && n % 2 == 1))
              for (int d = 0; d < D; ++d) vg[(t / 2 * D + d) * 2 + t % 2] = value ? value[d] : 0;
          } else {
            for (int d = 0; d < D; ++d) dst[d * kTileK + t % kTileK] = key ? to_float(key[d]) : 0.0f;
            if (value)
              for (int d = 0; d < D; ++d) vg[t * D + d] = to_float(value[d]);
          }
        }
      }
      // A padding query sees only itself: its output is its own value (nothing reads it).
#pragma omp for schedule(static)
      for (int64_t t = 0; t < pad; ++t) {
        for (int64_t h = 0; h < Hq; ++h) {
          const T* value = static_cast<const T*>(v.data) + b * v.row + t * v.position + h / rep * v.head;
          std::memcpy(ob + t * o.position + h * o.head, value, sizeof(T) * D);
        }
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t w = 0; w < Hq * tiles; ++w) {
        // KV group by KV group (the threads share one group's keys and values in the caches), its longest
        // spans first, the group's query heads one after another on each span.
        const int64_t g = w / (rep * tiles), in_group = w % (rep * tiles);
        const int64_t span = tiles - 1 - in_group / rep;
        const int64_t h = g * rep + in_group % rep;
        const int64_t p0 = span * kSpan;
        const int rows = static_cast<int>(n - p0 < kSpan ? n - p0 : kSpan);
        attend_span<T, D>(qb + h * q.head, q.position, Kt.data() + g * key_tiles * D * kTileK,
                          V.data() + g * value_group, p0, rows, scale, ob + pad * o.position + h * o.head, o.position);
      }
    }
  }
}

template <typename T>
int run_dim(int threads, View q, View k, View v, View o, int64_t B, int64_t L, int64_t Hq, int64_t Hkv, int64_t D,
            const int64_t* pads, float scale) {
  switch (D) {
    case 16: run<T, 16>(threads, q, k, v, o, B, L, Hq, Hkv, pads, scale); return 0;
    case 32: run<T, 32>(threads, q, k, v, o, B, L, Hq, Hkv, pads, scale); return 0;
    case 64: run<T, 64>(threads, q, k, v, o, B, L, Hq, Hkv, pads, scale); return 0;
    case 128: run<T, 128>(threads, q, k, v, o, B, L, Hq, Hkv, pads, scale); return 0;
    default: return -1;
  }
}

#endif  // MGRM_SIMD16

}  // namespace

extern "C" {

// dtype: 0 fp32, 1 bf16, 2 fp16 (queries, keys, values and output alike). Element (row b, position t,
// head h, channel d) of q at b*q_row + t*q_position + h*q_head + d, and likewise k, v, out; q/out have Hq
// heads, k/v Hkv (Hq a multiple of Hkv). Row b's first pads[b] positions (pads may be null: none) are left
// padding: each sees only itself (out = its value); the rest attend causally from the first real one.
// Returns 0, or -1 when this build cannot (neither AVX-512 nor AVX2, a dtype not compiled in, D not 16, 32,
// 64 or 128).
int mgrm_prefill_attention(int dtype, int threads, int64_t B, int64_t L, int64_t Hq, int64_t Hkv, int64_t D,
                           const void* q, int64_t q_row, int64_t q_position, int64_t q_head, const void* k,
                           int64_t k_row, int64_t k_position, int64_t k_head, const void* v, int64_t v_row,
                           int64_t v_position, int64_t v_head, void* out, int64_t o_row, int64_t o_position,
                           int64_t o_head, const int64_t* pads, float scale) {
#ifdef MGRM_SIMD16
  if (Hkv <= 0 || Hq % Hkv != 0) return -1;
  const View qv{q, q_row, q_position, q_head}, kv{k, k_row, k_position, k_head}, vv{v, v_row, v_position, v_head},
      ov{out, o_row, o_position, o_head};
  switch (dtype) {
    case 0:
      return run_dim<float>(threads, qv, kv, vv, ov, B, L, Hq, Hkv, D, pads, scale);
    case 1:
      return run_dim<uint16_t>(threads, qv, kv, vv, ov, B, L, Hq, Hkv, D, pads, scale);
#ifdef MGRM_HAVE_FP16
    case 2:
      return run_dim<_Float16>(threads, qv, kv, vv, ov, B, L, Hq, Hkv, D, pads, scale);
#endif
    default:
      return -1;
  }
#else
  (void)dtype; (void)threads; (void)B; (void)L; (void)Hq; (void)Hkv; (void)D; (void)q; (void)q_row;
  (void)q_position; (void)q_head; (void)k; (void)k_row; (void)k_position; (void)k_head; (void)v; (void)v_row;
  (void)v_position; (void)v_head; (void)out; (void)o_row; (void)o_position; (void)o_head; (void)pads; (void)scale;
  return -1;
#endif
}

// Whether this build has the prefill kernel (AVX-512 or AVX2).
int mgrm_prefill_attention_built() {
#ifdef MGRM_SIMD16
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
