// A rollout's fp32 GEMMs on the CPU: y[M, N] = x[M, K] @ W^T (+ bias), from a decode step's few rows (one
// per sequence) to a prefill's thousands.
//
// At 32 rows a weight is read once per step and each of its values feeds 32 multiply-adds, so the GEMM is
// bound by the arithmetic if the micro-kernel keeps the FMA units busy. oneDNN's packed fp32 GEMM ran these
// shapes at 53-60% of one core's FMA peak on the project's AVX2 EPYC; this loop keeps a tile of kMR rows x
// 16*kNC columns in registers, streams the weight once per row block from a layout packed for it, and
// prefetches the next panel into L2, a k-row every few steps, while the row blocks after the first run (see
// megatron_grm/parallel/cpu_decode_kernel.py for the measurements).
//
// The weight is packed once per rollout wave (cpu_decode_kernel.pack_linear_weight) as panels of
// kPanel = 16*kNC output columns, [ceil(N / kPanel)][K][kPanel], zero-padded past N: one panel's K rows are
// contiguous, so the micro-kernel reads it as one stream. The rows are cut into chunks of kRowChunk, which
// stay in L2 while every panel passes over them; the (chunk, panel) pairs are split between threads, and
// each runs its chunk's rows in balanced blocks of at most kMR rows (32 rows: 6,6,5,5,5,5).
//
// Built into the same library as the attention kernels (cpu_decode_kernel.py). Without AVX2/AVX-512
// (MGRM_SIMD16 undefined) a scalar loop over the same layout computes the same result.
#include <cstdint>
#include <cstring>

#include "simd16.h"

namespace {

// Rows per chunk: 96 rows of K = 512 (192 KB) sit in L2 beside a panel; 96 beat 192 at 4,096 rows and
// matched 48 at 8,192 on the EPYC (bench/onednn_linear.py, session 41).
constexpr int64_t kRowChunk = 96;

#if defined(MGRM_SIMD16)

// Tile shape: kMR rows x kNC vectors of 16 accumulators, plus kNC weight vectors and one broadcast, must
// fit the register file (AVX2: 6 x 1 x 2 + 2 + 2 = 16 ymm; AVX-512: 8 x 2 + 2 + 1 = 19 of 32 zmm).
// MGRM_GEMM_NC / MGRM_GEMM_MR override them (the tests build other shapes to check the generic code).
#ifndef MGRM_GEMM_NC
#if defined(__AVX512F__)
#define MGRM_GEMM_NC 2
#define MGRM_GEMM_MR 8
#else
#define MGRM_GEMM_NC 1
#define MGRM_GEMM_MR 6
#endif
#endif

using mgrm::F32x16;
constexpr int kNC = MGRM_GEMM_NC;
constexpr int kMR = MGRM_GEMM_MR;
constexpr int kPanel = 16 * kNC;
// How many k-steps ahead the first of one or two row blocks prefetches its own panel: 4 KB at kNC = 1
// (measured best of 64 and 128 on the EPYC; without it the block waits on memory).
constexpr int64_t kPrefetchSteps = 64;
// Row blocks after the first that share fetching the next panel into L2, each a k-row of it every
// kShareBlocks of its steps (fewer where there are fewer blocks). One block fetching a whole panel a k-row a
// step stalls on the memory's latency (a core has too few lines in flight), and prefetcht0 would evict the
// panel in use from L1 (32 KB at K = 512): at 32 rows a decode step's 17 GEMMs, their weights out of the caches,
// took 6.33 against 6.94 ms (scratch harness, alternating, medians of 24; session 44).
constexpr int kShareBlocks = 4;

// rows x kPanel outputs of one panel, prefetching `fetch_rows` k-rows of panel memory from `fetch` into L2,
// one every 2^Shift steps (`fetch` null: none).
template <int Rows, int Shift>
inline void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
                 const float* __restrict bias, float* __restrict y, int64_t ldy, int64_t cols,
                 const float* __restrict fetch, int64_t fetch_rows) {
  F32x16 acc[Rows][kNC];
  for (int c = 0; c < kNC; ++c) {
    const F32x16 start = bias ? mgrm::load16(bias + 16 * c) : mgrm::zero16();
    for (int r = 0; r < Rows; ++r) acc[r][c] = start;
  }
  for (int64_t k = 0; k < K; ++k) {
    F32x16 wv[kNC];
    for (int c = 0; c < kNC; ++c) wv[c] = mgrm::load16(w + k * kPanel + 16 * c);
    if (fetch && (k & ((1 << Shift) - 1)) == 0 && (k >> Shift) < fetch_rows)
      for (int c = 0; c < kNC; ++c) __builtin_prefetch(fetch + (k >> Shift) * kPanel + 16 * c, 0, 2);
    for (int r = 0; r < Rows; ++r) {
      const F32x16 xv = mgrm::set16(x[r * ldx + k]);
      for (int c = 0; c < kNC; ++c) acc[r][c] = mgrm::fmadd16(xv, wv[c], acc[r][c]);
    }
  }
  if (cols == kPanel) {
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < kNC; ++c) mgrm::store16(y + r * ldy + 16 * c, acc[r][c]);
    return;
  }
  float buf[kPanel];  // the last panel: only its first `cols` columns are outputs
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < kNC; ++c) mgrm::store16(buf + 16 * c, acc[r][c]);
    std::memcpy(y + r * ldy, buf, sizeof(float) * cols);
  }
}

