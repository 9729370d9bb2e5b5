// Pairwise LogSumExp, hand-written CUDA (docs/design.md kernel family 1; same contract as
// fastssl/kernels/torch/pairwise_lse.py, the oracle, and fastssl/kernels/triton/pairwise_lse.py).
//
// Rows x (M, D), columns y (Ny, D), bank (K, D); s_ij = scale·x_i·y_j, p(i) = (i + pos_offset) mod Ny:
//   pos_i = s_i,p(i)
//   lse_i = LSE over {s_i,p(i)} (include_pos) ∪ {s_ij : j ≠ p(i), j ≠ i if exclude_self} (y_negatives)
//                    ∪ {scale·x_i·bank_k}
// Backward, for Σ_i grad_lse_i·lse_i + grad_pos_i·pos_i, with P_ij = exp(s_ij − lse_i) on the columns
// of lse_i and G_ij = grad_lse_i·P_ij + grad_pos_i·[j = p(i)]:
//   dx_i = scale·(Σ_j G_ij y_j + Σ_k G_ik bank_k),   dy_j = scale·Σ_i G_ij x_i
// As in the Triton kernels the positive pair is handled apart from the tiles (its logit is a fp32
// row dot x_i·y_p(i); the tile masks drop column p(i)), so forward and backward see the same number.
//
// One kernel template, four roles (KIND). A CTA of 4 warps owns kBM = 64 rows ("own" operand; each
// warp 16 rows) and streams kBN = 64-row tiles of the other operand through shared memory:
//   kFwd  own x, stream y then bank: S = X_I·Y_Jᵀ (tensor cores), online max/sum in registers.
//   kRows own x, stream y then bank: dx_I += P_IJ·Y_J for one kDV-wide slice of D (grid axis y).
//   kCols own y, stream x:           dy_J += (G_IJ)ᵀ·X_I, the logits computed directly as Y_J·X_Iᵀ.
//   kSym  x is y (SimCLR / DCL): own x_I, stream x_J; the tile S_IJ = X_I·X_Jᵀ is computed ONCE
//         and used twice: as rows of S (row stats lse_I: dx_I += G_IJ·X_J) and as the transposed
//         tile S_JIᵀ (column stats lse_J: dy_I += (G_JI)ᵀ·X_J). One launch, 3 GEMMs per tile instead
//         of the 4 of separate dx and dy kernels, no atomics, deterministic.
// The logit accumulators stay in registers in the mma C layout and feed the second GEMM as its A
// operand directly (bf16/fp16: two n8 blocks form one k16 A fragment; fp32: one n8 block is a k8 A
// fragment under a k permutation matched in the B loads). Nothing but lse and pos (O(M)) is stored.
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "pairwise_lse_common.cuh"
#include "pairwise_tiles.cuh"

namespace fastssl {
namespace {

using namespace detail;
// kThreads, kBM, kBN, kBK, kLog2e, mod_ny, the tile GEMMs logits_chunk / weighted_sum and vec_ok.
using namespace tiles;
// Kind, lse2_of and the dx epilogue (rows_epilogue).
using namespace lse;

// Output slice width of the backward roles: 128 fp32 accumulators per row (64 registers a lane);
// kSym keeps two accumulators (dx and dy) and uses 64 to stay within the register file.
// kSym is built for bf16/fp16 only: with fp32's 3xTF32 operand splits its two accumulators spill
// (ptxas -v) even at a 32-wide slice, so fp32 inputs with x = y run kRows then kCols instead.
template <typename T, int KIND>
struct SliceWidth {
  static constexpr int value = KIND == kFwd ? 8 : (KIND == kSym ? 64 : 128);
};

struct KernelArgs {
  PairwiseLseProblem p;
  PairwiseLseGrads g;
  float* lse_out;
  float* pos_out;
  int64_t d_pad;    // D rounded up to kBK (resident own tile)
  int o_resident;   // the own tile (kBM x D) is loaded once
  int vec_x, vec_y, vec_bank;
  double inv_ny;    // 1 / Ny, for mod_ny
};

template <typename T, int KIND>
__global__ void __launch_bounds__(kThreads) pairwise_lse_kernel(const KernelArgs args) {
  constexpr int DV = SliceWidth<T, KIND>::value;
  constexpr int PAD = TileTraits<T>::kPad;
  constexpr bool kBwd = KIND != kFwd;
  constexpr bool kColStats = KIND == kCols || KIND == kSym;
  extern __shared__ __align__(16) unsigned char smem[];

  const PairwiseLseProblem& p = args.p;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wr0 = warp * 16;
  const int64_t M = p.x.rows, NY = p.y.rows, D = p.x.cols;
  const Matrix& own = KIND == kCols ? p.y : p.x;
  const Matrix& str = KIND == kFwd || KIND == kRows ? p.y : p.x;
  const int own_vec = KIND == kCols ? args.vec_y : args.vec_x;
  const int str_vec = KIND == kFwd || KIND == kRows ? args.vec_y : args.vec_x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t dv0 = static_cast<int64_t>(blockIdx.y) * DV;

  const int ldo = args.o_resident ? static_cast<int>(args.d_pad) + PAD : kBK + PAD;
  const int lds = kBK + PAD;
  const int ldv = DV + PAD;
  T* sO = reinterpret_cast<T*>(smem);
  T* sS = sO + kBM * ldo;
  T* sV = sS + kBN * lds;
  float* sColLse2 = reinterpret_cast<float*>(kBwd ? sV + kBN * ldv : sV);
  float* sColG = sColLse2 + kBN;
  int64_t* sColP = reinterpret_cast<int64_t*>(sColG + kBN);

  const float scale = *p.scale;
  const float qk = scale * kLog2e;
  const int64_t own_rows = KIND == kCols ? NY : M;

  // The two own rows of this lane (g and g + 8 of its warp) and their statistics.
  int64_t row[2], pcol[2];
  float row_lse2[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + wr0 + g + 8 * h;
    pcol[h] = (KIND != kCols && row[h] < M) ? mod_ny(row[h] + p.pos_offset, NY, args.inv_ny) : -1;
    if constexpr (KIND == kRows || KIND == kSym) row_lse2[h] = row[h] < M ? lse2_of(args.g.lse[row[h]]) : 0.0f;
  }
  float g_max = 0.0f, g_inv = 0.0f;
  if constexpr (kColStats) {
    g_max = *args.g.grad_lse_absmax;
    g_inv = g_max > 0.0f ? 1.0f / g_max : 0.0f;
  }

  if (args.o_resident) {
    load_tile<T>(sO, ldo, own.ptr, own.rows, own.cols, own.stride_r, own.stride_c, r0, 0, kBM,
                 static_cast<int>(args.d_pad), own_vec);
  }

  // Forward state (per lane, two rows): running max (log2 units) and partial sum.
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.0f, 0.0f};
  float acc[DV / 8][4];
  float acc2[KIND == kSym ? DV / 8 : 1][4];
#pragma unroll
  for (int i = 0; i < DV / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
#pragma unroll
  for (int i = 0; i < (KIND == kSym ? DV / 8 : 1); ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc2[i][e] = 0.0f;

  // Sources streamed: 0 = y (or x for kCols/kSym), 1 = the bank (kFwd / kRows only).
  const bool has_bank = (KIND == kFwd || KIND == kRows) && p.bank.rows > 0;
  for (int src = 0; src < 2; ++src) {
    const bool is_bank = src == 1;
    if (is_bank && !has_bank) break;
    if (!is_bank && !p.y_negatives) continue;
    const Matrix& sm = is_bank ? p.bank : str;
    const int svec = is_bank ? args.vec_bank : str_vec;
    for (int64_t c0 = 0; c0 < sm.rows; c0 += kBN) {
      float s[8][4];
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
      for (int64_t k0 = 0; k0 < D; k0 += kBK) {
        __syncthreads();
        if (!args.o_resident)
          load_tile<T>(sO, ldo, own.ptr, own.rows, own.cols, own.stride_r, own.stride_c, r0, k0, kBM, kBK, own_vec);
        load_tile<T>(sS, lds, sm.ptr, sm.rows, sm.cols, sm.stride_r, sm.stride_c, c0, k0, kBN, kBK, svec);
        __syncthreads();
        logits_chunk<T>(s, args.o_resident ? sO + k0 : sO, ldo, sS, lds, wr0, g, t);
      }

      if constexpr (KIND == kFwd) {
        // Masked logits in log2 units, then the online max/sum of each row (4 lanes share a row). This
        // is lse::online_tile (and lse::row_keeps below is w_row's mask) written out: as calls they
        // changed ptxas's register allocation here (the bf16/fp16 forward spilled).
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float tv[8][2];
          float mx = -CUDART_INF_F;
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t col = c0 + nb * 8 + 2 * t + e;
              bool ok = row[h] < M && col < sm.rows;
              if (!is_bank) ok = ok && col != pcol[h] && !(p.exclude_self && col == row[h]);
              tv[nb][e] = ok ? s[nb][2 * h + e] * qk : -CUDART_INF_F;
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
      } else {
        // The stream tile's D slice (B of the second GEMM) and, for column statistics, its rows' stats.
        __syncthreads();
        load_tile<T>(sV, ldv, sm.ptr, sm.rows, sm.cols, sm.stride_r, sm.stride_c, c0, dv0, kBN, DV, svec);
        if constexpr (kColStats) {
          if (tid < kBN) {
            const int64_t c = c0 + tid;
            const bool in = c < M;  // the streamed rows are x rows
            sColLse2[tid] = in ? lse2_of(args.g.lse[c]) : CUDART_INF_F;
            sColG[tid] = in ? args.g.grad_lse[c] * g_inv : 0.0f;
            sColP[tid] = in ? mod_ny(c + p.pos_offset, NY, args.inv_ny) : -1;
          }
        }
        __syncthreads();

        if constexpr (KIND == kRows || KIND == kSym) {
          // Row weights P_ij = exp(s_ij − lse_i): grad_lse_i is applied in the epilogue (a row scale).
          auto w_row = [&](int nb, int e) -> float {
            const int h = e >> 1;
            const int64_t col = c0 + nb * 8 + 2 * t + (e & 1);
            bool ok = row[h] < M && col < sm.rows;
            if (!is_bank) ok = ok && col != pcol[h] && !(p.exclude_self && col == row[h]);
            return ok ? exp2f(s[nb][e] * qk - row_lse2[h]) : 0.0f;
          };
          weighted_sum<T, DV>(acc, w_row, sV, ldv, g, t);
        }
        if constexpr (kColStats) {
          // Column weights: the logit (own r, streamed c) is s_cr (x_c is the row of G, r its column);
          // G_cr/g_max = grad_lse_c/g_max·exp(s_cr − lse_c) unless r is c's positive or (self) c itself.
          auto w_col = [&](int nb, int e) -> float {
            const int h = e >> 1;
            const int cl = nb * 8 + 2 * t + (e & 1);
            const int64_t col = c0 + cl;
            const bool ok = row[h] < own_rows && col < M && row[h] != sColP[cl] &&
                            !(p.exclude_self && col == row[h]);
            return ok ? sColG[cl] * exp2f(s[nb][e] * qk - sColLse2[cl]) : 0.0f;
          };
          if constexpr (KIND == kSym) {
            weighted_sum<T, DV>(acc2, w_col, sV, ldv, g, t);
          } else {
            weighted_sum<T, DV>(acc, w_col, sV, ldv, g, t);
          }
        }
      }
    }
  }

  // ---- epilogues ----
  const float* grad_lse = args.g.grad_lse;
  const float* grad_pos = args.g.grad_pos;
  if constexpr (KIND == kFwd) {
    // lse::forward_epilogue written out, as online_tile above (as a call it changed this kernel's SASS).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    float pos_raw[2] = {0.0f, 0.0f};
    for (int rr = 0; rr < 16; ++rr) {
      const int64_t i = r0 + wr0 + rr;
      if (i >= M) continue;  // warp-uniform
      const float v = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r,
                                     p.y.stride_c, mod_ny(i + p.pos_offset, NY, args.inv_ny), D, lane);
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
        args.lse_out[row[h]] = m2 == -CUDART_INF_F ? -CUDART_INF_F : (m2 + log2f(l2)) * kLn2;
        args.pos_out[row[h]] = pos_raw[h] * scale;
      }
    }
    return;
  } else {
    if constexpr (KIND == kRows || KIND == kSym) {
      rows_epilogue<T, DV>(p, args.g, p.y /* kSym: y is x */, M, NY, D, args.inv_ny, r0 + wr0, row, pcol, dv0, acc, g,
                           t, lane, qk, scale);
    }
    if constexpr (kColStats) {
      // dy_j = scale·(g_max·acc_j + Σ_{i : p(i) = j} coef_i·x_i), i = ((j − pos_offset) mod Ny) + w·Ny < M.
      // lse::cols_epilogue written out (as a call it changed the kCols kernels' SASS).
      auto col_epilogue = [&](float (&cacc)[DV / 8][4]) {
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) cacc[nb][e] *= g_max;
      for (int64_t wrap = 0; wrap < M; wrap += NY) {
        float coef[2] = {0.0f, 0.0f};
        int64_t prow[2] = {-1, -1};
        for (int rr = 0; rr < 16; ++rr) {
          const int64_t j = r0 + wr0 + rr;
          if (j >= NY) break;
          const int64_t i = mod_ny(j + NY - p.pos_offset, NY, args.inv_ny) + wrap;
          if (i >= M) continue;
          float c = grad_pos[i];
          if (p.include_pos) {
            const float pr = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r,
                                            p.y.stride_c, j, D, lane);
            c += grad_lse[i] * exp2f(pr * qk - lse2_of(args.g.lse[i]));
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
      T* dy = static_cast<T*>(args.g.dy);
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const int64_t col = dv0 + nb * 8 + 2 * t + (e & 1);
          if (row[h] >= own_rows || col >= D) continue;
          dy[row[h] * D + col] = from_float<T>(scale * cacc[nb][e]);
        }
      };
      if constexpr (KIND == kSym) {
        col_epilogue(acc2);
      } else {
        col_epilogue(acc);
      }
    }
  }
}

template <typename T, int KIND>
cudaError_t launch(const KernelArgs& base, cudaStream_t stream) {
  constexpr int DV = SliceWidth<T, KIND>::value;
  constexpr int PAD = TileTraits<T>::kPad;
  KernelArgs a = base;
  const int64_t D = a.p.x.cols;
  a.d_pad = (D + kBK - 1) / kBK * kBK;
  a.o_resident = D <= TileTraits<T>::kResidentD;
  a.vec_x = vec_ok(a.p.x, sizeof(T));
  a.vec_y = vec_ok(a.p.y, sizeof(T));
  a.vec_bank = vec_ok(a.p.bank, sizeof(T));
  a.inv_ny = 1.0 / static_cast<double>(a.p.y.rows > 0 ? a.p.y.rows : 1);
  const int ldo = a.o_resident ? static_cast<int>(a.d_pad) + PAD : kBK + PAD;
  size_t bytes = sizeof(T) * (static_cast<size_t>(kBM) * ldo + static_cast<size_t>(kBN) * (kBK + PAD));
  if (KIND != kFwd) bytes += sizeof(T) * kBN * (DV + PAD) + kBN * (2 * sizeof(float) + sizeof(int64_t));
  const int64_t own_rows = KIND == kCols ? a.p.y.rows : a.p.x.rows;
  const int64_t blocks = (own_rows + kBM - 1) / kBM;
  const int64_t slices = KIND == kFwd ? 1 : (D + DV - 1) / DV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || slices > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = pairwise_lse_kernel<T, KIND>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(slices)), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_kind(const KernelArgs& a, int kind, cudaStream_t stream) {
  switch (kind) {
    case kFwd: return launch<T, kFwd>(a, stream);
    case kRows: return launch<T, kRows>(a, stream);
    case kCols: return launch<T, kCols>(a, stream);
    case kSym:
      if constexpr (sizeof(T) == 2) return launch<T, kSym>(a, stream);
      return cudaErrorInvalidValue;  // the bindings never ask for fp32 kSym
  }
  return cudaErrorInvalidValue;
}

cudaError_t dispatch(const KernelArgs& a, DType dtype, int kind, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dispatch_kind<float>(a, kind, stream);
    case DType::kFloat16: return dispatch_kind<__half>(a, kind, stream);
    case DType::kBFloat16: return dispatch_kind<__nv_bfloat16>(a, kind, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t pairwise_lse_forward(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                 cudaStream_t stream) {
  KernelArgs a{};
  a.p = p;
  a.lse_out = lse;
  a.pos_out = pos;
  return dispatch(a, dtype, kFwd, stream);
}

cudaError_t pairwise_lse_backward(const PairwiseLseProblem& p, const PairwiseLseGrads& g, BackwardKind kind,
                                  DType dtype, cudaStream_t stream) {
  KernelArgs a{};
  a.p = p;
  a.g = g;
  const int k = kind == BackwardKind::kRows ? kRows : (kind == BackwardKind::kCols ? kCols : kSym);
  return dispatch(a, dtype, k, stream);
}

}  // namespace fastssl
