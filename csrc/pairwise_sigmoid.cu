// Pairwise sigmoid (SigLIP, Zhai et al. 2023), hand-written CUDA: the contract of
// fastssl/kernels/torch/pairwise_sigmoid.py (the oracle) and fastssl/kernels/triton/pairwise_sigmoid.py.
//
// Rows x (M, D), columns y (Ny, D), logits l_ij = scale·x_i·y_j + bias; when has_pos, row i's positive
// column is p(i) = (i + pos_offset) mod Ny (label +1; every other pair −1):
//   rows_i   = Σ_j softplus(−label_ij·l_ij)
//   G_ij     = grad_i·σ(l_ij) off the positive, −grad_i·σ(−l_i,p(i)) on it
//   dx_i     = scale·Σ_j G_ij y_j,   dy_j = scale·Σ_i G_ij x_i
//   dlogit_i = Σ_j G_ij,   dscale_i = Σ_j G_ij·x_i·y_j      (their sums are d bias and d scale)
// Every term depends on its own logit only: the backward needs nothing from the forward.
//
// The tiling of pairwise_lse.cu (pairwise_tiles.cuh): a CTA of 4 warps owns 64 rows, streams 64-row
// tiles, keeps the logits in registers in the mma accumulator layout. Three roles (KIND):
//   kFwd  own x, stream y: S = X_I·Y_Jᵀ, Σ softplus per row (4-lane shuffle at the end).
//   kRows own x, stream y: W = σ(L) overwrites S in registers, dx_I += W·Y_J for one kDV-wide slice of
//         D (grid axis y); the grid.y = 0 CTAs also keep Σ_j σ and Σ_j σ·s_ij for dlogit and dscale.
//   kCols own y, stream x: Sᵀ = Y_J·X_Iᵀ directly, W = grad_i/g_max·σ(L), dy_J += W·X_I.
// No atomics: deterministic. As in the Triton kernels the positive pair is handled apart from the
// tiles (the masks drop column p(i); its logit is an fp32 row dot x_i·y_p(i)), so the tile weights
// σ(l) stay in [0, 1], and its gradient is added in the epilogues.
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "pairwise_tiles.cuh"

namespace fastssl {
namespace {

using namespace detail;
using namespace tiles;

enum Kind : int { kFwd = 0, kRows = 1, kCols = 2 };

// Output slice width of the backward roles: 128 fp32 accumulators per row (64 registers a lane).
template <int KIND>
struct SliceWidth {
  static constexpr int value = KIND == kFwd ? 8 : 128;
};

// Half-precision weights are multiplied by 2^12 before they are rounded for the tensor-core
// product (and the fp32 accumulator divided by it after): SigLIP's negatives have σ(l) ≈ e^−10,
// fp16 subnormals, and σ ≤ 1 scaled stays far below fp16's 65504. A power of two: exact.
template <typename T>
struct WeightScale {
  static constexpr float value = sizeof(T) == 2 ? 4096.0f : 1.0f;
};

struct KernelArgs {
  PairwiseSigmoidProblem p;
  PairwiseSigmoidGrads g;
  float* rows_out;
  int64_t d_pad;   // D rounded up to kBK (resident own tile)
  int o_resident;  // the own tile (kBM x D) is loaded once
  int vec_x, vec_y;
  double inv_ny;   // 1 / Ny, for mod_ny
};

// log(1 + e^u) in fp32 without overflow or cancellation: max(u, 0) + log1p(e^−|u|).
__device__ __forceinline__ float softplus(float u) { return fmaxf(u, 0.0f) + log1pf(exp2f(-fabsf(u) * kLog2e)); }

// σ(u) from e = e^−|u| ≤ 1, which never overflows: 1/(1 + e) or e/(1 + e) (1 + e in [1, 2]).
__device__ __forceinline__ float sigmoid(float u) {
  const float e = exp2f(-fabsf(u) * kLog2e);
  const float r = __fdividef(1.0f, 1.0f + e);
  return u >= 0.0f ? r : e * r;
}

template <typename T, int KIND>
__global__ void __launch_bounds__(kThreads) pairwise_sigmoid_kernel(const KernelArgs args) {
  constexpr int DV = SliceWidth<KIND>::value;
  constexpr int PAD = TileTraits<T>::kPad;
  constexpr float kW = WeightScale<T>::value;
  extern __shared__ __align__(16) unsigned char smem[];

  const PairwiseSigmoidProblem& p = args.p;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wr0 = warp * 16;
  const int64_t M = p.x.rows, NY = p.y.rows, D = p.x.cols;
  const Matrix& own = KIND == kCols ? p.y : p.x;
  const Matrix& str = KIND == kCols ? p.x : p.y;
  const int own_vec = KIND == kCols ? args.vec_y : args.vec_x;
  const int str_vec = KIND == kCols ? args.vec_x : args.vec_y;
  const int64_t own_rows = own.rows;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t dv0 = static_cast<int64_t>(blockIdx.y) * DV;

  const int ldo = args.o_resident ? static_cast<int>(args.d_pad) + PAD : kBK + PAD;
  const int lds = kBK + PAD;
  const int ldv = DV + PAD;
  T* sO = reinterpret_cast<T*>(smem);
  T* sS = sO + kBM * ldo;
  T* sV = sS + kBN * lds;
  int64_t* sColP = reinterpret_cast<int64_t*>(sV + kBN * ldv);  // kCols: p(i) of the streamed x rows
  float* sColG = reinterpret_cast<float*>(sColP + kBN);          // kCols: grad_i / g_max of those rows

  const float scale = *p.scale;
  const float bias = *p.bias;

  // The two own rows of this lane (g and g + 8 of its warp); for x rows, their positive column.
  int64_t row[2], pcol[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + wr0 + g + 8 * h;
    pcol[h] = (KIND != kCols && p.has_pos && row[h] < M) ? mod_ny(row[h] + p.pos_offset, NY, args.inv_ny) : -1;
  }
  float g_max = 0.0f, g_inv = 0.0f;
  if constexpr (KIND == kCols) {
    g_max = *args.g.grad_absmax;
    g_inv = g_max > 0.0f ? 1.0f / g_max : 0.0f;
  }

  if (args.o_resident) {
    load_tile<T>(sO, ldo, own.ptr, own.rows, own.cols, own.stride_r, own.stride_c, r0, 0, kBM,
                 static_cast<int>(args.d_pad), own_vec);
  }

  // Per lane and own row: kFwd Σ softplus; kRows Σ σ(l) and Σ σ(l)·s (the negatives' share of
  // dlogit and dscale, before grad_i).
  float row_sum[2] = {0.0f, 0.0f}, row_dot[2] = {0.0f, 0.0f};
  float acc[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

  for (int64_t c0 = 0; c0 < str.rows; c0 += kBN) {
    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      __syncthreads();
      if (!args.o_resident)
        load_tile<T>(sO, ldo, own.ptr, own.rows, own.cols, own.stride_r, own.stride_c, r0, k0, kBM, kBK, own_vec);
      load_tile<T>(sS, lds, str.ptr, str.rows, str.cols, str.stride_r, str.stride_c, c0, k0, kBN, kBK, str_vec);
      __syncthreads();
      logits_chunk<T>(s, args.o_resident ? sO + k0 : sO, ldo, sS, lds, wr0, g, t);
    }

    if constexpr (KIND == kFwd) {
      // Negatives only (label −1): softplus(+l). Out-of-range rows/columns and the positive are dropped.
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const int64_t col = c0 + nb * 8 + 2 * t + (e & 1);
          if (row[h] < M && col < NY && col != pcol[h]) row_sum[h] += softplus(fmaf(scale, s[nb][e], bias));
        }
    } else {
      // The stream tile's D slice (B of the second GEMM) and, for kCols, its rows' statistics.
      __syncthreads();
      load_tile<T>(sV, ldv, str.ptr, str.rows, str.cols, str.stride_r, str.stride_c, c0, dv0, kBN, DV, str_vec);
      if constexpr (KIND == kCols) {
        if (tid < kBN) {
          const int64_t c = c0 + tid;
          const bool in = c < M;  // the streamed rows are x rows
          sColG[tid] = in ? args.g.grad_rows[c] * g_inv : 0.0f;
          sColP[tid] = in && p.has_pos ? mod_ny(c + p.pos_offset, NY, args.inv_ny) : -1;
        }
      }
      __syncthreads();

      if constexpr (KIND == kRows) {
        // The weights overwrite the logits in place (the row sums need them once, the GEMM once).
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int64_t col = c0 + nb * 8 + 2 * t + (e & 1);
            const bool ok = row[h] < M && col < NY && col != pcol[h];
            const float sig = ok ? sigmoid(fmaf(scale, s[nb][e], bias)) : 0.0f;
            row_sum[h] += sig;
            row_dot[h] = fmaf(sig, s[nb][e], row_dot[h]);
            s[nb][e] = sig * kW;
          }
        weighted_sum<T, DV>(acc, [&](int nb, int e) -> float { return s[nb][e]; }, sV, ldv, g, t);
      } else {
        // Own row r is a y row, streamed c an x row: the logit of pair (c, r), a negative unless
        // r = p(c). Computed on the fly per k step (short live ranges: no spills).
        auto w_col = [&](int nb, int e) -> float {
          const int h = e >> 1;
          const int cl = nb * 8 + 2 * t + (e & 1);
          const bool ok = row[h] < own_rows && c0 + cl < M && row[h] != sColP[cl];
          return ok ? sColG[cl] * (sigmoid(fmaf(scale, s[nb][e], bias)) * kW) : 0.0f;
        };
        weighted_sum<T, DV>(acc, w_col, sV, ldv, g, t);
      }
    }
  }

  // ---- epilogues ----
  if constexpr (KIND == kFwd || KIND == kRows) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the 4 lanes t of a row hold its columns 2t, 2t + 1 of every block
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      row_dot[h] += __shfl_xor_sync(0xffffffffu, row_dot[h], 1);
      row_dot[h] += __shfl_xor_sync(0xffffffffu, row_dot[h], 2);
    }
    // The positive pair of each of the warp's 16 rows: pos_dot = x_i·y_p(i) (fp32 row dot).
    float pos_dot[2] = {0.0f, 0.0f};
    if (p.has_pos) {
      for (int rr = 0; rr < 16; ++rr) {
        const int64_t i = r0 + wr0 + rr;
        if (i >= M) break;  // warp-uniform
        const float v = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                       mod_ny(i + p.pos_offset, NY, args.inv_ny), D, lane);
        if (rr == g) pos_dot[0] = v;
        if (rr == g + 8) pos_dot[1] = v;
      }
    }
    if constexpr (KIND == kFwd) {
      if (t == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (row[h] >= M) continue;
          const float pos_term = p.has_pos ? softplus(-fmaf(scale, pos_dot[h], bias)) : 0.0f;
          args.rows_out[row[h]] = row_sum[h] + pos_term;
        }
      }
      return;
    } else {
      // G_i,p(i) = −grad_i·σ(−l_i,p(i)); dx_i = scale·(grad_i·Σ_j σ(l_ij)·y_j + G_i,p(i)·y_p(i)).
      float gi[2], pos_sig[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        gi[h] = row[h] < M ? args.g.grad_rows[row[h]] : 0.0f;
        pos_sig[h] = pcol[h] >= 0 ? sigmoid(-fmaf(scale, pos_dot[h], bias)) : 0.0f;
      }
      const T* yv = static_cast<const T*>(p.y.ptr);
      T* dx = static_cast<T*>(args.g.dx);
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const int64_t col = dv0 + nb * 8 + 2 * t + (e & 1);
          if (row[h] >= M || col >= D) continue;
          float v = gi[h] * (acc[nb][e] * (1.0f / kW));
          if (pcol[h] >= 0) v -= gi[h] * pos_sig[h] * to_float(yv[pcol[h] * p.y.stride_r + col * p.y.stride_c]);
          dx[row[h] * D + col] = from_float<T>(scale * v);
        }
      if (blockIdx.y == 0 && t == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (row[h] >= M) continue;
          args.g.dlogit[row[h]] = gi[h] * (row_sum[h] - pos_sig[h]);
          args.g.dscale[row[h]] = gi[h] * (row_dot[h] - pos_sig[h] * pos_dot[h]);
        }
      }
    }
  } else {
    // dy_j = scale·(g_max/kW·acc_j + Σ_{i : p(i) = j} G_ij·x_i), i = ((j − pos_offset) mod Ny) + w·Ny < M.
#pragma unroll
    for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nb][e] *= g_max * (1.0f / kW);
    const T* xv = static_cast<const T*>(p.x.ptr);
    for (int64_t wrap = 0; p.has_pos && wrap < M; wrap += NY) {
      float coef[2] = {0.0f, 0.0f};
      int64_t prow[2] = {-1, -1};
      for (int rr = 0; rr < 16; ++rr) {
        const int64_t j = r0 + wr0 + rr;
        if (j >= NY) break;  // warp-uniform
        const int64_t i = mod_ny(j + NY - p.pos_offset, NY, args.inv_ny) + wrap;
        if (i >= M) continue;
        const float v = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                       j, D, lane);
        const float c = -args.g.grad_rows[i] * sigmoid(-fmaf(scale, v, bias));
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
          acc[nb][e] = fmaf(coef[h], to_float(xv[prow[h] * p.x.stride_r + col * p.x.stride_c]), acc[nb][e]);
        }
    }
    T* dy = static_cast<T*>(args.g.dy);
