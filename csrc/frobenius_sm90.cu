// ‖âᵀb̂‖²_F on Hopper (sm_90a), both routes' forward fused with their reduction: TMA, an mbarrier
// pipeline, wgmma, and the route's matrix never leaves the registers.
//
// Contract: fastssl/kernels/torch/frobenius.py (the oracle), docs/design.md family 2. The operands are
// the transformed â (N, Da) and b̂ (N, Db), bf16/fp16, rows TMA can read (frobenius.cu's affine_columns
// writes them contiguous; Da, Db multiples of 8). The value, by either route, is
//
//     inner (covariance):  Σ_kl C_kl²,                C = âᵀb̂ (Da x Db, reduced over the N rows)
//     outer (Gram):        Σ_rs (ââᵀ)_rs (b̂b̂ᵀ)_rs     the N x N Grams, reduced over the K columns
//
// with fp32 accumulation, as the cuBLAS chunks + frobenius.cu's sum_product compute it.
//
// Structure (the GEMM of pairwise_lse_sm90.cu, FlashAttention-3's, Shah et al. 2024):
//   * One 128 x 128 tile (i, j) of the route's matrix per step. A CTA has three warpgroups:
//     warpgroup 0 is the producer (one thread issues TMA), warpgroups 1 and 2 are consumers, each
//     owning 64 rows of the tile (wgmma's M). The grid is persistent: CTA c walks tiles c,
//     c + gridDim.x, ...; the ring's load numbering runs on across tiles, so the producer fills the
//     next tile's stages while the consumers reduce the last one.
//   * inner: the reduction runs over the N rows, so both operands are MN-major. A stage is kBK = 64
//     rows of N: two 64-column boxes of â (one per consumer) and two of b̂ (the 128 columns of B),
//     64 rows x 128 bytes each; 4 x wgmma m64n128k16 per stage with both transpose flags. A box wholly
//     past Da or Db is not loaded (its stale contents only reach masked entries).
//   * outer: the reduction runs over K, so both operands are K-major, as pairwise_lse_sm90.cu's logit
//     GEMM. A stage is kBK = 64 columns of K: rows I and rows J of â (and of b̂), 128 rows x 128 bytes
//     each; per stage 4 wgmma for the tile of ââᵀ and, unless b̂ is â, 4 for b̂b̂ᵀ into a second
//     accumulator. Both Grams are symmetric, so only the tiles i ≤ j run.
//   * Each consumer keeps one wgmma group in flight and releases the previous stage.
//   * Epilogue: Σ C² (inner, and outer with b̂ = â) or Σ G_a·G_b (outer) over the 64 registers of each
//     thread, keeping exactly the entries inside the matrix (in_c at their acc_row, acc_col), times
//     the tile weight (symmetric walks: 2 off the diagonal), a 32-lane shuffle sum, and one fp32
//     partial per (tile, consumer, warp) at a fixed slot. frobenius.cu's sum_partials adds them in a
//     fixed order: the result does not depend on the grid or on timing (deterministic, no atomics).
#include "fastssl_kernels.h"
#include "sm90_host.cuh"
#include "sm90_utils.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "frobenius_sm90.cu uses wgmma and TMA: compile it with -gencode=arch=compute_90a,code=sm_90a only"
#endif

