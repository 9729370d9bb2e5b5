// The logit-tile GEMMs shared by the pairwise kernels of pairwise_lse.cu, pairwise_sigmoid.cu and
// pairwise_max.cu (no torch headers). A CTA of 4 warps owns kBM = 64 rows (16 per warp) of one
// operand and streams kBN = 64-row tiles of the other through shared memory; a warp's 16 x 64 logits live in
// registers in the mma accumulator layout: s[nb][e] is element (g + 8·(e >> 1), nb·8 + 2t + (e & 1))
// of its tile (lane g = l / 4, t = l % 4; mma_utils.cuh has the fragment tables).
//
// The CPU emulation of `logits_chunk`'s and `weighted_sum`'s fragment loads is
// tests/csrc/test_mma_layout.py.
#pragma once

#include <cstdint>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"

namespace fastssl {
namespace tiles {

using namespace detail;

constexpr int kThreads = 128;
constexpr int kBM = 64;  // owned rows per CTA
constexpr int kBN = 64;  // streamed rows per tile
constexpr int kBK = 32;  // k chunk of the logit GEMM
constexpr float kLog2e = 1.4426950408889634f;

// a mod n for 0 <= a < 2^52, without the int64 division subroutine (its call frame shows up as
// register spills in ptxas -v): a double-precision quotient, off by at most one, then corrected.
__device__ __forceinline__ int64_t mod_ny(int64_t a, int64_t n, double inv_n) {
  int64_t r = a - static_cast<int64_t>(static_cast<double>(a) * inv_n) * n;
  while (r < 0) r += n;
  while (r >= n) r -= n;
  return r;
}

// s (warp's 16 x 64 logits) += A[wr0 : wr0 + 16, 0 : kBK] · B[0 : 64, 0 : kBK]ᵀ.
template <typename T>
__device__ __forceinline__ void logits_chunk(float (&s)[8][4], const T* sA, int lda, const T* sB, int ldb, int wr0,
                                             int g, int t) {
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int k = 0; k < kBK; k += 16) {
      uint32_t a[4];
      const T* pa = sA + (wr0 + g) * lda + k + 2 * t;
      a[0] = lds32(pa);
      a[1] = lds32(pa + 8 * lda);
      a[2] = lds32(pa + 8);
      a[3] = lds32(pa + 8 * lda + 8);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const T* pb = sB + (nb * 8 + g) * ldb + k + 2 * t;
        uint32_t b[2] = {lds32(pb), lds32(pb + 8)};
        MmaOp<T>::run(s[nb], a, b);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kBK; k += 8) {
      uint32_t ah[4], al[4];
      const float* pa = sA + (wr0 + g) * lda + k + t;
      split_tf32(pa[0], ah[0], al[0]);
      split_tf32(pa[8 * lda], ah[1], al[1]);
      split_tf32(pa[4], ah[2], al[2]);
      split_tf32(pa[8 * lda + 4], ah[3], al[3]);
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        const float* pb = sB + (nb * 8 + g) * ldb + k + t;
        uint32_t bh[2], bl[2];
        split_tf32(pb[0], bh[0], bl[0]);
        split_tf32(pb[4], bh[1], bl[1]);
        mma_3xtf32(s[nb], ah, al, bh, bl);
      }
    }
  }
}

// acc (warp's 16 x DV) += W · V[0 : 64, 0 : DV], W_(row, col) = w(nb, e) for the logit element
// e of n8 block nb (computed on the fly from the logits, so no second 16 x 64 array is kept).
template <typename T, int DV, typename WFn>
__device__ __forceinline__ void weighted_sum(float (&acc)[DV / 8][4], WFn w, const T* sV, int ldv, int g, int t) {
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_floats<T>(w(2 * kk, 0), w(2 * kk, 1));
      a[1] = pack_floats<T>(w(2 * kk, 2), w(2 * kk, 3));
      a[2] = pack_floats<T>(w(2 * kk + 1, 0), w(2 * kk + 1, 1));
      a[3] = pack_floats<T>(w(2 * kk + 1, 2), w(2 * kk + 1, 3));
      const T* pv = sV + (kk * 16 + 2 * t) * ldv + g;
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb) {
        const T* q = pv + nb * 8;
        uint32_t b[2] = {pack_raw<T>(q[0], q[ldv]), pack_raw<T>(q[8 * ldv], q[9 * ldv])};
        MmaOp<T>::run(acc[nb], a, b);
      }
    }
  } else {
    // k8 step kk covers logit block kk; logical k = t ↔ column 2t, k = t + 4 ↔ column 2t + 1.
#pragma unroll
    for (int kk = 0; kk < kBN / 8; ++kk) {
      uint32_t ah[4], al[4];
      split_tf32(w(kk, 0), ah[0], al[0]);
      split_tf32(w(kk, 2), ah[1], al[1]);
      split_tf32(w(kk, 1), ah[2], al[2]);
      split_tf32(w(kk, 3), ah[3], al[3]);
      const float* pv = sV + (kk * 8 + 2 * t) * ldv + g;
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb) {
        uint32_t bh[2], bl[2];
        split_tf32(pv[nb * 8], bh[0], bl[0]);
        split_tf32(pv[ldv + nb * 8], bh[1], bl[1]);
        mma_3xtf32(acc[nb], ah, al, bh, bl);
      }
    }
  }
}

// Whether a matrix can be read with 16-byte vector loads (row-contiguous, aligned rows).
inline bool vec_ok(const Matrix& m, int itemsize) {
  const int v = 16 / itemsize;
  return m.ptr != nullptr && m.stride_c == 1 && m.stride_r % v == 0 && reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0;
}

}  // namespace tiles
}  // namespace fastssl
