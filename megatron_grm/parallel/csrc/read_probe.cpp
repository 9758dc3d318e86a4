// How fast this machine reads memory: a sum over a buffer far larger than the caches, read the way that read
// fastest here, so bench/roofline.py's floor is priced at a rate the kernels themselves do not beat.
//
// torch's fp32 sum of a 1 GB buffer read 25 GB/s on the 2-core AVX-512 Xeon of sessions 45-52, while the
// decode attention kernel read its cache at 28-30 (a C++ harness, session 52): the floor priced with torch's
// rate was not a floor. Here each thread reads kStreams pieces of its share in turn, 4 KB of each at a time,
// so more lines are in flight than one sequential stream keeps (the same harness: one stream a thread 28-30
// GB/s, four 32-34).
//
// Built into the same library as the attention kernels (cpu_decode_kernel.py); without AVX2/AVX-512 a scalar
// loop reads the same pieces.
#include <omp.h>

#include <cstdint>

#include "simd16.h"

namespace {

constexpr int64_t kStreams = 4;
constexpr int64_t kChunk = 1024;  // floats of one piece read before the next piece's: 4 KB, a page

// The sum of x[0, n), read 16 floats at a time into four accumulators (no chain of dependent adds).
float sum_range(const float* x, int64_t n) {
  int64_t i = 0;
  float tail = 0.0f;
#if defined(MGRM_SIMD16)
  mgrm::F32x16 a0 = mgrm::zero16(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 64 <= n; i += 64) {
    a0 = mgrm::add16(a0, mgrm::load16(x + i));
    a1 = mgrm::add16(a1, mgrm::load16(x + i + 16));
    a2 = mgrm::add16(a2, mgrm::load16(x + i + 32));
    a3 = mgrm::add16(a3, mgrm::load16(x + i + 48));
  }
  tail = mgrm::sum16(mgrm::add16(mgrm::add16(a0, a1), mgrm::add16(a2, a3)));
#endif
  for (; i < n; ++i) tail += x[i];
  return tail;
}

}  // namespace

extern "C" {

// The sum of data[0, count) on `threads` OpenMP threads: each reads its kStreams consecutive pieces of the
// buffer in turn, a kChunk of each at a time; the first also reads what the pieces leave over.
float mgrm_read_probe(int threads, const float* data, int64_t count) {
  if (threads < 1 || count < 1) return 0.0f;
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t pieces = omp_get_num_threads() * kStreams;  // the team OpenMP gave, not the one asked for
    const int64_t piece = count / pieces;
    const int64_t first = omp_get_thread_num() * kStreams;
    for (int64_t offset = 0; offset < piece; offset += kChunk) {
      const int64_t n = piece - offset < kChunk ? piece - offset : kChunk;
      for (int64_t s = 0; s < kStreams; ++s) total += sum_range(data + (first + s) * piece + offset, n);
    }
    if (first == 0) total += sum_range(data + pieces * piece, count - pieces * piece);
  }
  return total;
}

}  // extern "C"