namespace fastssl {
namespace {

// The three kernels: the inner route, the outer route, the outer route with b̂ = â (one Gram).
enum Kind : int { kInner = 0, kOuter = 1, kOuterSame = 2 };

constexpr int kBM = 128;      // rows of a tile (two consumer warpgroups of 64)
constexpr int kBN = 128;      // columns of a tile (wgmma n128)
constexpr int kBK = 64;       // the reduction per stage: rows of N (inner) or columns of K (outer)
constexpr int kBoxCols = 64;  // one 128-byte swizzled row of a box
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kWarpsPerConsumer = 4;
constexpr int kPartialsPerTile = kConsumers * kWarpsPerConsumer;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= 64 * 1024, "register file");
constexpr uint32_t kRingBytes = 192 * 1024;
constexpr uint32_t kMnStepBytes = 16 * sm90::kSwizzleRowBytes;  // MN-major k16 step: 16 rows
constexpr uint32_t kConsumerRowBytes = 64 * sm90::kSwizzleRowBytes;  // K-major: a consumer's 64 rows
static_assert(kBM == kConsumers * kBoxCols && kBN == 2 * kBoxCols, "tile layout");

// A stage of kind KIND: its boxes (inner: â's two, then b̂'s two, kBK rows each; outer: â rows I, â
// rows J, then b̂ rows I, b̂ rows J, kBM rows each), the ring of kStages stages, then its barriers,
// plus the alignment slack.
template <int KIND>
struct Plan {
  static constexpr uint32_t kBoxRows = KIND == kInner ? kBK : kBM;
  static constexpr uint32_t kBoxBytes = kBoxRows * sm90::kSwizzleRowBytes;
  static constexpr uint32_t kBoxes = KIND == kOuterSame ? 2 : 4;
  static constexpr uint32_t kStageBytes = kBoxes * kBoxBytes;
  static constexpr int kStages = kRingBytes / kStageBytes;  // 6, 3, 6
  static constexpr uint32_t kBarrierOffset = kStages * kStageBytes;
  static constexpr int kBarriers = 2 * kStages;
  static constexpr size_t kBytes = sm90::kSwizzleAtomBytes + kBarrierOffset + kBarriers * sizeof(uint64_t);
  static_assert(kBoxBytes % sm90::kSwizzleAtomBytes == 0, "boxes on 1024-byte swizzle atoms");
};

struct Args {
  CUtensorMap a_map;  // boxes of kBoxCols x Plan::kBoxRows, 128-byte swizzle (passed __grid_constant__)
  CUtensorMap b_map;  // = a_map when b̂ is â
  int64_t rows_bound;  // the matrix walked: Da x Db (inner), N x N (outer)
  int64_t cols_bound;
  int64_t tiles;       // tiles this launch walks
  float* partials;     // kPartialsPerTile per tile
  int tiles_a;         // tile rows of the matrix
  int tiles_b;         // tile columns
  int chunks;          // ceil(reduction / kBK)
  bool symmetric;      // the matrix (its squared entries) is symmetric: tiles i <= j only
};

// Tile t of the walk: (i, j) and its weight. A symmetric walk (inner with b̂ = â, outer: both Grams
// are symmetric) takes the tiles i ≤ j row by row, weight 2 off the diagonal (the tile (j, i) is the
// transpose of (i, j): the same sum); else every (i, j) row by row, weight 1.
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

// Whether accumulator register r of thread tid of consumer `consumer` holds an entry of the matrix
// (row < rows, column < cols: Da x Db or N x N) in tile `tile`; the rest of the tile is padding: zeros,
// or stale boxes not reloaded.
__host__ __device__ inline bool in_c(const Tile& tile, int consumer, int tid, int r, int64_t rows, int64_t cols) {
  return int64_t{tile.i} * kBM + 64 * consumer + sm90::acc_row(tid, r) < rows &&
         int64_t{tile.j} * kBN + sm90::acc_col(tid, r) < cols;
}

// The pipeline phases of pairwise_lse_sm90.cu: load `it` uses stage it % S as its use u = it / S;
// consumers wait on full with parity u & 1, the producer on empty with (u & 1) ^ 1.
struct Stage {
  uint32_t index;
  uint32_t parity;
};
template <int S>
__host__ __device__ constexpr Stage stage_of(uint32_t it) { return {it % S, (it / S) & 1u}; }

// Descriptors for k16 step `ks` of the stage at shared address `stage`: A is consumer `consumer`'s 64
// rows of the tile, B its 128 columns, of â (operand 0) or b̂ (operand 1, outer only).
//   inner: MN-major, A = the consumer's box of â, B = b̂'s two boxes one box apart (leading byte
//          offset); a k16 step is 16 rows of the boxes.
//   outer: K-major, A = the consumer's 64 rows of the rows-I box, B = the rows-J box; a k16 step is
//          32 bytes along the (pre-swizzle) row.
template <int KIND>
__host__ __device__ constexpr uint64_t a_desc(uint32_t stage, int consumer, int ks, int operand) {
  return KIND == kInner ? sm90::sw128_mn_desc(stage + consumer * Plan<KIND>::kBoxBytes + ks * kMnStepBytes,
                                              Plan<KIND>::kBoxBytes)
                        : sm90::sw128_desc(stage + 2 * operand * Plan<KIND>::kBoxBytes + consumer * kConsumerRowBytes +
                                           ks * sm90::kKStepBytes);
}
template <int KIND>
__host__ __device__ constexpr uint64_t b_desc(uint32_t stage, int ks, int operand) {
  return KIND == kInner ? sm90::sw128_mn_desc(stage + 2 * Plan<KIND>::kBoxBytes + ks * kMnStepBytes,
                                              Plan<KIND>::kBoxBytes)
                        : sm90::sw128_desc(stage + (2 * operand + 1) * Plan<KIND>::kBoxBytes + ks * sm90::kKStepBytes);
}

template <typename T, int KIND>
__global__ void __launch_bounds__(kThreads, 1) sq_frobenius_sm90_kernel(const __grid_constant__ Args args) {
  using P = Plan<KIND>;
  constexpr int kStages = P::kStages;
  extern __shared__ unsigned char smem_raw[];
  // TMA's 128-byte swizzle and the descriptors (base offset 0) need 1024-byte aligned boxes.
  unsigned char* ring = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + sm90::kSwizzleAtomBytes - 1) & ~uintptr_t(sm90::kSwizzleAtomBytes - 1));
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + P::kBarrierOffset);
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
      const int32_t r0 = tile.i * kBM, c0 = tile.j * kBN;
      // inner: the boxes that reach Da (â) and Db (b̂); outer: all of them.
      const uint32_t na = KIND == kInner ? boxes_in(args.rows_bound, r0, 2) : 2;
      const uint32_t nb = KIND == kInner ? boxes_in(args.cols_bound, c0, 2) : (KIND == kOuter ? 2 : 0);
      for (int kc = 0; kc < chunks; ++kc, ++it) {
        const Stage st = stage_of<kStages>(it);
        unsigned char* stage = ring + st.index * P::kStageBytes;
        uint64_t* bar = &full[st.index];
        sm90::mbarrier_wait(&empty[st.index], st.parity ^ 1u);
        sm90::mbarrier_arrive_expect_tx(bar, (na + nb) * P::kBoxBytes);
        if constexpr (KIND == kInner) {
          for (uint32_t h = 0; h < na; ++h)
            sm90::tma_load_2d(stage + h * P::kBoxBytes, &args.a_map, bar, r0 + h * kBoxCols, kc * kBK);
          for (uint32_t h = 0; h < nb; ++h)
            sm90::tma_load_2d(stage + (2 + h) * P::kBoxBytes, &args.b_map, bar, c0 + h * kBoxCols, kc * kBK);
        } else {
          sm90::tma_load_2d(stage, &args.a_map, bar, kc * kBK, r0);
          sm90::tma_load_2d(stage + P::kBoxBytes, &args.a_map, bar, kc * kBK, c0);
          if constexpr (KIND == kOuter) {
            sm90::tma_load_2d(stage + 2 * P::kBoxBytes, &args.b_map, bar, kc * kBK, r0);
            sm90::tma_load_2d(stage + 3 * P::kBoxBytes, &args.b_map, bar, kc * kBK, c0);
          }
        }
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
  float d[64];   // the tile of C, or of ââᵀ
  float e[64];   // kOuter: the tile of b̂b̂ᵀ
#pragma unroll
  for (int r = 0; r < 64; ++r) d[r] = e[r] = 0.0f;

  uint32_t it = 0;
  for (int64_t t = blockIdx.x; t < args.tiles; t += gridDim.x) {
    const Tile tile = tile_of(t, args.tiles_a, args.tiles_b, args.symmetric);
    uint32_t prev_stage = 0;
    for (int kc = 0; kc < chunks; ++kc, ++it) {
      const Stage st = stage_of<kStages>(it);
      sm90::mbarrier_wait(&full[st.index], st.parity);
      sm90::wgmma_fence();
      const uint32_t stage = ring_addr + st.index * P::kStageBytes;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        const int acc = kc > 0 || ks > 0;
        if constexpr (KIND == kInner) {
          sm90::Wgmma<T>::run_tt(d, a_desc<KIND>(stage, consumer, ks, 0), b_desc<KIND>(stage, ks, 0), acc);
        } else {
          sm90::Wgmma<T>::run(d, a_desc<KIND>(stage, consumer, ks, 0), b_desc<KIND>(stage, ks, 0), acc);
          if constexpr (KIND == kOuter)
            sm90::Wgmma<T>::run(e, a_desc<KIND>(stage, consumer, ks, 1), b_desc<KIND>(stage, ks, 1), acc);
        }
      }
      sm90::wgmma_commit();
      if (kc > 0) {
        sm90::wgmma_wait<1>();
        if (tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);
      }
      prev_stage = st.index;
    }
    sm90::wgmma_wait<0>();
    if (tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);

    // Σ over this thread's entries inside the matrix: C² (one product) or G_a·G_b, weighted.
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < 64; ++r) {
      const float other = KIND == kOuter ? e[r] : d[r];
      sum = in_c(tile, consumer, tid, r, args.rows_bound, args.cols_bound) ? fmaf(d[r], other, sum) : sum;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) args.partials[(t * kConsumers + consumer) * kWarpsPerConsumer + warp] = tile.weight * sum;
  }
}

template <typename T, int KIND>
cudaError_t launch(const Args& args, int grid, cudaStream_t stream) {
  constexpr size_t kSmemBytes = Plan<KIND>::kBytes;
  auto kernel = sq_frobenius_sm90_kernel<T, KIND>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_kind(const Args& args, int kind, int grid, cudaStream_t stream) {
  switch (kind) {
    case kInner: return launch<T, kInner>(args, grid, stream);
    case kOuter: return launch<T, kOuter>(args, grid, stream);
    default: return launch<T, kOuterSame>(args, grid, stream);
  }
}

// The walk of a problem: (tile rows, tile columns, symmetric, tiles).
struct Walk {
  int64_t tiles_a, tiles_b;
  bool symmetric;
  int64_t tiles;
};
Walk walk_of(int64_t rows, int64_t a_cols, int64_t b_cols, bool same, bool outer) {
  Walk w{};
  w.tiles_a = ((outer ? rows : a_cols) + kBM - 1) / kBM;
  w.tiles_b = ((outer ? rows : b_cols) + kBN - 1) / kBN;
  w.symmetric = outer || same;
  w.tiles = w.symmetric ? w.tiles_a * (w.tiles_a + 1) / 2 : w.tiles_a * w.tiles_b;
  return w;
}

}  // namespace

bool sq_frobenius_sm90_supported(const Matrix& a, const Matrix& b, DType dtype, bool outer) {
  return dtype != DType::kFloat32 && a.rows == b.rows && a.cols >= 1 && b.cols >= 1 && (!outer || a.cols == b.cols) &&
         sm90::tma_readable(a) && sm90::tma_readable(b);
}

int64_t sq_frobenius_sm90_partials(int64_t rows, int64_t a_cols, int64_t b_cols, bool same, bool outer) {
  return kPartialsPerTile * walk_of(rows, a_cols, b_cols, same, outer).tiles;
}

cudaError_t sq_frobenius_sm90(const Matrix& a, const Matrix& b, bool same, bool outer, DType dtype, float* partials,
                              float* out, cudaStream_t stream) {
  if (!sq_frobenius_sm90_supported(a, b, dtype, outer) || (same && a.ptr != b.ptr)) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaMemsetAsync(out, 0, sizeof(float), stream);
  const Walk w = walk_of(a.rows, a.cols, b.cols, same, outer);
  const int kind = !outer ? kInner : (same ? kOuterSame : kOuter);
  Args args{};
  args.rows_bound = outer ? a.rows : a.cols;
  args.cols_bound = outer ? a.rows : b.cols;
  args.symmetric = w.symmetric;
  args.tiles = w.tiles;
  args.tiles_a = static_cast<int>(w.tiles_a);
  args.tiles_b = static_cast<int>(w.tiles_b);
  args.chunks = static_cast<int>(((outer ? a.cols : a.rows) + kBK - 1) / kBK);
  args.partials = partials;
  // inner: boxes of 64 columns x kBK rows of N; outer: kBK columns of K x 128 rows.
  const uint32_t box_rows = outer ? kBM : kBK;
  cudaError_t err = sm90::encode_map_2d(&args.a_map, a, dtype, kBoxCols, box_rows);
  if (err == cudaSuccess) err = sm90::encode_map_2d(&args.b_map, b, dtype, kBoxCols, box_rows);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int grid = static_cast<int>(w.tiles < sms ? w.tiles : sms);
  err = dtype == DType::kBFloat16 ? launch_kind<__nv_bfloat16>(args, kind, grid, stream)
                                  : launch_kind<__half>(args, kind, grid, stream);
  if (err != cudaSuccess) return err;
  return sum_partials(partials, kPartialsPerTile * w.tiles, out, stream);
}

}  // namespace fastssl
