// ArCL's worst-pair selection, hand-written CUDA (docs/design.md family 3; contract of
// fastssl/kernels/torch/worst_pair.py, Zhao et al. 2023):
//
//   for views v (N, m, D) of normalised rows:  s_i = min_{j<k} v_ij·v_ik,
//   (j_i, k_i) = the first minimising pair in lexicographic (j, k) order, as torch.argmin.
//
// A memory-bound pass over N·m·D inputs: one CTA per sample streams its m x D block through shared
// memory in kChunk-column slices (read once, through the strides, converted to fp32), and each
// thread keeps fp32 dot products of its pairs in registers (pair p goes to thread p mod kThreads, so
// at most kPairsPerThread). A block-wide (value, pair index) min reduction picks the worst pair; the
// pair index runs over (j, k) in lexicographic order, so the lower index wins a tie. Three numbers per
// sample are written, nothing else.
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"

namespace fastssl {
namespace {

using namespace detail;

constexpr int kThreads = 128;
constexpr int kChunk = 64;  // columns of D per shared-memory slice
constexpr int kPairsPerThread = (kWorstPairMaxViews * (kWorstPairMaxViews - 1) / 2 + kThreads - 1) / kThreads;

// Lexicographic (j, k), j < k < m, of pair index p: row j holds m − 1 − j pairs.
__device__ __forceinline__ void pair_of(int p, int m, int& j, int& k) {
  j = 0;
  while (p >= m - 1 - j) {
    p -= m - 1 - j;
    ++j;
  }
  k = j + 1 + p;
}

// The better of two (value, index) candidates, as torch.argmin ranks them: NaN below every number,
// then the smaller value, and on a tie the lower index.
__device__ __forceinline__ void keep_min(float& value, int& index, float other_value, int other_index) {
  const bool mine_nan = isnan(value), other_nan = isnan(other_value);
  const bool better = (mine_nan || other_nan)
                          ? other_nan && (!mine_nan || other_index < index)
                          : other_value < value || (other_value == value && other_index < index);
  if (better) {
    value = other_value;
    index = other_index;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) worst_pair_kernel(const Views v, float* __restrict__ sims,
                                                               int64_t* __restrict__ first,
                                                               int64_t* __restrict__ second) {
  __shared__ float tile[kWorstPairMaxViews][kChunk + 1];  // +1: threads of one pair row hit other banks
  __shared__ float warp_value[kThreads / 32];
  __shared__ int warp_index[kThreads / 32];

  const int64_t sample = blockIdx.x;
  const int m = static_cast<int>(v.views);
  const int pairs = m * (m - 1) / 2;
  const T* base = static_cast<const T*>(v.ptr) + sample * v.stride_n;

  float acc[kPairsPerThread];
#pragma unroll
  for (int q = 0; q < kPairsPerThread; ++q) acc[q] = 0.f;

  for (int64_t d0 = 0; d0 < v.dim; d0 += kChunk) {
    const int width = static_cast<int>(v.dim - d0 < kChunk ? v.dim - d0 : kChunk);
    for (int e = threadIdx.x; e < m * kChunk; e += kThreads) {
      const int row = e / kChunk, col = e % kChunk;
      tile[row][col] = col < width ? to_float(base[row * v.stride_m + (d0 + col) * v.stride_d]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q) {
      const int p = threadIdx.x + q * kThreads;
      if (p < pairs) {
        int j, k;
        pair_of(p, m, j, k);
        float sum = acc[q];
        for (int c = 0; c < width; ++c) sum = fmaf(tile[j][c], tile[k][c], sum);
        acc[q] = sum;
      }
    }
    __syncthreads();
  }

  float best = CUDART_INF_F;
  int best_index = pairs;  // above every real pair: loses every tie
#pragma unroll
  for (int q = 0; q < kPairsPerThread; ++q) {
    const int p = threadIdx.x + q * kThreads;
    if (p < pairs) keep_min(best, best_index, acc[q], p);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(0xffffffffu, best, offset);
    const int other_index = __shfl_down_sync(0xffffffffu, best_index, offset);
    keep_min(best, best_index, other, other_index);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_value[warp] = best;
    warp_index[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) keep_min(best, best_index, warp_value[w], warp_index[w]);
    int j, k;
    pair_of(best_index, m, j, k);
    sims[sample] = best;
    first[sample] = j;
    second[sample] = k;
  }
}

}  // namespace

cudaError_t worst_pair_forward(const Views& v, DType dtype, float* sims, int64_t* first, int64_t* second,
                               cudaStream_t stream) {
  if (v.samples == 0) return cudaSuccess;
  if (v.views < 2 || v.views > kWorstPairMaxViews) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(v.samples));
  switch (dtype) {
    case DType::kFloat32: worst_pair_kernel<float><<<grid, kThreads, 0, stream>>>(v, sims, first, second); break;
    case DType::kFloat16: worst_pair_kernel<__half><<<grid, kThreads, 0, stream>>>(v, sims, first, second); break;
    case DType::kBFloat16:
      worst_pair_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(v, sims, first, second);
      break;
  }
  return cudaGetLastError();
}

}  // namespace fastssl
