// Tensor-core and shared-memory helpers for the fastssl kernels (sm_80+; no torch headers).
//
// Warp-level mma.sync with documented fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"
// and "mma.m16n8k8"), so that the logits never leave registers between the two GEMMs of the
// backward and masks are applied with exact (row, column) indices. Lane l has g = l / 4, t = l % 4:
//   accumulator C (16 x 8, fp32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
//   bf16/fp16 m16n8k16: A a0 (g, 2t:2t+2), a1 (g+8, 2t:2t+2), a2 (g, 2t+8:2t+10), a3 (g+8, 2t+8:2t+10);
//                       B b0 (k 2t:2t+2, n g), b1 (k 2t+8:2t+10, n g)
//   tf32 m16n8k8:       A a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B b0 (k t, n g), b1 (k t+4, n g)
// fp32 inputs use three TF32 products (hi·hi + hi·lo + lo·hi, "3xTF32"): ~fp32 accuracy (the tests
// hold fp32 to rtol 2e-4 against a float64 oracle, which one TF32 product would miss).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastssl {
namespace detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Two 16-bit values (lo = lower k index) in one 32-bit register.
template <typename T>
__device__ __forceinline__ uint32_t pack_raw(T lo, T hi) { return bits16(lo) | (bits16(hi) << 16); }

template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  return pack_raw<T>(from_float<T>(lo), from_float<T>(hi));
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// x ≈ hi + lo, both TF32.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c += a·b to ~fp32 accuracy from split operands (small products first).
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const uint32_t (&a_hi)[4], const uint32_t (&a_lo)[4],
                                           const uint32_t (&b_hi)[2], const uint32_t (&b_lo)[2]) {
  mma_tf32(c, a_lo, b_hi);
  mma_tf32(c, a_hi, b_lo);
  mma_tf32(c, a_hi, b_hi);
}

// Per element type: k of one mma, shared-memory row padding (in elements; keeps the fragment
// loads below free of bank conflicts and rows 16-byte aligned), and the widest D whose owned tile
// stays resident in shared memory.
template <typename T>
struct TileTraits {
  static constexpr int kMmaK = 16;
  static constexpr int kPad = 8;
  static constexpr int kResidentD = 256;
};
template <>
struct TileTraits<float> {
  static constexpr int kMmaK = 8;
  static constexpr int kPad = 4;
  static constexpr int kResidentD = 128;
};

// Copy rows [row0, row0 + tile_rows) x cols [col0, col0 + tile_cols) of `m` (element type T, read
// through its int64 strides) into shared memory `dst` (leading dimension ld), zero-filling whatever
// lies outside the matrix. `vec` (stride_c == 1, 16-byte aligned rows) enables 16-byte loads.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const void* base, int64_t rows, int64_t cols,
                                          int64_t stride_r, int64_t stride_c, int64_t row0, int64_t col0,
                                          int tile_rows, int tile_cols, bool vec) {
  const T* src = static_cast<const T*>(base);
  constexpr int V = 16 / sizeof(T);
  const int chunks = tile_cols / V;
  for (int idx = threadIdx.x; idx < tile_rows * chunks; idx += blockDim.x) {
    const int r = idx / chunks;
    const int c = (idx - r * chunks) * V;
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    T* out = dst + r * ld + c;
    if (vec && gr < rows && gc + V <= cols) {
      *reinterpret_cast<uint4*>(out) = __ldg(reinterpret_cast<const uint4*>(src + gr * stride_r + gc));
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const bool in = gr < rows && gc + v < cols;
        out[v] = in ? src[gr * stride_r + (gc + v) * stride_c] : from_float<T>(0.0f);
      }
    }
  }
}

// Σ_d a[ra, d]·b[rb, d] in fp32, the whole warp cooperating; every lane gets the sum.
template <typename T>
__device__ __forceinline__ float warp_rowdot(const void* a, int64_t sar, int64_t sac, int64_t ra, const void* b,
                                             int64_t sbr, int64_t sbc, int64_t rb, int64_t d, int lane) {
  const T* pa = static_cast<const T*>(a) + ra * sar;
  const T* pb = static_cast<const T*>(b) + rb * sbr;
  float acc = 0.0f;
  for (int64_t k = lane; k < d; k += 32) acc = fmaf(to_float(pa[k * sac]), to_float(pb[k * sbc]), acc);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

}  // namespace detail
}  // namespace fastssl
