// A rollout's RMSNorm, SwiGLU and RoPE on the CPU, each one pass over its rows; each decode step's greedy
// token and log-sum-exp; and for CPU training the backward passes of RMSNorm and SwiGLU
// (parallel/elementwise_autograd.py).
//
// torch computes RMSNorm as five elementwise ops (square, mean, add eps, rsqrt, two products), SwiGLU as
// silu then a product and RoPE as six ops and two concatenations, each allocating its output: inside a
// decode step of 32 rows of 512 that was ~80 us per norm and ~125 us per SwiGLU on the project's 2-core
// EPYC (nine norms and four SwiGLUs a step of its 4-layer bench model), where one pass over 64 KB takes a
// few microseconds. In a prefill the passes are memory-bound, and one pass reads the rows once.
//
// Same math as torch: y = (x * rsqrt(mean(x^2) + eps)) * weight, and silu(g) * u = g / (1 + exp(-g)) * u,
// in fp32; only the order of the mean's sum and exp's last bits differ (kernel_math.h's exp, ~2e-7). RoPE
// is torch's to the bit. bf16 tensors are computed in fp32 and rounded where torch's bf16 ops round: the
// norm once, SwiGLU after silu and after the product, RoPE after every product and sum (torch's bf16 norms
// and SwiGLUs took ~1.6 ms of an ~18 ms bf16 decode step on the Xeon of session 46, besides its RoPEs).
// Built into the attention kernels' library (cpu_decode_kernel.py); OpenMP splits rows only when there
// are enough of them to pay for waking the second thread.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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

// A product or sum as torch's elementwise op on T stores it: rounded to bf16 in bf16, as is in fp32.
inline float rounded(float x, float*) { return x; }
inline float rounded(float x, uint16_t*) {
  uint16_t h;
  mgrm::narrow(x, &h);
  return mgrm::to_float(h);
}

// One head's RoPE (mgrm_rotary). GCC contracts a * b - c * d into a fused multiply-add across statements
// by default; here each product is rounded first, as in torch (clang contracts only within an expression),
// and in bf16 rounded to bf16, as each of torch's bf16 ops rounds its output.
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rotate_head(const T* __restrict in, const T* __restrict c, const T* __restrict sn,
                 int64_t half, int64_t D, bool interleaved, T* __restrict out) {
  using mgrm::to_float;
  T* const kind = nullptr;  // selects `rounded`'s overload
  const int64_t step = interleaved ? 2 : 1;   // x1's and x2's stride
  const int64_t second = interleaved ? 1 : half;  // x2's offset from x1
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(in[i * step]), x2 = to_float(in[i * step + second]);
    const float ci = to_float(c[i]), si = to_float(sn[i]);
    const float x1c = rounded(x1 * ci, kind), x2s = rounded(x2 * si, kind);
    const float x2c = rounded(x2 * ci, kind), x1s = rounded(x1 * si, kind);
    mgrm::narrow(x1c - x2s, out + i * step);
    mgrm::narrow(x2c + x1s, out + i * step + second);
  }
  for (int64_t k = 2 * half; k < D; ++k) out[k] = in[k];
}

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight in fp32, stored once in T (torch's bf16
// rms_norm also rounds only its result).
template <typename T>
int rms_norm(int threads, const T* x, int64_t rows, int64_t dim, int64_t ldx, const T* weight, float eps, T* y,
             int64_t ldy) {
  using mgrm::to_float;
  if (rows < 0 || dim <= 0 || ldx < dim || ldy < dim) return 1;
#pragma omp parallel for num_threads(threads) if (rows * dim >= kParallelElements) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict in = x + r * ldx;
    T* __restrict out = y + r * ldy;
    float sum = 0.0f;
    for (int64_t k = 0; k < dim; ++k) sum += to_float(in[k]) * to_float(in[k]);
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (int64_t k = 0; k < dim; ++k) mgrm::narrow((to_float(in[k]) * scale) * to_float(weight[k]), out + k);
  }
  return 0;
}

// y[r, j] = silu(x[r, j]) * x[r, f + j]; in bf16 silu's value is rounded to bf16 before the product, as
// torch's silu then mul round each.
template <typename T>
int swiglu(int threads, const T* x, int64_t rows, int64_t f, int64_t ldx, T* y, int64_t ldy) {
  using mgrm::to_float;
  if (rows < 0 || f <= 0 || ldx < 2 * f || ldy < f) return 1;
  T* const kind = nullptr;
#pragma omp parallel for num_threads(threads) if (rows * f >= kParallelElements) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gate = x + r * ldx;
    const T* __restrict up = gate + f;
    T* __restrict out = y + r * ldy;
    for (int64_t j = 0; j < f; ++j) mgrm::narrow(rounded(silu(to_float(gate[j])), kind) * to_float(up[j]), out + j);
  }
  return 0;
}

// The gradient of y = silu(gate) * up (mgrm_swiglu) for fc1's output x = [gate | up]: with s = sigmoid(gate),
// d gate = g * up * s * (1 + gate * (1 - s)) and d up = g * gate * s, both halves written side by side as
// x is laid out, in one pass over x and g (fp32, rounded once to T). torch's autograd needs silu(gate) saved
// from the forward, a product, silu_backward and a second product, each a pass over ffn-sized tensors.
template <typename T>
int swiglu_backward(int threads, const T* x, const T* g, int64_t rows, int64_t f, int64_t ldx, int64_t ldg, T* dx,
                    int64_t lddx) {
  using mgrm::to_float;
  if (rows < 0 || f <= 0 || ldx < 2 * f || ldg < f || lddx < 2 * f) return 1;
#pragma omp parallel for num_threads(threads) if (rows * f >= kParallelElements) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gate = x + r * ldx;
    const T* __restrict up = gate + f;
    const T* __restrict grad = g + r * ldg;
    T* __restrict dgate = dx + r * lddx;
    T* __restrict dup = dgate + f;
    for (int64_t j = 0; j < f; ++j) {
      const float a = to_float(gate[j]), u = to_float(up[j]), gj = to_float(grad[j]);
      const float e = mgrm::exp_nonpositive(a >= 0.0f ? -a : a);  // sigmoid(a) from exp(-|a|)
      const float s = a >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
      mgrm::narrow(gj * u * s * (1.0f + a * (1.0f - s)), dgate + j);
      mgrm::narrow(gj * a * s, dup + j);
    }
  }
  return 0;
}

// The gradient of y = x * rsqrt(mean(x^2) + eps) * w (mgrm_rms_norm) per row of `dim`, with r that rsqrt
// and the row's dot = sum(g * w * x): dx = r * g * w - x * r^3 * dot / dim (rounded once to T), and
// dw += g * x * r summed over the rows in fp32 (each thread its share of rows, then the threads' sums
// in thread order: the same sum for the same thread count). Two passes over a row, the second hot in L1.
template <typename T>
int rms_norm_backward(int threads, const T* x, const T* weight, const T* g, int64_t rows, int64_t dim, float eps,
                      T* dx, float* dw) {
  using mgrm::to_float;
  if (rows < 0 || dim <= 0 || threads < 1) return 1;
  const int used = rows * dim >= kParallelElements ? threads : 1;
  std::vector<float> partial(static_cast<size_t>(used) * dim, 0.0f);
  std::vector<float> w(dim);
  for (int64_t k = 0; k < dim; ++k) w[k] = to_float(weight[k]);
#pragma omp parallel num_threads(used)
  {
#ifdef _OPENMP
    float* __restrict mine = partial.data() + static_cast<int64_t>(omp_get_thread_num()) * dim;
#else
    float* __restrict mine = partial.data();
#endif
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict in = x + r * dim;
      const T* __restrict grad = g + r * dim;
      T* __restrict out = dx + r * dim;
      float squares = 0.0f, dot = 0.0f;
      for (int64_t k = 0; k < dim; ++k) {
        const float xk = to_float(in[k]);
        squares += xk * xk;
        dot += to_float(grad[k]) * w[k] * xk;
      }
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
      const float along = scale * scale * scale * dot / static_cast<float>(dim);
      for (int64_t k = 0; k < dim; ++k) {
        const float xk = to_float(in[k]), gk = to_float(grad[k]);
        mgrm::narrow(scale * gk * w[k] - xk * along, out + k);
        mine[k] += gk * xk * scale;
      }
    }
  }
  for (int64_t k = 0; k < dim; ++k) {
    float sum = 0.0f;
    for (int t = 0; t < used; ++t) sum += partial[static_cast<size_t>(t) * dim + k];
    dw[k] = sum;
  }
  return 0;
}