void panel_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, const float* bias,
                float* y, int64_t ldy, int64_t cols, const float* next) {
  float padded_bias[kPanel];
  if (bias && cols < kPanel) {
    std::memset(padded_bias, 0, sizeof(padded_bias));
    std::memcpy(padded_bias, bias, sizeof(float) * cols);
    bias = padded_bias;
  }
  const int64_t blocks = (M + kMR - 1) / kMR;
  // Blocks 1, 1-2 or 1-4 fetch the next panel, a k-row every 1, 2 or 4 of their steps.
  static_assert(kShareBlocks == 4, "shift: log2 of the blocks sharing a panel");
  const int shift = blocks > kShareBlocks ? 2 : blocks > 2 ? 1 : 0;
  const int64_t share = (K + (int64_t{1} << shift) - 1) >> shift;  // k-rows each fetching block fetches
  for (int64_t b = 0, m = 0; b < blocks; ++b) {
    const int64_t left = blocks - b;
    const int rows = int((M - m + left - 1) / left);
    const int64_t first = (b - 1) * share, end = b * share < K ? b * share : K;
    const float* fetch = next && b >= 1 && first < end ? next + first * kPanel : nullptr;
    int64_t fetch_rows = fetch ? end - first : 0;
    if (b == 0 && blocks <= 2 && K > kPrefetchSteps)  // few blocks: the first also reads ahead in its own
      fetch = w + kPrefetchSteps * kPanel, fetch_rows = K - kPrefetchSteps;
    mgrm::with_rows<kMR>(rows, [&](auto R) {
      constexpr int r = decltype(R)::value;
      const float* xb = x + m * ldx;
      float* yb = y + m * ldy;
      if (shift == 2) tile<r, 2>(xb, ldx, w, K, bias, yb, ldy, cols, fetch, fetch_rows);
      else if (shift == 1) tile<r, 1>(xb, ldx, w, K, bias, yb, ldy, cols, fetch, fetch_rows);
      else tile<r, 0>(xb, ldx, w, K, bias, yb, ldy, cols, fetch, fetch_rows);
    });
    m += rows;
  }
}

#else  // scalar: same packed layout, 16 columns per panel

constexpr int kPanel = 16;

void panel_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, const float* bias,
                float* y, int64_t ldy, int64_t cols, const float*) {
  for (int64_t m = 0; m < M; ++m) {
    float acc[kPanel];
    for (int c = 0; c < kPanel; ++c) acc[c] = bias && c < cols ? bias[c] : 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[m * ldx + k];
      for (int c = 0; c < kPanel; ++c) acc[c] += xv * w[k * kPanel + c];
    }
    std::memcpy(y + m * ldy, acc, sizeof(float) * cols);
  }
}

#endif  // MGRM_SIMD16

}  // namespace

extern "C" {

// Output columns per packed panel: pack_linear_weight lays the weight out for this width.
int mgrm_linear_panel() { return kPanel; }

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T + bias, W packed as [ceil(N/P)][K][P] by
// pack_linear_weight, bias N floats or null. (row chunk, panel) pairs are split between `threads` OpenMP
// threads.
int mgrm_packed_linear(int threads, const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed,
                       int64_t N, const float* bias, float* y, int64_t ldy) {
  if (M < 0 || K < 1 || N < 1 || ldx < K || ldy < N || threads < 1) return 1;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t m = chunk * kRowChunk;
      const int64_t first = p * kPanel;
      const int64_t cols = N - first < kPanel ? N - first : kPanel;
      const float* w = packed + p * K * kPanel;
      panel_rows(x + m * ldx, M - m < kRowChunk ? M - m : kRowChunk, K, ldx, w, bias ? bias + first : nullptr,
                 y + m * ldy + first, ldy, cols, p + 1 < panels ? w + K * kPanel : nullptr);
    }
  }
  return 0;
}

}  // extern "C"
