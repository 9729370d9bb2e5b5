// Host side of the Hopper kernels: which operands TMA can read, and their CUtensorMap (no torch headers).
//
// The driver's cuTensorMapEncodeTiled is reached through the runtime's driver entry point, so no
// object links libcuda directly. Generic over the box, so each kernel file picks its own tile shape.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include "fastssl_kernels.h"

namespace fastssl {
namespace sm90 {

// Row-contiguous, 16-byte aligned base and row stride (TMA's global-stride rule), int32 coordinates.
inline bool tma_readable(const Matrix& m) {
  return m.ptr != nullptr && (m.stride_c == 1 || m.cols == 1) && reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0 &&
         (m.stride_r * 2) % 16 == 0 && m.stride_r >= m.cols && m.rows < (int64_t{1} << 31) &&
         m.cols < (int64_t{1} << 31);
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr)
               : nullptr;
  }();
  return fn;
}

// A 2-D map over m (rows x cols, 2-byte elements) with box_cols x box_rows boxes (box_cols · 2 ≤ 128
// bytes) and the 128-byte swizzle the wgmma descriptors assume; out-of-range elements read as zeros.
inline cudaError_t encode_map_2d(CUtensorMap* map, const Matrix& m, DType dtype, uint32_t box_cols,
                                 uint32_t box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(m.cols), static_cast<cuuint64_t>(m.rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(m.stride_r) * 2};  // bytes, the outer dimension
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(map, type, 2, const_cast<void*>(m.ptr), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace sm90
}  // namespace fastssl