template <typename T>
int rotary(int threads, const T* x, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xs0, int64_t xs1,
           int64_t xs2, const T* cos, const T* sin, int64_t cs0, int64_t cs1, int64_t half, int interleaved, T* y,
           int64_t ys0, int64_t ys1, int64_t ys2) {
  if (B < 0 || S < 0 || H <= 0 || half <= 0 || D < 2 * half) return 1;
#pragma omp parallel for collapse(2) num_threads(threads) if (B * S * H * D >= kParallelElements) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      const T* c = cos + b * cs0 + t * cs1;
      const T* sn = sin + b * cs0 + t * cs1;
      for (int64_t h = 0; h < H; ++h) {
        rotate_head(x + b * xs0 + t * xs1 + h * xs2, c, sn, half, D, interleaved != 0,
                    y + b * ys0 + t * ys1 + h * ys2);
      }
    }
  }
  return 0;
}

template <typename T>
int row_argmax_logsumexp(int threads, const T* x, int64_t rows, int64_t n, int64_t ld, int64_t* argmax,
                         float* lse) {
  if (rows < 0 || n < 1 || ld < n || threads < 1) return 1;
  int bad = 0;
#pragma omp parallel num_threads(rows * n >= kParallelElements ? threads : 1) reduction(| : bad)
  {
    std::vector<float> widened(std::is_same_v<T, float> ? 0 : n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row;
      if constexpr (std::is_same_v<T, float>) {
        row = x + r * ld;
      } else {
        for (int64_t k = 0; k < n; ++k) widened[k] = mgrm::to_float(x[r * ld + k]);
        row = widened.data();
      }
      const float top = mgrm::max_of(row, n);  // NaNs skipped; a NaN row's sum is NaN below
      int64_t first = 0;
      while (first < n - 1 && row[first] != top) ++first;
      const float sum = mgrm::sum_exp(row, n, top);
      argmax[r] = first;
      lse[r] = top + std::log(sum);
      bad |= !(std::isfinite(top) && std::isfinite(sum) && sum > 0.0f);
    }
  }
  return bad ? 2 : 0;
}

}  // namespace

