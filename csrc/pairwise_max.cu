// Pairwise max (nearest neighbour by inner product, KoLeo: Sablayrolles et al. 2019), hand-written
// CUDA: the contract of fastssl/kernels/torch/pairwise_max.py (the oracle) and the Triton kernel.
//
// Rows x (M, D), columns y (Ny, D), s_ij = x_i·y_j (s_ii = −inf when exclude_self):
//   value_i = max_j s_ij,   index_i = the first j attaining it,
// ranked as torch.argmax ranks: NaN above every number (the first NaN wins), then the larger value,
// and on a tie the lower column. A row whose every column is excluded gets (−inf, 0), as the torch
// kernel, because the excluded self column still competes, with −inf.
//
// The forward tiling of pairwise_lse.cu (pairwise_tiles.cuh): a CTA of 4 warps owns 64 rows of x,
// streams 64-row tiles of y, keeps the 16 x 64 logits of each warp in registers in the mma
// accumulator layout (bf16/fp16 m16n8k16, fp32 3xTF32, fp32 accumulation), and folds each into a
// per-lane running (value, index). The ranking is a total order, so folding in any order and a final
// 4-lane shuffle merge give the same answer as a left-to-right scan. Only value (M,) fp32 and index
// (M,) int64 are written; the backward is a row gather in torch (fastssl/ops/pairwise_max.py).
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "pairwise_tiles.cuh"

namespace fastssl {
namespace {

using namespace detail;
using namespace tiles;

struct KernelArgs {
  Matrix x, y;
  bool exclude_self;
  float* value;
  int64_t* index;
  int64_t d_pad;   // D rounded up to kBK (resident row tile)
  int o_resident;  // the row tile (kBM x D) is loaded once
  int vec_x, vec_y;
};

// Whether (v, i) ranks above (best, best_i): NaN first, then the larger value, then the lower index.
__device__ __forceinline__ bool ranks_above(float v, int64_t i, float best, int64_t best_i) {
  const bool v_nan = isnan(v), best_nan = isnan(best);
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best || (v == best && i < best_i);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pairwise_max_kernel(const KernelArgs args) {
  constexpr int PAD = TileTraits<T>::kPad;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wr0 = warp * 16;
  const Matrix& x = args.x;
  const Matrix& y = args.y;
  const int64_t M = x.rows, NY = y.rows, D = x.cols;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;

  const int ldo = args.o_resident ? static_cast<int>(args.d_pad) + PAD : kBK + PAD;
  const int lds = kBK + PAD;
  T* sO = reinterpret_cast<T*>(smem);
  T* sS = sO + kBM * ldo;

  if (args.o_resident) {
    load_tile<T>(sO, ldo, x.ptr, x.rows, x.cols, x.stride_r, x.stride_c, r0, 0, kBM, static_cast<int>(args.d_pad),
                 args.vec_x);
  }

  // This lane's two rows (g and g + 8 of its warp) and their running best; the start index is
  // above every column, so it loses every tie (and every row has at least one column: Ny > 0).
  int64_t row[2];
  float best[2] = {-CUDART_INF_F, -CUDART_INF_F};
  int64_t best_i[2] = {INT64_MAX, INT64_MAX};
#pragma unroll
  for (int h = 0; h < 2; ++h) row[h] = r0 + wr0 + g + 8 * h;

  for (int64_t c0 = 0; c0 < NY; c0 += kBN) {
    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      __syncthreads();
      if (!args.o_resident)
        load_tile<T>(sO, ldo, x.ptr, x.rows, x.cols, x.stride_r, x.stride_c, r0, k0, kBM, kBK, args.vec_x);
      load_tile<T>(sS, lds, y.ptr, y.rows, y.cols, y.stride_r, y.stride_c, c0, k0, kBN, kBK, args.vec_y);
      __syncthreads();
      logits_chunk<T>(s, args.o_resident ? sO + k0 : sO, ldo, sS, lds, wr0, g, t);
    }
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int64_t col = c0 + nb * 8 + 2 * t + (e & 1);
        if (col >= NY) continue;  // zero-filled padding, not a column
        const float v = args.exclude_self && col == row[h] ? -CUDART_INF_F : s[nb][e];
        if (ranks_above(v, col, best[h], best_i[h])) {
          best[h] = v;
          best_i[h] = col;
        }
      }
  }

  // The 4 lanes t of a row saw its columns 2t, 2t + 1 of every n8 block: merge them.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best[h], offset);
      const int64_t other_i = __shfl_xor_sync(0xffffffffu, best_i[h], offset);
      if (ranks_above(other, other_i, best[h], best_i[h])) {
        best[h] = other;
        best_i[h] = other_i;
      }
    }
    if (t == 0 && row[h] < M) {
      args.value[row[h]] = best[h];
      args.index[row[h]] = best_i[h];
    }
  }
}

template <typename T>
cudaError_t launch(const KernelArgs& base, cudaStream_t stream) {
  constexpr int PAD = TileTraits<T>::kPad;
  KernelArgs a = base;
  const int64_t D = a.x.cols;
  a.d_pad = (D + kBK - 1) / kBK * kBK;
  a.o_resident = D <= TileTraits<T>::kResidentD;
  a.vec_x = vec_ok(a.x, sizeof(T));
  a.vec_y = vec_ok(a.y, sizeof(T));
  const int ldo = a.o_resident ? static_cast<int>(a.d_pad) + PAD : kBK + PAD;
  const size_t bytes = sizeof(T) * (static_cast<size_t>(kBM) * ldo + static_cast<size_t>(kBN) * (kBK + PAD));
  const int64_t blocks = (a.x.rows + kBM - 1) / kBM;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = pairwise_max_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pairwise_max_forward(const Matrix& x, const Matrix& y, bool exclude_self, DType dtype, float* value,
                                 int64_t* index, cudaStream_t stream) {
  KernelArgs a{};
  a.x = x;
  a.y = y;
  a.exclude_self = exclude_self;
  a.value = value;
  a.index = index;
  if (y.rows <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch<float>(a, stream);
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastssl
