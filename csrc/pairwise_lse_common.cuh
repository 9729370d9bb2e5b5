// The per-warp pieces of the pairwise-LSE roles shared by pairwise_lse.cu (64-row CTAs) and
// pairwise_lse_pipelined.cu (128-row CTAs, cp.async ring): the masks, the forward's online max/sum,
// and the forward, dx and dy epilogues. pairwise_lse.cu calls lse2_of and rows_epilogue; it keeps the
// others written out, because as calls they changed its kernels' SASS (the bf16/fp16 forward spilled).
// Both kernels give a warp 16 own rows and keep its logits in the mma accumulator layout
// (pairwise_tiles.cuh): lane (g, t) holds rows row[0] = warp row g and row[1] = g + 8, s[nb][e] at
// column c0 + nb·8 + 2t + (e & 1) of row row[e >> 1].
#pragma once

#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "pairwise_tiles.cuh"

namespace fastssl {
namespace lse {

using namespace detail;
using tiles::kLog2e;
using tiles::mod_ny;

constexpr float kLn2 = 0.6931471805599453f;

enum Kind : int { kFwd = 0, kRows = 1, kCols = 2, kSym = 3 };

__device__ __forceinline__ float lse2_of(float lse) {
  // A row without any column has lse = -inf; exp(s − lse) must then be 0, not NaN.
  return lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e;
}

// Whether column `col` of a tile of `cols` streamed rows is one of row `row`'s LSE columns: a bank
// column always, a y column unless it is the positive p(i) = pcol (handled apart) or i itself.
__device__ __forceinline__ bool row_keeps(const PairwiseLseProblem& p, int64_t M, int64_t row, int64_t pcol,
                                          int64_t col, int64_t cols, bool is_bank) {
  bool ok = row < M && col < cols;
  if (!is_bank) ok = ok && col != pcol && !(p.exclude_self && col == row);
  return ok;
}

// The forward's online max/sum (log2 units) over one 16 x 64 tile of logits: 4 lanes share a row.
__device__ __forceinline__ void online_tile(const float (&s)[8][4], const PairwiseLseProblem& p, int64_t M,
                                            const int64_t (&row)[2], const int64_t (&pcol)[2], int64_t c0,
                                            int64_t cols, bool is_bank, float qk, int t, float (&m_run)[2],
                                            float (&l_run)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float tv[8][2];
    float mx = -CUDART_INF_F;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t col = c0 + nb * 8 + 2 * t + e;
        tv[nb][e] = row_keeps(p, M, row[h], pcol[h], col, cols, is_bank) ? s[nb][2 * h + e] * qk : -CUDART_INF_F;
        mx = fmaxf(mx, tv[nb][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[h], mx);
    const float m_use = m_new == -CUDART_INF_F ? 0.0f : m_new;
    float sum = l_run[h] * exp2f(m_run[h] - m_use);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) sum += exp2f(tv[nb][e] - m_use);
    l_run[h] = sum;
    m_run[h] = m_new;
  }
}

// The forward's stores for the warp's rows wrow0 .. wrow0 + 15: the positive as an fp32 row dot
// x_i·y_p(i) (apart from the tiles), merged into the running max/sum when include_pos.
template <typename T>
__device__ __forceinline__ void forward_epilogue(const PairwiseLseProblem& p, int64_t M, int64_t NY, int64_t D,
                                                 double inv_ny, int64_t wrow0, const int64_t (&row)[2], int g,
                                                 int t, int lane, float qk, float scale, float (&m_run)[2],
                                                 float (&l_run)[2], float* lse_out, float* pos_out) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  float pos_raw[2] = {0.0f, 0.0f};
  for (int rr = 0; rr < 16; ++rr) {
    const int64_t i = wrow0 + rr;
    if (i >= M) continue;  // warp-uniform
    const float v = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                   mod_ny(i + p.pos_offset, NY, inv_ny), D, lane);
    if (rr == g) pos_raw[0] = v;
    if (rr == g + 8) pos_raw[1] = v;
  }
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row[h] >= M) continue;
      float m2 = m_run[h], l2 = l_run[h];
      if (p.include_pos) {
        const float pos2 = pos_raw[h] * qk;
        const float mm = fmaxf(m2, pos2);
        l2 = l2 * exp2f(m2 - mm) + exp2f(pos2 - mm);
        m2 = mm;
      }
      lse_out[row[h]] = m2 == -CUDART_INF_F ? -CUDART_INF_F : (m2 + log2f(l2)) * kLn2;
      pos_out[row[h]] = pos_raw[h] * scale;
    }
  }
}