extern "C" {

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight, rows of `dim` elements `ldx` / `ldy` apart;
// the _bf16 entry points take bf16 (uint16_t) tensors, the others fp32.
int mgrm_rms_norm(int threads, const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* weight,
                  float eps, float* y, int64_t ldy) {
  return rms_norm(threads, x, rows, dim, ldx, weight, eps, y, ldy);
}
int mgrm_rms_norm_bf16(int threads, const uint16_t* x, int64_t rows, int64_t dim, int64_t ldx,
                       const uint16_t* weight, float eps, uint16_t* y, int64_t ldy) {
  return rms_norm(threads, x, rows, dim, ldx, weight, eps, y, ldy);
}

// y[r, j] = silu(x[r, j]) * x[r, f + j] for j < f: the gate and the up projection side by side in one row
// of fc1's output, as Megatron's MLP lays them out.
int mgrm_swiglu(int threads, const float* x, int64_t rows, int64_t f, int64_t ldx, float* y, int64_t ldy) {
  return swiglu(threads, x, rows, f, ldx, y, ldy);
}
int mgrm_swiglu_bf16(int threads, const uint16_t* x, int64_t rows, int64_t f, int64_t ldx, uint16_t* y,
                     int64_t ldy) {
  return swiglu(threads, x, rows, f, ldx, y, ldy);
}

// Training's backward passes of the two above, rows contiguous (`dim` / 2f elements apart): dx in the
// input's layout, dw (fp32, `dim` elements) the weight's gradient summed over the rows.
int mgrm_swiglu_backward(int threads, const float* x, const float* g, int64_t rows, int64_t f, float* dx) {
  return swiglu_backward(threads, x, g, rows, f, 2 * f, f, dx, 2 * f);
}
int mgrm_swiglu_backward_bf16(int threads, const uint16_t* x, const uint16_t* g, int64_t rows, int64_t f,
                              uint16_t* dx) {
  return swiglu_backward(threads, x, g, rows, f, 2 * f, f, dx, 2 * f);
}
int mgrm_rms_norm_backward(int threads, const float* x, const float* weight, const float* g, int64_t rows,
                           int64_t dim, float eps, float* dx, float* dw) {
  return rms_norm_backward(threads, x, weight, g, rows, dim, eps, dx, dw);
}
int mgrm_rms_norm_backward_bf16(int threads, const uint16_t* x, const uint16_t* weight, const uint16_t* g,
                                int64_t rows, int64_t dim, float eps, uint16_t* dx, float* dw) {
  return rms_norm_backward(threads, x, weight, g, rows, dim, eps, dx, dw);
}

// RoPE: each head's first 2 * half channels of x [B, S, H, D] (strides xs0..xs2 in elements, channels
// contiguous) rotated by the angles of its (row, position), the rest copied, into y (strides ys0..ys2).
// Angles cos/sin are rows of `half` elements at (b * cs0 + s * cs1): cs0 = 0 when every row shares them.
// Halves split (x1 = x[:half], x2 = x[half:2 half]) or interleaved pairs (x1 = x[2i], x2 = x[2i + 1]):
// y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, each product rounded before the sum as torch's elementwise
// ops round it (no fused multiply-add: the result is torch's to the bit, in fp32 and in bf16).
int mgrm_rotary(int threads, const float* x, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xs0, int64_t xs1,
                int64_t xs2, const float* cos, const float* sin, int64_t cs0, int64_t cs1, int64_t half,
                int interleaved, float* y, int64_t ys0, int64_t ys1, int64_t ys2) {
  return rotary(threads, x, B, S, H, D, xs0, xs1, xs2, cos, sin, cs0, cs1, half, interleaved, y, ys0, ys1, ys2);
}
int mgrm_rotary_bf16(int threads, const uint16_t* x, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xs0,
                     int64_t xs1, int64_t xs2, const uint16_t* cos, const uint16_t* sin, int64_t cs0, int64_t cs1,
                     int64_t half, int interleaved, uint16_t* y, int64_t ys0, int64_t ys1, int64_t ys2) {
  return rotary(threads, x, B, S, H, D, xs0, xs1, xs2, cos, sin, cs0, cs1, half, interleaved, y, ys0, ys1, ys2);
}

// Per row r of x[rows][n] (rows `ld` elements apart): argmax[r], the first index of the row's maximum (the
// one torch.argmax picks), and lse[r] = max + log(sum(exp(x - max))) (kernel_math.h's exp), from two passes
// over the row (a bf16 row widened to fp32 first: the same values torch's ops see after .float()). A
// rollout's controller needs both for every step's logits: the greedy token and the log-probability of the
// token drawn. Returns 0, or 2 when a row's maximum or sum is not finite (a NaN or +inf logit, or no
// finite one), which the caller leaves to torch.
int mgrm_row_argmax_logsumexp(int threads, const float* x, int64_t rows, int64_t n, int64_t ld, int64_t* argmax,
                              float* lse) {
  return row_argmax_logsumexp(threads, x, rows, n, ld, argmax, lse);
}
int mgrm_row_argmax_logsumexp_bf16(int threads, const uint16_t* x, int64_t rows, int64_t n, int64_t ld,
                                   int64_t* argmax, float* lse) {
  return row_argmax_logsumexp(threads, x, rows, n, ld, argmax, lse);
}

}  // extern "C"
