// A bf16 rollout's decode-step GEMMs on AMX tiles: y[M, N] = x[M, K] @ W^T (+ bias) for M <= 32 rows, bf16
// in and out, fp32 sums.
//
// oneDNN runs these GEMMs on AMX too, but a decode step calls it 17 times between the attention kernel's
// passes over the KV cache, which evict its code and the torch dispatch around it: on the AMX Xeon of
// session 46 one 32-row call with a 512 x 512 weight took 0.30 ms after a 200 MB read against 0.04 ms hot.
// This loop is a few hundred bytes of code: bench/onednn_linear.py --dtype bf16 --rows 32 --evict-mb 200
// (each call after a 200 MB read) put oneDNN at 1.34x its time over a layer and the output layer, and a bf16
// rollout's decode step spent 2.06 ms in it against 3.41 in oneDNN. Its outputs equalled oneDNN's bit for
// bit in every shape tried (bf16 products summed in fp32 in the tiles' order, rounded to bf16 once).
//
// Layout. The weight is packed once per wave (cpu_decode_kernel.pack_amx_weight), zero-padded to Np x Kp
// (multiples of 32), as [Np / 32][Kp / 32][2][16 pairs][16 columns][2]: for each 32 output columns and 32
// inputs, two B tiles of 1 KB (16 columns each, the inputs in VNNI pairs), so one column block's K streams
// contiguously. x is copied into a zeroed 32 x Kp buffer (rows past M, inputs past K: zeros). Each column
// block keeps 4 accumulator tiles (2 row tiles x 2 column tiles) while two A and two B tiles pass over K.
//
// Built with -march=native: compiled in only where the CPU has AMX-TILE and AMX-BF16 (Linux, which must
// grant the process the tile state first: mgrm_amx_enable).
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define MGRM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kRows = 32;   // rows of x (two tiles of 16)
constexpr int64_t kBlock = 32;  // output columns per block (two tiles of 16) and inputs per step
#ifndef MGRM_AMX_AHEAD
#define MGRM_AMX_AHEAD 4
#endif
constexpr int64_t kAhead = MGRM_AMX_AHEAD;  // k-steps (2 KB of weight each) the prefetch runs ahead

#ifdef MGRM_AMX
struct TileConfig {  // palette 1: 8 tiles, each up to 16 rows x 64 bytes
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Output columns [block * 32, +32) for all 32 rows: tiles 0-1 x's row halves, 2-3 the block's two column
// halves of the weight, 4-7 the accumulators (row half r, column half c at 4 + 2r + c).
void column_block(const uint16_t* xp, int64_t kp, const uint16_t* w, float (*acc)[16][16]) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t k = 0; k < kp; k += kBlock, w += 2 * 16 * 32) {
    // The last block's last steps prefetch past the packed weight: a prefetch never faults.
    const char* ahead = reinterpret_cast<const char*>(w + kAhead * 2 * 16 * 32);
    for (int line = 0; line < 32; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    _tile_loadd(0, xp + k, kp * 2);
    _tile_loadd(1, xp + 16 * kp + k, kp * 2);
    _tile_loadd(2, w, 64);
    _tile_loadd(3, w + 16 * 32, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  _tile_stored(4, acc[0], 64);
  _tile_stored(5, acc[1], 64);
  _tile_stored(6, acc[2], 64);
  _tile_stored(7, acc[3], 64);
}

// Rows [0, M) of one 16-column half of a block's accumulators, plus the bias, rounded to bf16 16 at a time
// (vcvtneps2bf16: round to nearest even, as mgrm::narrow); `n` < 16 columns at the output's edge masked.
void store_rows(const float (*acc)[16][16], int half, int64_t M, const uint16_t* bias, int64_t n, uint16_t* y,
                int64_t ldy) {
  const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1u);
  const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                              _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias)), 16))
                        : _mm512_setzero_ps();
  for (int64_t r = 0; r < M; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_load_ps(acc[2 * (r / 16) + half][r % 16]), b);
    _mm256_mask_storeu_epi16(y + r * ldy, keep, (__m256i)_mm512_cvtneps_pbh(sum));
  }
}
#endif

}  // namespace

extern "C" {

// 1 where this build has the AMX GEMM (the CPU it was built for has AMX-TILE and AMX-BF16), else 0.
int mgrm_amx_built() {
#ifdef MGRM_AMX
  return 1;
#else
  return 0;
#endif
}

// Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 once granted.
int mgrm_amx_enable() {
#ifdef MGRM_AMX
  return static_cast<int>(syscall(SYS_arch_prctl, 0x1023, 18));
#else
  return -1;
#endif
}

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T + bias, M <= 32, W packed by pack_amx_weight as
// [Np / 32][Kp / 32][2][16][16][2] (Np, Kp: N, K rounded up to 32), bias N bf16 values or null; bf16 in and
// out, the sums in fp32 and the bias added to them before the one rounding. Column blocks are split between
// `threads` OpenMP threads. Returns 0, 1 for bad sizes, 2 where the build has no AMX.
int mgrm_amx_linear(int threads, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed,
                    int64_t N, const uint16_t* bias, uint16_t* y, int64_t ldy) {
  if (M < 0 || M > kRows || K < 1 || N < 1 || ldx < K || ldy < N || threads < 1) return 1;
#ifdef MGRM_AMX
  const int64_t kp = (K + kBlock - 1) / kBlock * kBlock;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  std::vector<uint16_t> xp(kRows * kp, 0);
  for (int64_t r = 0; r < M; ++r) std::memcpy(xp.data() + r * kp, x + r * ldx, K * sizeof(uint16_t));
#pragma omp parallel num_threads(threads)
  {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = 16;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    alignas(64) float acc[4][16][16];
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      column_block(xp.data(), kp, packed + block * kp * kBlock, acc);
      const int64_t first = block * kBlock;
      const int64_t cols = N - first < kBlock ? N - first : kBlock;
      for (int half = 0; half < 2; ++half) {
        const int64_t c0 = first + 16 * half;
        const int64_t n = cols - 16 * half;
        if (n <= 0) break;
        store_rows(acc, half, M, bias ? bias + c0 : nullptr, n < 16 ? n : 16, y + c0, ldy);
      }
    }
    _tile_release();
  }
  return 0;
#else
  (void)x, (void)packed, (void)bias, (void)y;
  return 2;
#endif
}

}  // extern "C"
