// Off-diagonal Frobenius family, hand-written CUDA parts (docs/design.md kernel family 2; contract of
// fastssl/kernels/torch/frobenius.py). The cuda backend's Python adapter
// (fastssl/kernels/cuda/frobenius.py) runs the route's GEMMs with cuBLAS (torch.mm) on the small
// side in chunks of at most min(R, K)² fp32 entries, and these kernels do the rest:
//
//   affine_columns   â[r, k] = round_to_dtype((a[r, k] − shift[k])·scale[k]) in one pass over a
//                    (read through its strides: the spectral loss passes zᵀ), the transform the
//                    Triton kernels fold into their tile loads; written contiguous in the input
//                    dtype (the GEMM operand) or fp32.
//   sum_product      Σ_i u_i·v_i over a chunk of the route's matrix (Σ C² for "inner",
//                    Σ (aaᵀ)∘(bbᵀ) for "outer"): the epilogue, two-stage and deterministic (fixed
//                    grid, fixed reduction order; no atomics), so the same inputs give the same bits.
//   column_stats     per-column mean and (biased or unbiased) variance in one pass over (R, K):
//                    Welford per thread, Chan's merge across threads and row chunks, in fp32.
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"

namespace fastssl {
namespace {

using namespace detail;

constexpr int kReduceThreads = 256;
constexpr int kReduceMaxBlocks = 1024;
constexpr int kItemsPerThread = 8;

template <typename T, typename OutT>
__global__ void __launch_bounds__(256) affine_columns_kernel(const Matrix a, const float* __restrict__ shift,
                                                             const float* __restrict__ scale, OutT* __restrict__ out) {
  // threadIdx.x walks columns (coalesced for row-major a and for out), threadIdx.y and the grid's
  // y axis stride the rows.
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= a.cols) return;
  const T* src = static_cast<const T*>(a.ptr);
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < a.rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t idx = r * a.cols + k;
    float v = to_float(src[r * a.stride_r + k * a.stride_c]);
    if (shift != nullptr) v -= shift[k];
    if (scale != nullptr) v *= scale[k];
    // Round to the input dtype as the Triton kernels do before their dots (no-op for fp32).
    const T rounded = from_float<T>(v);
    out[idx] = static_cast<OutT>(to_float(rounded));
  }
}

template <typename T>
__global__ void __launch_bounds__(256) affine_columns_same_kernel(const Matrix a, const float* __restrict__ shift,
                                                                  const float* __restrict__ scale, T* __restrict__ out) {
  // threadIdx.x walks columns (coalesced for row-major a and for out), threadIdx.y and the grid's
  // y axis stride the rows.
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= a.cols) return;
  const T* src = static_cast<const T*>(a.ptr);
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < a.rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t idx = r * a.cols + k;
    float v = to_float(src[r * a.stride_r + k * a.stride_c]);
    if (shift != nullptr) v -= shift[k];
    if (scale != nullptr) v *= scale[k];
    out[idx] = from_float<T>(v);
  }
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = lane < nwarps ? scratch[lane] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;  // valid in thread 0
}

__global__ void __launch_bounds__(kReduceThreads) sum_product_partial_kernel(const float* __restrict__ u,
                                                                             const float* __restrict__ v, int64_t n,
                                                                             float* __restrict__ partials) {
  __shared__ float scratch[32];
  float acc = 0.0f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc = fmaf(u[i], v[i], acc);
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kReduceMaxBlocks) sum_partials_kernel(const float* __restrict__ partials, int n,
                                                                        float* __restrict__ out) {
  __shared__ float scratch[32];
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *out = acc;
}

int reduce_blocks(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kReduceThreads) * kItemsPerThread;
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<int>(b < 1 ? 1 : (b > kReduceMaxBlocks ? kReduceMaxBlocks : b));
}

// Column statistics: a block covers 32 columns x one chunk of rows; threadIdx.x is the column,
// threadIdx.y (8) strides the chunk's rows.
constexpr int kStatCols = 32;
constexpr int kStatRowThreads = 8;
constexpr int kStatRowsPerChunk = 1024;
constexpr int kStatMaxChunks = 256;

int64_t stat_chunks(int64_t rows) {
  int64_t c = (rows + kStatRowsPerChunk - 1) / kStatRowsPerChunk;
  return c < 1 ? 1 : (c > kStatMaxChunks ? kStatMaxChunks : c);
}

// Chan et al.'s merge of (n, mean, M2) summaries.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  if (nb == 0.0f) return;
  // Reciprocals instead of '/': IEEE division's slow-path subroutine shows up as spills in ptxas -v.
  const float nt = n + nb;
  const float inv = __frcp_rn(nt);
  const float delta = meanb - mean;
  mean += delta * (nb * inv);
  m2 += m2b + delta * delta * (n * nb * inv);
  n = nt;
}