// dx_i = scale·(grad_lse_i·acc_i + coef_i·y_p(i)), coef_i = grad_pos_i + grad_lse_i·P_i,p(i), for the
// warp's rows and the columns dv0 .. dv0 + DV of D (ym: the column operand, x itself for kSym).
template <typename T, int DV>
__device__ __forceinline__ void rows_epilogue(const PairwiseLseProblem& p, const PairwiseLseGrads& gr,
                                              const Matrix& ym, int64_t M, int64_t NY, int64_t D, double inv_ny,
                                              int64_t wrow0, const int64_t (&row)[2], const int64_t (&pcol)[2],
                                              int64_t dv0, const float (&acc)[DV / 8][4], int g, int t, int lane,
                                              float qk, float scale) {
  float coef[2] = {0.0f, 0.0f}, gl[2] = {0.0f, 0.0f};
  for (int rr = 0; rr < 16; ++rr) {
    const int64_t i = wrow0 + rr;
    if (i >= M) break;
    float c = gr.grad_pos[i];
    if (p.include_pos) {
      const float pr = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, ym.ptr, ym.stride_r, ym.stride_c,
                                      mod_ny(i + p.pos_offset, NY, inv_ny), D, lane);
      c += gr.grad_lse[i] * exp2f(pr * qk - lse2_of(gr.lse[i]));
    }
    if (rr == g) { coef[0] = c; gl[0] = gr.grad_lse[i]; }
    if (rr == g + 8) { coef[1] = c; gl[1] = gr.grad_lse[i]; }
  }
#pragma unroll
  for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      const int64_t col = dv0 + nb * 8 + 2 * t + (e & 1);
      if (row[h] >= M || col >= D) continue;
      const T* yp = static_cast<const T*>(ym.ptr) + pcol[h] * ym.stride_r + col * ym.stride_c;
      const float v = scale * (gl[h] * acc[nb][e] + coef[h] * to_float(*yp));
      static_cast<T*>(gr.dx)[row[h] * D + col] = from_float<T>(v);
    }
}

// dy_j = scale·(g_max·acc_j + Σ_{i : p(i) = j} coef_i·x_i), i = ((j − pos_offset) mod Ny) + w·Ny < M, for
// the warp's own y rows j = wrow0 .. wrow0 + 15 and the columns dv0 .. dv0 + DV of D (acc is scaled in place).
template <typename T, int DV>
__device__ __forceinline__ void cols_epilogue(const PairwiseLseProblem& p, const PairwiseLseGrads& gr, int64_t M,
                                              int64_t NY, int64_t D, double inv_ny, int64_t wrow0,
                                              const int64_t (&row)[2], int64_t own_rows, int64_t dv0, float g_max,
                                              float (&cacc)[DV / 8][4], int g, int t, int lane, float qk,
                                              float scale) {
#pragma unroll
  for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) cacc[nb][e] *= g_max;
  for (int64_t wrap = 0; wrap < M; wrap += NY) {
    float coef[2] = {0.0f, 0.0f};
    int64_t prow[2] = {-1, -1};
    for (int rr = 0; rr < 16; ++rr) {
      const int64_t j = wrow0 + rr;
      if (j >= NY) break;
      const int64_t i = mod_ny(j + NY - p.pos_offset, NY, inv_ny) + wrap;
      if (i >= M) continue;
      float c = gr.grad_pos[i];
      if (p.include_pos) {
        const float pr = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                        j, D, lane);
        c += gr.grad_lse[i] * exp2f(pr * qk - lse2_of(gr.lse[i]));
      }
      if (rr == g) { coef[0] = c; prow[0] = i; }
      if (rr == g + 8) { coef[1] = c; prow[1] = i; }
    }
#pragma unroll
    for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t col = dv0 + nb * 8 + 2 * t + (e & 1);
        if (prow[h] < 0 || col >= D) continue;
        cacc[nb][e] += coef[h] * to_float(static_cast<const T*>(p.x.ptr)[prow[h] * p.x.stride_r + col * p.x.stride_c]);
      }
  }
  T* dy = static_cast<T*>(gr.dy);
#pragma unroll
  for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      const int64_t col = dv0 + nb * 8 + 2 * t + (e & 1);
      if (row[h] >= own_rows || col >= D) continue;
      dy[row[h] * D + col] = from_float<T>(scale * cacc[nb][e]);
    }
}

}  // namespace lse
}  // namespace fastssl
