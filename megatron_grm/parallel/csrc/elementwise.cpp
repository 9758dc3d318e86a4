// A rollout's RMSNorm, SwiGLU and RoPE on the CPU, each one pass over its rows; and each decode step's
// greedy token and log-sum-exp.
//
// torch computes RMSNorm as five elementwise ops (square, mean, add eps, rsqrt, two products), SwiGLU as
// silu then a product and RoPE as six ops and two concatenations, each allocating its output: inside a
// decode step of 32 rows of 512 that was ~80 us per norm and ~125 us per SwiGLU on the project's 2-core
// EPYC (nine norms and four SwiGLUs a step of its 4-layer bench model), where one pass over 64 KB takes a
// few microseconds. In a prefill the passes are memory-bound, and one pass reads the rows once.
//
// Same math as torch: y = (x * rsqrt(mean(x^2) + eps)) * weight, and silu(g) * u = g / (1 + exp(-g)) * u,
// in fp32; only the order of the mean's sum and exp's last bits differ (kernel_math.h's exp, ~2e-7). RoPE
// is torch's to the bit.
// Built into the attention kernels' library (cpu_decode_kernel.py); OpenMP splits rows only when there
// are enough of them to pay for waking the second thread.
#include <cmath>
#include <cstdint>

#include "kernel_math.h"

namespace {

// Below this many elements a call stays on one thread: a decode step's norm (32 x 512) does, its SwiGLU
// (32 x 1,536 products, each an exp and a division) splits.
constexpr int64_t kParallelElements = int64_t{1} << 15;

inline float silu(float g) {
  // exp of a non-positive argument only: e = exp(-|g|), silu(g) = g / (1 + e) for g >= 0 and
  // g * e / (1 + e) below (both g / (1 + exp(-g))).
  const float e = mgrm::exp_nonpositive(g >= 0.0f ? -g : g);
  return g >= 0.0f ? g / (1.0f + e) : g * e / (1.0f + e);
}

// One head's RoPE (mgrm_rotary). GCC contracts a * b - c * d into a fused multiply-add across statements
// by default; here each product is rounded first, as in torch (clang contracts only within an expression).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rotate_head(const float* __restrict in, const float* __restrict c, const float* __restrict sn,
                 int64_t half, int64_t D, bool interleaved, float* __restrict out) {
  const int64_t step = interleaved ? 2 : 1;   // x1's and x2's stride
  const int64_t second = interleaved ? 1 : half;  // x2's offset from x1
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = in[i * step], x2 = in[i * step + second];
    const float x1c = x1 * c[i], x2s = x2 * sn[i], x2c = x2 * c[i], x1s = x1 * sn[i];
    out[i * step] = x1c - x2s;
    out[i * step + second] = x2c + x1s;
  }
  for (int64_t k = 2 * half; k < D; ++k) out[k] = in[k];
}

}  // namespace

extern "C" {

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight, rows of `dim` floats `ldx` / `ldy` apart.
int mgrm_rms_norm(int threads, const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* weight,
                  float eps, float* y, int64_t ldy) {
  if (rows < 0 || dim <= 0 || ldx < dim || ldy < dim) return 1;
#pragma omp parallel for num_threads(threads) if (rows * dim >= kParallelElements) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict in = x + r * ldx;
    float* __restrict out = y + r * ldy;
    float sum = 0.0f;
    for (int64_t k = 0; k < dim; ++k) sum += in[k] * in[k];
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (int64_t k = 0; k < dim; ++k) out[k] = (in[k] * scale) * weight[k];
  }
  return 0;
}

// y[r, j] = silu(x[r, j]) * x[r, f + j] for j < f: the gate and the up projection side by side in one row
// of fc1's output, as Megatron's MLP lays them out.
int mgrm_swiglu(int threads, const float* x, int64_t rows, int64_t f, int64_t ldx, float* y, int64_t ldy) {
  if (rows < 0 || f <= 0 || ldx < 2 * f || ldy < f) return 1;
#pragma omp parallel for num_threads(threads) if (rows * f >= kParallelElements) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict gate = x + r * ldx;
    const float* __restrict up = gate + f;
    float* __restrict out = y + r * ldy;
    for (int64_t j = 0; j < f; ++j) out[j] = silu(gate[j]) * up[j];
  }
  return 0;
}

// RoPE: each head's first 2 * half channels of x [B, S, H, D] (strides xs0..xs2 in elements, channels
// contiguous) rotated by the angles of its (row, position), the rest copied, into y (strides ys0..ys2).
// Angles cos/sin are rows of `half` floats at (b * cs0 + s * cs1): cs0 = 0 when every row shares them.
// Halves split (x1 = x[:half], x2 = x[half:2 half]) or interleaved pairs (x1 = x[2i], x2 = x[2i + 1]):
// y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, each product rounded before the sum as torch's elementwise
// ops round it (no fused multiply-add: the result is torch's to the bit).
int mgrm_rotary(int threads, const float* x, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xs0, int64_t xs1,
                int64_t xs2, const float* cos, const float* sin, int64_t cs0, int64_t cs1, int64_t half,
                int interleaved, float* y, int64_t ys0, int64_t ys1, int64_t ys2) {
  if (B < 0 || S < 0 || H <= 0 || half <= 0 || D < 2 * half) return 1;
#pragma omp parallel for collapse(2) num_threads(threads) if (B * S * H * D >= kParallelElements) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      const float* c = cos + b * cs0 + t * cs1;
      const float* sn = sin + b * cs0 + t * cs1;
      for (int64_t h = 0; h < H; ++h) {
        rotate_head(x + b * xs0 + t * xs1 + h * xs2, c, sn, half, D, interleaved != 0,
                    y + b * ys0 + t * ys1 + h * ys2);
      }
    }
  }
  return 0;
}

// Per row r of x[rows][n] (rows `ld` floats apart): argmax[r], the first index of the row's maximum (the
// one torch.argmax picks), and lse[r] = max + log(sum(exp(x - max))) (kernel_math.h's exp), from two passes
// over the row. A rollout's controller needs both for every step's logits: the greedy token and the
// log-probability of the token drawn. Returns 0, or 2 when a row's maximum or sum is not finite (a NaN or
// +inf logit, or no finite one), which the caller leaves to torch.
int mgrm_row_argmax_logsumexp(int threads, const float* x, int64_t rows, int64_t n, int64_t ld, int64_t* argmax,
                              float* lse) {
  if (rows < 0 || n < 1 || ld < n || threads < 1) return 1;
  int bad = 0;
#pragma omp parallel for num_threads(rows * n >= kParallelElements ? threads : 1) schedule(static) reduction(| : bad)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    const float top = mgrm::max_of(row, n);  // NaNs skipped; a NaN row's sum is NaN below
    int64_t first = 0;
    while (first < n - 1 && row[first] != top) ++first;
    const float sum = mgrm::sum_exp(row, n, top);
    argmax[r] = first;
    lse[r] = top + std::log(sum);
    bad |= !(std::isfinite(top) && std::isfinite(sum) && sum > 0.0f);
  }
  return bad ? 2 : 0;
}

}  // extern "C"