#pragma unroll
    for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t col = dv0 + nb * 8 + 2 * t + (e & 1);
        if (row[h] >= own_rows || col >= D) continue;
        dy[row[h] * D + col] = from_float<T>(scale * acc[nb][e]);
      }
  }
}

template <typename T, int KIND>
cudaError_t launch(const KernelArgs& base, cudaStream_t stream) {
  constexpr int DV = SliceWidth<KIND>::value;
  constexpr int PAD = TileTraits<T>::kPad;
  KernelArgs a = base;
  const int64_t D = a.p.x.cols;
  a.d_pad = (D + kBK - 1) / kBK * kBK;
  a.o_resident = D <= TileTraits<T>::kResidentD;
  a.vec_x = vec_ok(a.p.x, sizeof(T));
  a.vec_y = vec_ok(a.p.y, sizeof(T));
  a.inv_ny = 1.0 / static_cast<double>(a.p.y.rows > 0 ? a.p.y.rows : 1);
  const int ldo = a.o_resident ? static_cast<int>(a.d_pad) + PAD : kBK + PAD;
  size_t bytes = sizeof(T) * (static_cast<size_t>(kBM) * ldo + static_cast<size_t>(kBN) * (kBK + PAD));
  if (KIND != kFwd) bytes += sizeof(T) * kBN * (DV + PAD) + kBN * (sizeof(int64_t) + sizeof(float));
  const int64_t own_rows = KIND == kCols ? a.p.y.rows : a.p.x.rows;
  const int64_t blocks = (own_rows + kBM - 1) / kBM;
  const int64_t slices = KIND == kFwd ? 1 : (D + DV - 1) / DV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || slices > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = pairwise_sigmoid_kernel<T, KIND>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(slices)), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <int KIND>
cudaError_t dispatch(const KernelArgs& a, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float, KIND>(a, stream);
    case DType::kFloat16: return launch<__half, KIND>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, KIND>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t pairwise_sigmoid_forward(const PairwiseSigmoidProblem& p, DType dtype, float* rows, cudaStream_t stream) {
  KernelArgs a{};
  a.p = p;
  a.rows_out = rows;
  return dispatch<kFwd>(a, dtype, stream);
}

cudaError_t pairwise_sigmoid_backward(const PairwiseSigmoidProblem& p, const PairwiseSigmoidGrads& g, DType dtype,
                                      cudaStream_t stream) {
  KernelArgs a{};
  a.p = p;
  a.g = g;
  const cudaError_t err = dispatch<kRows>(a, dtype, stream);
  if (err != cudaSuccess) return err;
  return dispatch<kCols>(a, dtype, stream);
}

}  // namespace fastssl
