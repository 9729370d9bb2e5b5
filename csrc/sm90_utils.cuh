// Hopper (sm_90a) building blocks for the fastssl kernels: TMA, mbarriers, wgmma (no torch headers).
//
// Hand-written inline PTX (PTX ISA 8.x: "cp.async.bulk.tensor", "mbarrier", "wgmma.mma_async",
// "Matrix Descriptor Format", "Register Fragments: wgmma .m64nNk16"), as FlashAttention-3 (Shah et
// al. 2024) uses these instructions: operand tiles land in shared memory by TMA, swizzled 128 bytes
// wide; warpgroups read them through matrix descriptors with the same swizzle; accumulators stay in
// registers. csrc/README.md says why this is PTX and not CUTLASS/CuTe.
//
// The layout functions below are __host__ __device__ so that tests/csrc/test_sm90_layout.py can run
// them on the CPU and check them against the ISA's tables: the kernel's masks use exactly these.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap (types only: the driver is reached through cudaGetDriverEntryPoint)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastssl {
namespace sm90 {

// ---- shared-memory operand layout (K-major, 128-byte swizzle) -----------------------------------
// A tile of R rows x 64 bf16/fp16 elements is R rows of 128 bytes. TMA with CU_TENSOR_MAP_SWIZZLE_128B
// stores element (r, k) at byte r·128 + ((k/8) XOR (r mod 8))·16 + (k mod 8)·2 of a 1024-byte aligned
// tile: the 16-byte chunk index is XORed with the row within each 8-row, 1024-byte atom.
constexpr int kSwizzleRowBytes = 128;
constexpr int kSwizzleAtomBytes = 8 * kSwizzleRowBytes;
// One wgmma k16 step is 16 elements = 32 bytes further along the (pre-swizzle) row.
constexpr int kKStepBytes = 32;

// wgmma matrix descriptor of a K-major operand with 128-byte swizzle whose (pre-swizzle) first
// element is at shared address `addr`: start address (bits 0-13, in 16-byte units), leading-dimension
// byte offset (bits 16-29; unused by swizzled K-major layouts, 1 by convention), stride-dimension byte
// offset (bits 32-45: 1024 bytes from one 8-row group to the next), base offset 0 (bits 49-51: the
// tiles are 1024-byte aligned), layout type 1 = 128-byte swizzle (bits 62-63).
__host__ __device__ constexpr uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(kSwizzleAtomBytes >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// The same for an MN-major operand (wgmma with the transpose flag): 64 elements of M or N in one
// 128-byte row, 8 consecutive rows are 8 k; leading byte offset (bits 16-29) = the distance from one
// 64-element block of M/N to the next, stride byte offset = 1024 from one 8-row group of k to the next.
__host__ __device__ constexpr uint64_t sw128_mn_desc(uint32_t addr, uint32_t mn_block_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((mn_block_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>(kSwizzleAtomBytes >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// ---- wgmma accumulator fragment (m64nNk16, fp32) -------------------------------------------------
// Thread `thread` (0-127) of the warpgroup holds, in register `reg` of its N/2 fp32 registers, element
// (row, col) of the 64 x N tile: warp w = thread/32 owns rows 16w..16w+15; within a warp, lane
// g = lane/4, t = lane%4 holds rows g and g+8, columns 2t and 2t+1 of each 8-column block (reg/4).
__host__ __device__ constexpr int acc_row(int thread, int reg) {
  return 16 * (thread >> 5) + ((thread & 31) >> 2) + 8 * ((reg >> 1) & 1);
}
__host__ __device__ constexpr int acc_col(int thread, int reg) {
  return 8 * (reg >> 2) + 2 * (thread & 3) + (reg & 1);
}

// wgmma's A operand in registers (m64nNk16, 16-bit): per warp as mma.m16n8k16's A, register q of a
// thread holds row g + 8·(q % 2), columns 2t + 8·(q / 2) and the next one. Those are exactly the
// accumulator registers 8kk + 2q and 8kk + 2q + 1 of columns 16kk..16kk+15 (FlashAttention's reuse of
// the logit tile as the next GEMM's A operand): `half` 0 is the lower column.
__host__ __device__ constexpr int acc_reg_of_a(int kk, int q, int half) { return 8 * kk + 2 * q + half; }

// ---- device-side PTX ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
}

// Makes the initialised barriers visible to the async proxy (TMA) before any use.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival that also announces `bytes` of TMA data the current phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

// Blocks until the phase of parity `parity` has completed (for a fresh barrier, parity 1 names the
// phase before the first one and returns at once).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// TMA: the box at (inner coordinate `k`, row `row`) of `map` into shared `dst`; completes `bytes`
// of the transaction count of `bar`. Out-of-range elements are written as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int32_t k, int32_t row) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(k), "r"(row)
      : "memory");
}

// Synchronises the `threads` threads (a multiple of 32) that use named barrier `id` (1-15; 0 is
// __syncthreads'), e.g. one consumer warpgroup, without stopping the other warpgroups.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Warp specialisation's register split (per warpgroup, all its threads): the producer gives
// registers back, the consumers take them. N is a multiple of 8 in [24, 256].
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}

// Orders earlier register writes of the accumulators before the next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N committed wgmma groups of this thread are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Makes `v` computed before the next asm statement (e.g. a wgmma wait): the compiler may otherwise
// move register-only work (a softmax whose results end in v) past the wait, out of the shadow of the
// running wgmma.
template <int K>
__device__ __forceinline__ void computed_here(float (&v)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(v[i]));
}

// The accumulator operands of a wgmma, in one place: its 32 (n64) or 64 (n128) fp32 registers d[i]
// as the instruction's register list (operands %0.. in order) and as asm outputs under constraint C
// ("+f" accumulates into d, "=f" only writes it).
#define FASTSSL_WGMMA_LIST32                                                                              \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                               \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define FASTSSL_WGMMA_LIST64                                                                              \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                               \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                                      \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                                      \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define FASTSSL_WGMMA_D32(C)                                                                              \
  C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]), C(d[8]), C(d[9]),               \
  C(d[10]), C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15]), C(d[16]), C(d[17]), C(d[18]),               \
  C(d[19]), C(d[20]), C(d[21]), C(d[22]), C(d[23]), C(d[24]), C(d[25]), C(d[26]), C(d[27]),               \
  C(d[28]), C(d[29]), C(d[30]), C(d[31])