template <typename T>
__global__ void __launch_bounds__(kStatCols* kStatRowThreads) column_stats_partial_kernel(const Matrix a,
                                                                                         int64_t rows_per_chunk,
                                                                                         float* __restrict__ partials) {
  __shared__ float sn[kStatRowThreads][kStatCols], smean[kStatRowThreads][kStatCols], sm2[kStatRowThreads][kStatCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kStatCols + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = r_begin + rows_per_chunk < a.rows ? r_begin + rows_per_chunk : a.rows;
  const T* src = static_cast<const T*>(a.ptr);
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  if (col < a.cols) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kStatRowThreads) {
      const float x = to_float(src[r * a.stride_r + col * a.stride_c]);
      n += 1.0f;
      const float delta = x - mean;
      mean += delta * __frcp_rn(n);
      m2 += delta * (x - mean);
    }
  }
  sn[threadIdx.y][threadIdx.x] = n;
  smean[threadIdx.y][threadIdx.x] = mean;
  sm2[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y == 0 && col < a.cols) {
    for (int j = 1; j < kStatRowThreads; ++j)
      chan_merge(n, mean, m2, sn[j][threadIdx.x], smean[j][threadIdx.x], sm2[j][threadIdx.x]);
    float* out = partials + 3 * (chunk * a.cols + col);
    out[0] = n;
    out[1] = mean;
    out[2] = m2;
  }
}

__global__ void __launch_bounds__(256) column_stats_final_kernel(const float* __restrict__ partials, int64_t chunks,
                                                                 int64_t cols, int correction, float* __restrict__ mean_out,
                                                                 float* __restrict__ var_out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = partials + 3 * (c * cols + col);
    chan_merge(n, mean, m2, p[0], p[1], p[2]);
  }
  // No rows: torch.var_mean gives NaN for both (the merge above would leave mean = 0).
  mean_out[col] = n > 0.0f ? mean : CUDART_NAN_F;
  const float dof = n - static_cast<float>(correction);
  var_out[col] = dof > 0.0f ? m2 / dof : CUDART_NAN_F;
}

dim3 affine_grid(int64_t rows, int64_t cols) {
  const int64_t cb = (cols + 31) / 32;
  int64_t rb = (rows + 7) / 8;
  rb = rb < 1 ? 1 : (rb > 4096 ? 4096 : rb);
  return dim3(static_cast<unsigned>(cb), static_cast<unsigned>(rb));
}

template <typename T>
cudaError_t affine_typed(const Matrix& a, const float* shift, const float* scale, void* out, DType out_dtype,
                         cudaStream_t stream) {
  const dim3 blocks = affine_grid(a.rows, a.cols);
  const dim3 threads(32, 8);
  if (blocks.x == 0 || (a.cols + 31) / 32 > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (out_dtype == DType::kFloat32) {
    affine_columns_kernel<T, float><<<blocks, threads, 0, stream>>>(a, shift, scale, static_cast<float*>(out));
  } else {
    affine_columns_same_kernel<T><<<blocks, threads, 0, stream>>>(a, shift, scale, static_cast<T*>(out));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t affine_columns(const Matrix& a, DType dtype, const float* shift, const float* scale, void* out,
                           DType out_dtype, cudaStream_t stream) {
  if (a.rows * a.cols == 0) return cudaSuccess;
  if (out_dtype != DType::kFloat32 && out_dtype != dtype) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return affine_typed<float>(a, shift, scale, out, DType::kFloat32, stream);
    case DType::kFloat16: return affine_typed<__half>(a, shift, scale, out, out_dtype, stream);
    case DType::kBFloat16: return affine_typed<__nv_bfloat16>(a, shift, scale, out, out_dtype, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t sum_product_partials(int64_t n) { return reduce_blocks(n); }

cudaError_t sum_product(const float* a, const float* b, int64_t n, float* partials, float* out, cudaStream_t stream) {
  const int blocks = reduce_blocks(n);
  sum_product_partial_kernel<<<blocks, kReduceThreads, 0, stream>>>(a, b, n, partials);
  sum_partials_kernel<<<1, kReduceMaxBlocks, 0, stream>>>(partials, blocks, out);
  return cudaGetLastError();
}

cudaError_t sum_partials(const float* partials, int64_t n, float* out, cudaStream_t stream) {
  if (n < 1 || n > 0x7fffffffLL) return cudaErrorInvalidValue;
  sum_partials_kernel<<<1, kReduceMaxBlocks, 0, stream>>>(partials, static_cast<int>(n), out);
  return cudaGetLastError();
}

int64_t column_stats_partials(int64_t rows, int64_t cols) { return 3 * stat_chunks(rows) * cols; }

cudaError_t column_stats(const Matrix& a, DType dtype, int correction, float* partials, float* mean, float* var,
                         cudaStream_t stream) {
  if (a.cols == 0) return cudaSuccess;
  const int64_t chunks = stat_chunks(a.rows);
  const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
  const int64_t col_blocks = (a.cols + kStatCols - 1) / kStatCols;
  if (col_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  const dim3 block(kStatCols, kStatRowThreads);
  switch (dtype) {
    case DType::kFloat32: column_stats_partial_kernel<float><<<grid, block, 0, stream>>>(a, rows_per_chunk, partials); break;
    case DType::kFloat16: column_stats_partial_kernel<__half><<<grid, block, 0, stream>>>(a, rows_per_chunk, partials); break;
    case DType::kBFloat16:
      column_stats_partial_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(a, rows_per_chunk, partials);
      break;
  }
  const int64_t fb = (a.cols + 255) / 256;
  column_stats_final_kernel<<<static_cast<unsigned>(fb), 256, 0, stream>>>(partials, chunks, a.cols, correction, mean, var);
  return cudaGetLastError();
}

}  // namespace fastssl
