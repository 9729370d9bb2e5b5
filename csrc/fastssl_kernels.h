// fastssl CUDA kernels: the launcher interface shared by the .cu files and the bindings.
//
// Plain C++ over raw device pointers and cudaStream_t: no torch/ATen header is included here or in
// any .cu file, so the kernels compile with plain nvcc (tests/csrc/test_cuda_backend.py does, for sm_80 and
// sm_90). The torch glue (argument checks, allocation, current stream) lives in bindings.cpp.
// The math is docs/design.md's kernel families 1 (pairwise LSE) and 2 (off-diagonal Frobenius); see
// csrc/README.md for the tiling.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastssl {

// The element type of the matrix operands (statistics and accumulators are always fp32).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A 2-D operand read in place through its strides (in elements): element (r, c) is at
// ptr[r * stride_r + c * stride_c]. Transposed views (VICReg-exp reads zᵀ) need no copy.
struct Matrix {
  const void* ptr = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_r = 0;
  int64_t stride_c = 1;
};

// Pairwise LSE (docs/design.md family 1). Rows x (M, D), columns y (Ny, D), bank (K, D) or rows = 0.
// s_ij = scale·x_i·y_j, p(i) = (i + pos_offset) mod Ny with 0 <= pos_offset < Ny.
struct PairwiseLseProblem {
  Matrix x, y, bank;
  const float* scale = nullptr;  // device fp32 scalar (no host sync)
  int64_t pos_offset = 0;
  bool exclude_self = false;
  bool include_pos = true;
  bool y_negatives = true;
};

// Forward: lse (M,) and pos (M,) in fp32.
cudaError_t pairwise_lse_forward(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                 cudaStream_t stream);

// Which gradient(s) one backward launch computes.
//   kRows: dx (M, D) from the row side (y and bank columns);
//   kCols: dy (Ny, D) from the column side (the bank gets no gradient);
//   kSymmetric: x is y (M = Ny, no bank, y_negatives): dx and dy in one launch, each logit tile
//   x_I·x_Jᵀ computed once and used for row block I's dx (as S_IJ) and its dy (as S_JIᵀ).
enum class BackwardKind : int { kRows = 0, kCols = 1, kSymmetric = 2 };

struct PairwiseLseGrads {
  const float* lse = nullptr;       // (M,)
  const float* grad_lse = nullptr;  // (M,)
  const float* grad_pos = nullptr;  // (M,)
  const float* grad_lse_absmax = nullptr;  // device scalar max_i |grad_lse_i| (fp16 range guard)
  void* dx = nullptr;  // (M, D) contiguous, input dtype (kRows, kSymmetric)
  void* dy = nullptr;  // (Ny, D) contiguous, input dtype (kCols, kSymmetric)
};

cudaError_t pairwise_lse_backward(const PairwiseLseProblem& p, const PairwiseLseGrads& g, BackwardKind kind,
                                  DType dtype, cudaStream_t stream);

// The forward, the backward's dx (kRows), dy (kCols) and the symmetric x = y launch (kSym: dx and dy,
// as BackwardKind::kSymmetric) on Hopper (pairwise_lse_sm90.cu, built for sm_90a only): TMA, an
// mbarrier pipeline, wgmma. `supported`: bf16/fp16, operands TMA can read (row-contiguous, 16-byte
// aligned base and row stride; dy ignores the bank) and D <= 512 (forward) or D <= 256 (backward); the
// symmetric one also needs y to be x, no bank and y_negatives. The launchers return
// cudaErrorInvalidValue for anything else. The dx launcher writes g.dx only, the dy launcher g.dy only.
bool pairwise_lse_sm90_supported(const PairwiseLseProblem& p, DType dtype);
bool pairwise_lse_rows_sm90_supported(const PairwiseLseProblem& p, DType dtype);
cudaError_t pairwise_lse_forward_sm90(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                      cudaStream_t stream);
cudaError_t pairwise_lse_backward_rows_sm90(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                            cudaStream_t stream);
bool pairwise_lse_cols_sm90_supported(const PairwiseLseProblem& p, DType dtype);
cudaError_t pairwise_lse_backward_cols_sm90(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                            cudaStream_t stream);
bool pairwise_lse_sym_sm90_supported(const PairwiseLseProblem& p, DType dtype);
cudaError_t pairwise_lse_backward_sym_sm90(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                           cudaStream_t stream);

// The forward and the backward's dx (kRows), dy (kCols) and both at once when x is y (kSymmetric)
// pipelined for sm_80+ (pairwise_lse_pipelined.cu: 128-row CTAs, a cp.async ring, ldmatrix). `supported`:
// bf16/fp16, row-contiguous operands with 16-byte aligned base and row stride, D <= 256; the launchers
// return cudaErrorInvalidValue for anything else (the symmetric one also unless y is x, y_negatives and
// no bank). The dx launcher writes g.dx only, the dy launcher g.dy only.
bool pairwise_lse_pipelined_supported(const PairwiseLseProblem& p, DType dtype);
cudaError_t pairwise_lse_forward_pipelined(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                           cudaStream_t stream);
cudaError_t pairwise_lse_backward_rows_pipelined(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                                 cudaStream_t stream);
cudaError_t pairwise_lse_backward_cols_pipelined(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                                 cudaStream_t stream);
cudaError_t pairwise_lse_backward_sym_pipelined(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                                cudaStream_t stream);

// Frobenius family (docs/design.md family 2): the per-column affine transform folded into one pass,
// out[r, k] = round_to_dtype((a[r, k] − shift[k])·scale[k]) (shift/scale may be null), written
// contiguous (R, K) in `out_dtype` (the input dtype, or fp32).
cudaError_t affine_columns(const Matrix& a, DType dtype, const float* shift, const float* scale, void* out,
                           DType out_dtype, cudaStream_t stream);

// Deterministic Σ_i a_i·b_i over n fp32 values (b may equal a: Σ a²), into the device scalar
// `out`; `partials` is scratch of sum_product_partials(n) floats.
int64_t sum_product_partials(int64_t n);
cudaError_t sum_product(const float* a, const float* b, int64_t n, float* partials, float* out, cudaStream_t stream);
// The second stage alone: out = Σ of n fp32 partials in a fixed order (one block; deterministic).
cudaError_t sum_partials(const float* partials, int64_t n, float* out, cudaStream_t stream);

// ‖âᵀb̂‖²_F on Hopper (frobenius_sm90.cu, built for sm_90a only), either route fused with its
// reduction: tiles of C = âᵀb̂ (inner; `outer` false) or of ââᵀ and b̂b̂ᵀ (outer) by TMA and wgmma, each
// reduced in registers (Σ C² or Σ G_a·G_b), the partials (sq_frobenius_sm90_partials floats of
// scratch) summed by sum_partials into the device scalar `out`. a (N, Da), b (N, Db) in the same 16-bit
// dtype (outer: Da = Db); `same`: b is a. `supported`: bf16/fp16, equal rows, operands TMA can read
// (row-contiguous, 16-byte aligned base and row stride); the launcher returns cudaErrorInvalidValue
// for anything else.
bool sq_frobenius_sm90_supported(const Matrix& a, const Matrix& b, DType dtype, bool outer);
int64_t sq_frobenius_sm90_partials(int64_t rows, int64_t a_cols, int64_t b_cols, bool same, bool outer);
cudaError_t sq_frobenius_sm90(const Matrix& a, const Matrix& b, bool same, bool outer, DType dtype, float* partials,
                              float* out, cudaStream_t stream);

// Per-column mean and variance of a (R, K) matrix (one pass: per-block Welford/Chan merge),
// variance with `correction` (0 biased, 1 unbiased); `partials` is scratch of
// column_stats_partials(R, K) floats.
int64_t column_stats_partials(int64_t rows, int64_t cols);
cudaError_t column_stats(const Matrix& a, DType dtype, int correction, float* partials, float* mean, float* var,
                         cudaStream_t stream);

// ArCL's worst pair (docs/design.md family 3). Views v (N, m, D) read through their strides:
// element (i, j, d) is at ptr[i * stride_n + j * stride_m + d * stride_d].
constexpr int kWorstPairMaxViews = 64;

struct Views {
  const void* ptr = nullptr;
  int64_t samples = 0;
  int64_t views = 0;
  int64_t dim = 0;
  int64_t stride_n = 0;
  int64_t stride_m = 0;
  int64_t stride_d = 1;
};

// Per sample i: sims[i] = min_{j<k} v_ij·v_ik (fp32), first[i] = j, second[i] = k of the first
// minimising pair in lexicographic order. 2 <= m <= kWorstPairMaxViews.
cudaError_t worst_pair_forward(const Views& v, DType dtype, float* sims, int64_t* first, int64_t* second,
                               cudaStream_t stream);

// Pairwise sigmoid (SigLIP, Zhai et al. 2023; contract of fastssl/kernels/torch/pairwise_sigmoid.py).
// Rows x (M, D), columns y (Ny, D), logits l_ij = scale·x_i·y_j + bias; when has_pos, row i's
// positive column is p(i) = (i + pos_offset) mod Ny (label +1, every other pair −1), 0 <= pos_offset < Ny.
struct PairwiseSigmoidProblem {
  Matrix x, y;
  const float* scale = nullptr;  // device fp32 scalars (no host sync)
  const float* bias = nullptr;
  int64_t pos_offset = 0;
  bool has_pos = true;
};

// Forward: rows[i] = Σ_j softplus(−label_ij·l_ij), (M,) fp32.
cudaError_t pairwise_sigmoid_forward(const PairwiseSigmoidProblem& p, DType dtype, float* rows, cudaStream_t stream);

// Backward of Σ_i grad_rows_i·rows_i, G_ij = grad_rows_i·(−label_ij)·σ(−label_ij·l_ij):
// dx_i = scale·Σ_j G_ij y_j, dy_j = scale·Σ_i G_ij x_i (input dtype, contiguous), and per row
// dlogit_i = Σ_j G_ij, dscale_i = Σ_j G_ij·x_i·y_j (fp32; their sums are d bias and d scale).
struct PairwiseSigmoidGrads {
  const float* grad_rows = nullptr;     // (M,)
  const float* grad_absmax = nullptr;   // device scalar max_i |grad_rows_i| (fp16 range guard)
  void* dx = nullptr;                   // (M, D)
  void* dy = nullptr;                   // (Ny, D)
  float* dlogit = nullptr;              // (M,)
  float* dscale = nullptr;              // (M,)
};

cudaError_t pairwise_sigmoid_backward(const PairwiseSigmoidProblem& p, const PairwiseSigmoidGrads& g, DType dtype,
                                      cudaStream_t stream);

// Pairwise max (KoLeo's nearest neighbour, Sablayrolles et al. 2019; contract of
// fastssl/kernels/torch/pairwise_max.py): s_ij = x_i·y_j, value[i] = max_j s_ij with s_ii = −inf when
// exclude_self, index[i] = the first j attaining it; NaN ranks above every number (torch.argmax).
cudaError_t pairwise_max_forward(const Matrix& x, const Matrix& y, bool exclude_self, DType dtype, float* value,
                                 int64_t* index, cudaStream_t stream);

}  // namespace fastssl
