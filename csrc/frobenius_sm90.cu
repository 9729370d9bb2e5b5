// ‖âᵀb̂‖²_F on Hopper (sm_90a), the covariance ("inner") route's forward fused with its reduction: TMA,
// an mbarrier pipeline, wgmma, and C = âᵀb̂ never leaves the registers.
//
// Contract: fastssl/kernels/torch/frobenius.py (the oracle), docs/design.md family 2. The operands are
// the transformed â (N, Da) and b̂ (N, Db), bf16/fp16, rows TMA can read (frobenius.cu's affine_columns
// writes them contiguous; Da, Db multiples of 8). The value is
//
//     Σ_kl C_kl²,   C = âᵀb̂ (Da x Db, fp32 accumulation over the N rows)
//
// and the caller's other routes (cuBLAS + frobenius.cu's sum_product) compute the same number.
//
// Structure (the GEMM of pairwise_lse_sm90.cu, FlashAttention-3's, Shah et al. 2024, turned around):
//   * One 128 x 128 tile (i, j) of C per step: rows 128i.. of C are columns of â, its columns are
//     columns of b̂, and the reduction runs over the N rows, so both operands are read MN-major.
//   * A CTA has three warpgroups: warpgroup 0 is the producer (one thread issues TMA), warpgroups 1 and
//     2 are consumers, each owning 64 rows of the tile (wgmma's M). The grid is persistent: CTA c
//     walks tiles c, c + gridDim.x, ...; the ring's load numbering runs on across tiles, so the
//     producer fills the next tile's stages while the consumers reduce the last one.
//   * A stage is kBK = 64 rows of N: two 64-column boxes of â (one per consumer) and two of b̂ (the
//     128 columns of B), each 64 rows x 128 bytes with the 128-byte swizzle. A box wholly past Da or
//     Db is not loaded (its stale or zero contents only reach masked entries of C).
//   * Per stage each consumer issues 4 x wgmma m64n128k16 with both transpose flags (A = the â box,
//     B = the two b̂ boxes, one leading byte offset apart), keeps one group in flight and releases
//     the previous stage, as pairwise_lse_sm90.cu does.
//   * Epilogue: Σ C² over the 64 registers of each thread, entries with row ≥ Da or column ≥ Db
//     masked at their exact (acc_row, acc_col), times the tile weight (b̂ is â: only tiles i ≤ j run,
//     weight 2 off the diagonal), a 32-lane shuffle sum, and one fp32 partial per (tile, consumer,
//     warp) at a fixed slot. frobenius.cu's sum_partials adds them in a fixed order: the result
//     does not depend on the grid or on timing (deterministic, no atomics).
#include "fastssl_kernels.h"
#include "sm90_host.cuh"
#include "sm90_utils.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "frobenius_sm90.cu uses wgmma and TMA: compile it with -gencode=arch=compute_90a,code=sm_90a only"
#endif

namespace fastssl {
namespace {

constexpr int kBM = 128;     // rows of a C tile: columns of â (two consumer warpgroups of 64)
constexpr int kBN = 128;     // columns of a C tile: columns of b̂ (wgmma n128)
constexpr int kBK = 64;      // rows of N per stage
constexpr int kBoxCols = 64;  // one 128-byte swizzled row of a box
constexpr int kStages = 6;
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kWarpsPerConsumer = 4;
constexpr int kPartialsPerTile = kConsumers * kWarpsPerConsumer;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= 64 * 1024, "register file");
constexpr uint32_t kBoxBytes = kBK * kBoxCols * 2;  // 8 KiB: kBK rows of 128 bytes
constexpr uint32_t kABoxes = kBM / kBoxCols;        // 2
constexpr uint32_t kBBoxes = kBN / kBoxCols;        // 2
constexpr uint32_t kStageBytes = (kABoxes + kBBoxes) * kBoxBytes;
constexpr uint32_t kBOffset = kABoxes * kBoxBytes;  // b̂'s boxes after â's within a stage
constexpr uint32_t kKStepBytes = 16 * sm90::kSwizzleRowBytes;  // 16 rows of N: one wgmma k16 step
static_assert(kBoxBytes % sm90::kSwizzleAtomBytes == 0 && kBM == kConsumers * kBoxCols, "box layout");

// Shared memory: the ring (1024-byte aligned stages), then its barriers, plus the alignment slack.
struct SmemPlan {
  static constexpr uint32_t kBarrierOffset = kStages * kStageBytes;
  static constexpr int kBarriers = 2 * kStages;
  static constexpr size_t kBytes = sm90::kSwizzleAtomBytes + kBarrierOffset + kBarriers * sizeof(uint64_t);
};

struct Args {
  CUtensorMap a_map;  // boxes of kBoxCols x kBK, 128-byte swizzle (passed __grid_constant__)
  CUtensorMap b_map;  // = a_map when symmetric
  int64_t a_cols;     // Da
  int64_t b_cols;     // Db
  int64_t tiles;      // tiles of C this launch walks
  float* partials;    // kPartialsPerTile per tile
  int tiles_a;        // ceil(Da / kBM)
  int tiles_b;        // ceil(Db / kBN)
  int chunks;         // ceil(N / kBK)
  bool symmetric;     // b̂ is â: tiles i <= j only
};

// Tile t of the walk: (i, j) of C and its weight. b̂ is â (C symmetric): the tiles i ≤ j row by
// row, weight 2 off the diagonal (the tile (j, i) is its transpose: the same sum of squares); else
// every (i, j) row by row, weight 1.
struct Tile {
  int i, j;
  float weight;
};
__host__ __device__ inline Tile tile_of(int64_t t, int tiles_a, int tiles_b, bool symmetric) {
  if (!symmetric) return {static_cast<int>(t / tiles_b), static_cast<int>(t % tiles_b), 1.0f};
  int i = 0;
  while (t >= tiles_b - i) {  // row i holds tiles_b − i tiles; at most tiles_b steps once per tile
    t -= tiles_b - i;
    ++i;
  }
  const int j = i + static_cast<int>(t);
  return {i, j, i == j ? 1.0f : 2.0f};
}

// How many of a tile's boxes hold any column < cols (those past it are not loaded).
__host__ __device__ constexpr uint32_t boxes_in(int64_t cols, int64_t col0, uint32_t boxes) {
  const int64_t n = cols <= col0 ? 0 : (cols - col0 + kBoxCols - 1) / kBoxCols;
  return static_cast<uint32_t>(n < boxes ? n : boxes);
}

// Whether accumulator register r of thread tid of consumer `consumer` holds an entry of C (row < Da,
// column < Db) in tile `tile`; the rest of the tile is padding: zeros, or stale boxes not reloaded.
__host__ __device__ inline bool in_c(const Tile& tile, int consumer, int tid, int r, int64_t a_cols, int64_t b_cols) {
  return int64_t{tile.i} * kBM + 64 * consumer + sm90::acc_row(tid, r) < a_cols &&
         int64_t{tile.j} * kBN + sm90::acc_col(tid, r) < b_cols;
}

// The pipeline phases of pairwise_lse_sm90.cu: load `it` uses stage it % S as its use u = it / S;
// consumers wait on full with parity u & 1, the producer on empty with (u & 1) ^ 1.
struct Stage {
  uint32_t index;
  uint32_t parity;
};
template <int S>
__host__ __device__ constexpr Stage stage_of(uint32_t it) { return {it % S, (it / S) & 1u}; }

// Descriptors of consumer `consumer`'s A (its 64 columns of â: one box) and of B (b̂'s two boxes, one
// box apart: the leading byte offset) for k16 step `ks` of the stage at shared address `stage_addr`.
__host__ __device__ constexpr uint64_t a_desc(uint32_t stage_addr, int consumer, int ks) {
  return sm90::sw128_mn_desc(stage_addr + consumer * kBoxBytes + ks * kKStepBytes, kBoxBytes);
}
__host__ __device__ constexpr uint64_t b_desc(uint32_t stage_addr, int ks) {
  return sm90::sw128_mn_desc(stage_addr + kBOffset + ks * kKStepBytes, kBoxBytes);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) sq_frobenius_inner_sm90_kernel(const __grid_constant__ Args args) {
  extern __shared__ unsigned char smem_raw[];
  // TMA's 128-byte swizzle and the descriptors (base offset 0) need 1024-byte aligned boxes.
  unsigned char* ring = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + sm90::kSwizzleAtomBytes - 1) & ~uintptr_t(sm90::kSwizzleAtomBytes - 1));
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + SmemPlan::kBarrierOffset);
  uint64_t* empty = full + kStages;
  const int warpgroup = threadIdx.x / 128;
  const int chunks = args.chunks;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], kConsumers);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier: the producer warpgroup leaves after its loop

  if (warpgroup == 0) {
    sm90::setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    sm90::prefetch_tensor_map(&args.a_map);
    sm90::prefetch_tensor_map(&args.b_map);
    uint32_t it = 0;
    for (int64_t t = blockIdx.x; t < args.tiles; t += gridDim.x) {
      const Tile tile = tile_of(t, args.tiles_a, args.tiles_b, args.symmetric);
      const int32_t a0 = tile.i * kBM, b0 = tile.j * kBN;
      const uint32_t na = boxes_in(args.a_cols, a0, kABoxes), nb = boxes_in(args.b_cols, b0, kBBoxes);
      for (int kc = 0; kc < chunks; ++kc, ++it) {
        const Stage st = stage_of<kStages>(it);
        unsigned char* stage = ring + st.index * kStageBytes;
        sm90::mbarrier_wait(&empty[st.index], st.parity ^ 1u);
        sm90::mbarrier_arrive_expect_tx(&full[st.index], (na + nb) * kBoxBytes);
        for (uint32_t h = 0; h < na; ++h)
          sm90::tma_load_2d(stage + h * kBoxBytes, &args.a_map, &full[st.index], a0 + h * kBoxCols, kc * kBK);
        for (uint32_t h = 0; h < nb; ++h)
          sm90::tma_load_2d(stage + kBOffset + h * kBoxBytes, &args.b_map, &full[st.index], b0 + h * kBoxCols,
                            kc * kBK);
      }
    }
    return;
  }

  // Consumers: both warpgroups walk every stage of every tile (the empty barriers count both).
  sm90::setmaxnreg_inc<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const uint32_t ring_addr = sm90::smem_u32(ring);
  float d[64];