#define FASTSSL_WGMMA_D64(C)                                                                              \
  FASTSSL_WGMMA_D32(C),                                                                                   \
  C(d[32]), C(d[33]), C(d[34]), C(d[35]), C(d[36]), C(d[37]), C(d[38]), C(d[39]), C(d[40]),               \
  C(d[41]), C(d[42]), C(d[43]), C(d[44]), C(d[45]), C(d[46]), C(d[47]), C(d[48]), C(d[49]),               \
  C(d[50]), C(d[51]), C(d[52]), C(d[53]), C(d[54]), C(d[55]), C(d[56]), C(d[57]), C(d[58]),               \
  C(d[59]), C(d[60]), C(d[61]), C(d[62]), C(d[63])

// d (64 x 128, fp32, fragment above) (+)= A (64 x 16) · B (128 x 16)ᵀ, both from shared memory
// through descriptors; TRANS "0, 0": both K-major; "1, 1": both MN-major (transpose flags,
// sw128_mn_desc descriptors: Aᵀ·B of two row-major (K, ·) matrices, frobenius_sm90.cu).
// `accumulate` = 0 overwrites d. Issued by all 128 threads of a warpgroup.
#define FASTSSL_WGMMA_M64N128K16(TYPE, TRANS)                                                             \
  asm volatile(                                                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                        \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " FASTSSL_WGMMA_LIST64               \
      ", %64, %65, p, 1, 1, " TRANS ";\n}\n"                                                              \
      : FASTSSL_WGMMA_D64("+f")                                                                           \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate))

// d = A · B (64 x 128, both K-major descriptors), d written only ("=f"): the first k16 step of a
// tile, so the compiler keeps no earlier value of d alive (nor copies one) while the GEMM runs.
#define FASTSSL_WGMMA_M64N128K16_FIRST(TYPE)                                                              \
  asm volatile(                                                                                           \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " FASTSSL_WGMMA_LIST64               \
      ", %64, %65, 0, 1, 1, 0, 0;\n"                                                                      \
      : FASTSSL_WGMMA_D64("=f")                                                                           \
      : "l"(desc_a), "l"(desc_b))

// d (64 x 128) (+)= A (64 x 16, registers a[0..3], layout of acc_reg_of_a) · B (16 x 128, MN-major
// descriptor, transpose flag set).
#define FASTSSL_WGMMA_M64N128K16_RS(TYPE)                                                                 \
  asm volatile(                                                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                        \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " FASTSSL_WGMMA_LIST64               \
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                     \
      : FASTSSL_WGMMA_D64("+f")                                                                           \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

// The same two with N = 64 (32 accumulator registers; the fragment maps above hold for reg < 32):
// kSym's logit half-tiles and its two accumulators of a 64-wide slice.
#define FASTSSL_WGMMA_M64N64K16(TYPE)                                                                     \
  asm volatile(                                                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                        \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " FASTSSL_WGMMA_LIST32                \
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                                   \
      : FASTSSL_WGMMA_D32("+f")                                                                           \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate))

#define FASTSSL_WGMMA_M64N64K16_RS(TYPE)                                                                  \
  asm volatile(                                                                                           \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                        \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " FASTSSL_WGMMA_LIST32                \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                     \
      : FASTSSL_WGMMA_D32("+f")                                                                           \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

template <typename T>
struct Wgmma;

template <>
struct Wgmma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    FASTSSL_WGMMA_M64N128K16("bf16", "0, 0");
  }
  // Both operands MN-major (transpose flags set).
  static __device__ __forceinline__ void run_tt(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    FASTSSL_WGMMA_M64N128K16("bf16", "1, 1");
  }
  static __device__ __forceinline__ void first(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
    FASTSSL_WGMMA_M64N128K16_FIRST("bf16");
  }
  static __device__ __forceinline__ void run_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                int accumulate) {
    FASTSSL_WGMMA_M64N128K16_RS("bf16");
  }
  static __device__ __forceinline__ void run(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    FASTSSL_WGMMA_M64N64K16("bf16");
  }
  static __device__ __forceinline__ void run_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                int accumulate) {
    FASTSSL_WGMMA_M64N64K16_RS("bf16");
  }
};

template <>
struct Wgmma<__half> {
  static __device__ __forceinline__ void run(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    FASTSSL_WGMMA_M64N128K16("f16", "0, 0");
  }
  // Both operands MN-major (transpose flags set).
  static __device__ __forceinline__ void run_tt(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    FASTSSL_WGMMA_M64N128K16("f16", "1, 1");
  }
  static __device__ __forceinline__ void first(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
    FASTSSL_WGMMA_M64N128K16_FIRST("f16");
  }
  static __device__ __forceinline__ void run_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                int accumulate) {
    FASTSSL_WGMMA_M64N128K16_RS("f16");
  }
  static __device__ __forceinline__ void run(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    FASTSSL_WGMMA_M64N64K16("f16");
  }
  static __device__ __forceinline__ void run_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                int accumulate) {
    FASTSSL_WGMMA_M64N64K16_RS("f16");
  }
};

#undef FASTSSL_WGMMA_M64N128K16
#undef FASTSSL_WGMMA_M64N128K16_FIRST
#undef FASTSSL_WGMMA_M64N128K16_RS
#undef FASTSSL_WGMMA_M64N64K16
#undef FASTSSL_WGMMA_M64N64K16_RS
#undef FASTSSL_WGMMA_LIST32
#undef FASTSSL_WGMMA_LIST64
#undef FASTSSL_WGMMA_D32
#undef FASTSSL_WGMMA_D64

}  // namespace sm90
}  // namespace fastssl