#pragma unroll
  for (int r = 0; r < 64; ++r) d[r] = 0.0f;

  uint32_t it = 0;
  for (int64_t t = blockIdx.x; t < args.tiles; t += gridDim.x) {
    const Tile tile = tile_of(t, args.tiles_a, args.tiles_b, args.symmetric);
    uint32_t prev_stage = 0;
    for (int kc = 0; kc < chunks; ++kc, ++it) {
      const Stage st = stage_of<kStages>(it);
      sm90::mbarrier_wait(&full[st.index], st.parity);
      sm90::wgmma_fence();
      const uint32_t stage = ring_addr + st.index * kStageBytes;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks)
        sm90::WgmmaTT<T>::run(d, a_desc(stage, consumer, ks), b_desc(stage, ks), kc > 0 || ks > 0);
      sm90::wgmma_commit();
      if (kc > 0) {
        sm90::wgmma_wait<1>();
        if (tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);
      }
      prev_stage = st.index;
    }
    sm90::wgmma_wait<0>();
    if (tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);

    // Σ C² of this thread's entries inside C (the masks: row < Da, column < Db), weighted.
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < 64; ++r)
      sum = in_c(tile, consumer, tid, r, args.a_cols, args.b_cols) ? fmaf(d[r], d[r], sum) : sum;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) args.partials[(t * kConsumers + consumer) * kWarpsPerConsumer + warp] = tile.weight * sum;
  }
}

template <typename T>
cudaError_t launch(const Args& args, int grid, cudaStream_t stream) {
  constexpr size_t kSmemBytes = SmemPlan::kBytes;
  auto kernel = sq_frobenius_inner_sm90_kernel<T>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

int64_t tiles_of(int64_t a_cols, int64_t b_cols, bool symmetric) {
  const int64_t ta = (a_cols + kBM - 1) / kBM, tb = (b_cols + kBN - 1) / kBN;
  return symmetric ? ta * (ta + 1) / 2 : ta * tb;
}

}  // namespace

bool sq_frobenius_inner_sm90_supported(const Matrix& a, const Matrix& b, DType dtype) {
  return dtype != DType::kFloat32 && a.rows == b.rows && a.cols >= 1 && b.cols >= 1 && sm90::tma_readable(a) &&
         sm90::tma_readable(b);
}

int64_t sq_frobenius_inner_sm90_partials(int64_t a_cols, int64_t b_cols, bool symmetric) {
  return kPartialsPerTile * tiles_of(a_cols, b_cols, symmetric);
}

cudaError_t sq_frobenius_inner_sm90(const Matrix& a, const Matrix& b, bool symmetric, DType dtype, float* partials,
                                    float* out, cudaStream_t stream) {
  if (!sq_frobenius_inner_sm90_supported(a, b, dtype) || (symmetric && a.ptr != b.ptr)) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaMemsetAsync(out, 0, sizeof(float), stream);
  Args args{};
  args.a_cols = a.cols;
  args.b_cols = b.cols;
  args.symmetric = symmetric;
  args.tiles = tiles_of(a.cols, b.cols, symmetric);
  args.tiles_a = static_cast<int>((a.cols + kBM - 1) / kBM);
  args.tiles_b = static_cast<int>((b.cols + kBN - 1) / kBN);
  args.chunks = static_cast<int>((a.rows + kBK - 1) / kBK);
  args.partials = partials;
  cudaError_t err = sm90::encode_map_2d(&args.a_map, a, dtype, kBoxCols, kBK);
  if (err == cudaSuccess) err = sm90::encode_map_2d(&args.b_map, b, dtype, kBoxCols, kBK);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int grid = static_cast<int>(args.tiles < sms ? args.tiles : sms);
  err = dtype == DType::kBFloat16 ? launch<__nv_bfloat16>(args, grid, stream) : launch<__half>(args, grid, stream);
  if (err != cudaSuccess) return err;
  return sum_partials(partials, kPartialsPerTile * args.tiles, out, stream);
}

}  // namespace fastssl
