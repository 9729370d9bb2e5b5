// Pairwise LogSumExp on Hopper (sm_90a): the forward and the backward (dx and dy), with TMA, an
// mbarrier pipeline and wgmma.
//
// Same contract as pairwise_lse.cu's kFwd, kRows and kCols roles and fastssl/kernels/torch/pairwise_lse.py
// (the oracle): lse_i over {s_i,p(i)} (include_pos) ∪ {s_ij : j ≠ p(i), j ≠ i if exclude_self}
// (y_negatives) ∪ {scale·x_i·bank_k}, pos_i = s_i,p(i), with s_ij = scale·x_i·y_j and
// p(i) = (i + pos_offset) mod Ny; with G_ij = grad_lse_i·exp(s_ij − lse_i) + grad_pos_i·[j = p(i)],
// dx_i = scale·(Σ_j G_ij y_j + Σ_k G_ik bank_k) and dy_j = scale·Σ_i G_ij x_i (the bank gets none).
// bf16/fp16 inputs whose rows TMA can read (row-contiguous, 16-byte aligned base and row stride) and
// D ≤ 512 (forward) or 256 (dx, dy); everything else runs pairwise_lse.cu.
//
// Structure (FlashAttention-3's, Shah et al. 2024):
//   * A CTA owns kBM = 128 rows of x and has three warpgroups. Warpgroup 0 is the producer: one
//     thread issues TMA copies. Warpgroups 1 and 2 are consumers, each owning 64 of the rows.
//   * The x tile (128 x D) is loaded once and stays resident, as D/64 chunks of 128 x 64 elements.
//   * The column tiles (kBN = 128 rows of y, then of the bank) stream through a ring of kStages
//     128 x 64 chunks; each chunk has a "full" barrier (TMA landed) and an "empty" one (both consumer
//     warpgroups finished reading it).
//   * Per column tile each consumer issues 4 wgmma m64n128k16 per chunk (operands straight from shared
//     memory through descriptors) and works on the accumulator registers. kFwd applies the masks and
//     the online max/sum (base 2) to tile t while tile t + 1's GEMM runs (two logit tiles, FA3's
//     intra-warpgroup overlap). kRows turns them into P = exp(s − lse) and issues dx_I += P·V_J with
//     P as wgmma's register A operand and V_J, this CTA's 128-wide slice of D of the column tile
//     (grid.y), MN-major from a second TMA ring; it issues tile t + 1's logits and P·V_t together and
//     computes tile t + 1's weights while P·V_t runs.
//   * kCols (dy) is kRows with the operands' parts swapped: a CTA owns 128 rows of y, streams tiles of
//     x, computes Sᵀ = Y_J X_Iᵀ directly and turns it into the column weights
//     W_ji = grad_lse_i/g_max·exp(s_ij − lse_i) (g_max = max|grad_lse|, a device scalar: fp16 keeps
//     them out of the subnormals; the accumulator is multiplied back), whose per-column statistics
//     each consumer warpgroup stages in shared memory per tile; dy_J += W·X_I as dx's second GEMM.
//   * The positive logit is the fp32 row dot of pairwise_lse.cu (the masks drop column p(i)), so both
//     kernels and the backward see the same number.
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "pairwise_tiles.cuh"  // mod_ny
#include "sm90_host.cuh"  // tma_readable, encode_map_2d
#include "sm90_utils.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "pairwise_lse_sm90.cu uses wgmma and TMA: compile it with -gencode=arch=compute_90a,code=sm_90a only"
#endif

namespace fastssl {
namespace {

using detail::from_float;
using tiles::mod_ny;
using detail::pack_floats;
using detail::to_float;
using detail::warp_rowdot;

// The roles of pairwise_lse.cu: kFwd (lse, pos); kRows (dx), kCols (dy) and kSym (dx and dy, x is y),
// each one slice of D per grid.y.
enum Kind : int { kFwd = 0, kRows = 1, kCols = 2, kSym = 3 };
// What a role streams and weighs: a second ring of slices (every backward role), row weights with the
// own rows' lse (dx), column weights with the streamed rows' lse (dy).
__host__ __device__ constexpr bool has_slices(int kind) { return kind != kFwd; }
__host__ __device__ constexpr bool row_weights(int kind) { return kind == kRows || kind == kSym; }
__host__ __device__ constexpr bool col_weights(int kind) { return kind == kCols || kind == kSym; }
// kSym holds two accumulators beside the logits: with 64 x 128 ones and the whole 64 x 128 logit tile
// ptxas spills (csrc/README.md has the numbers), so it accumulates a 64-wide slice of D and computes
// the logit tile as two 64-column halves (wgmma n64).
__host__ __device__ constexpr int slice_width(int kind) { return kind == kSym ? 64 : 128; }
__host__ __device__ constexpr int logit_width(int kind) { return kind == kSym ? 64 : 128; }

constexpr int kBM = 128;     // x rows per CTA (two consumer warpgroups of 64)
constexpr int kBN = 128;     // columns per tile (wgmma n128)
constexpr int kBK = 64;      // elements per chunk: one 128-byte swizzled row
constexpr int kStages = 4;   // column chunks in flight (the logit GEMM's B)
constexpr int kDV = 128;     // backward: the dx/dy slice, two chunks of the streamed tile (the second GEMM's B)
constexpr int kVStages = 2;  // backward: streamed-tile slices in flight
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
// The register file split (setmaxnreg): the producer's one thread needs few; the consumers hold a
// 64 x 128 fp32 tile (kRows, kCols: two) per warpgroup.
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= 64 * 1024, "register file");
constexpr uint32_t kChunkBytes = kBM * kBK * 2;  // x chunk and column chunk alike: 16 KiB
constexpr uint32_t kConsumerRowBytes = 64 * sm90::kSwizzleRowBytes;  // a consumer's 64 rows of a chunk
constexpr uint32_t kVStageBytes = (kDV / kBK) * kChunkBytes;
static_assert(kBM == kBN, "x chunks and column chunks share kChunkBytes and the TMA box");
// Column weights: per consumer warpgroup, two buffers (tile parity) of kBN entries each of the
// streamed rows' lse·log2(e), grad_lse/g_max and positive column (int32: TMA rows are < 2^31).
constexpr uint32_t kColStatsBytes = kBN * (2 * sizeof(float) + sizeof(int32_t));
// Where consumer warpgroup `consumer` stages tile `tile`'s column statistics, from the region's start
// (tests/csrc/test_sm90_layout.py runs the protocol this serves).
__host__ __device__ constexpr uint32_t col_stats_offset(int consumer, int tile) {
  return (2 * consumer + (tile & 1)) * kColStatsBytes;
}
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared memory of a role: the resident own tile (x; kCols: y; at most kMaxChunks chunks, so D ≤ kMaxD),
// the chunk ring, (backward) the slice ring, (kCols) the column statistics, then the barriers.
// kFwd: 128 + 64 KiB; kRows: 64 + 64 + 64 KiB; kCols: 64 + 64 + 64 + 3 KiB.
template <int KIND>
struct SmemPlan {
  static constexpr int kMaxChunks = KIND == kFwd ? 8 : 4;
  static constexpr int64_t kMaxD = int64_t{kMaxChunks} * kBK;
  static constexpr uint32_t kRingOffset = kMaxChunks * kChunkBytes;
  static constexpr uint32_t kSliceOffset = kRingOffset + kStages * kChunkBytes;
  static constexpr uint32_t kStatsOffset = kSliceOffset + (has_slices(KIND) ? kVStages * kVStageBytes : 0);
  static constexpr uint32_t kBarrierOffset = kStatsOffset + (col_weights(KIND) ? 2 * kConsumers * kColStatsBytes : 0);
  static constexpr int kBarriers = 1 + 2 * kStages + (has_slices(KIND) ? 2 * kVStages : 0);
  // With the slack that aligns the base to 1024 bytes.
  static constexpr size_t kBytes = sm90::kSwizzleAtomBytes + kBarrierOffset + kBarriers * sizeof(uint64_t);
};

struct Sm90Args {
  CUtensorMap x_map;  // boxes of kBK x kBM, 128-byte swizzle (64-byte aligned, passed __grid_constant__)
  CUtensorMap y_map;
  CUtensorMap bank_map;  // unused when the bank is empty
  PairwiseLseProblem p;  // raw operands for the positive row dot; flags; device scale
  PairwiseLseGrads g;    // backward roles
  float* lse_out;        // kFwd
  float* pos_out;
  double inv_ny;     // 1 / Ny, for mod_ny
  int chunks;        // ceil(D / kBK)
  int stream_tiles;  // tiles of the streamed operand in the LSE: y (kCols: x); 0 without y negatives
  int bank_tiles;    // column tiles of the bank (kFwd, kRows)
};

// Pipeline phases. The loads of a ring are numbered it = 0, 1, 2, ... in the one order producer and
// consumers both walk (column tile by column tile, chunk by chunk; the slice ring: tile by tile); load
// `it` uses stage it % S and is that stage's use number u = it / S. Each use completes exactly one
// phase of each of the stage's barriers: "full" when its one expect_tx arrival and the TMA bytes are
// in, "empty" when both consumer warpgroups arrived after their wgmma reading it retired. So consumers
// wait on full with parity u & 1. The producer, before use u, waits for empty's phase u − 1, i.e.
// parity (u & 1) ^ 1; for u = 0 that is the phase before a fresh barrier's first, which
// try_wait.parity reports complete. A barrier never runs two phases ahead of a waiter (the producer
// cannot refill a stage before both consumers released it; a consumer cannot release what it has not
// waited for), so a parity always names the intended phase, and every awaited phase has its arrivals
// issued by construction. The producer issues tile t's slice after tile t's chunks, the order in
// which consumers need them, so neither ring waits on a load that is queued behind it.
struct Stage {
  uint32_t index;
  uint32_t parity;
};
template <int S>
__host__ __device__ constexpr Stage stage_of(uint32_t it) { return {it % S, (it / S) & 1u}; }

__device__ __forceinline__ float lse2_of(float lse) {
  // As pairwise_lse.cu: a row without any column has lse = -inf; exp(s − lse) must then be 0, not NaN.
  return lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e;
}

template <typename T, int KIND>
__global__ void __launch_bounds__(kThreads, 1) pairwise_lse_sm90_kernel(const __grid_constant__ Sm90Args args) {
  using Plan = SmemPlan<KIND>;
  extern __shared__ unsigned char smem_raw[];
  // TMA's 128-byte swizzle and the descriptors (base offset 0) need 1024-byte aligned tiles.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + sm90::kSwizzleAtomBytes - 1) & ~uintptr_t(sm90::kSwizzleAtomBytes - 1));
  unsigned char* x_tile = smem;  // the own tile (kCols: y rows), args.chunks x kChunkBytes
  unsigned char* ring = smem + Plan::kRingOffset;
  unsigned char* slices = smem + Plan::kSliceOffset;
  unsigned char* col_stats = smem + Plan::kStatsOffset;  // kCols
  uint64_t* x_full = reinterpret_cast<uint64_t*>(smem + Plan::kBarrierOffset);
  uint64_t* full = x_full + 1;
  uint64_t* empty = full + kStages;
  uint64_t* slice_full = empty + kStages;  // backward roles
  uint64_t* slice_empty = slice_full + kVStages;

  const PairwiseLseProblem& p = args.p;
  const int chunks = args.chunks;
  const int tiles = args.stream_tiles + args.bank_tiles;
  // kCols owns y rows and streams x; kSym's y is x.
  const CUtensorMap* own_map = KIND == kCols ? &args.y_map : &args.x_map;
  const CUtensorMap* stream_map = KIND == kCols ? &args.x_map : &args.y_map;
  const int warpgroup = threadIdx.x / 128;
  constexpr int DV = slice_width(KIND);
  constexpr int kAcc = DV / 2;  // accumulator registers of a 64 x DV tile
  constexpr int NS = logit_width(KIND);
  constexpr int kPasses = kBN / NS;
  const int64_t block_row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int32_t dv0 = static_cast<int32_t>(blockIdx.y) * DV;  // backward: this CTA's slice of D

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(x_full, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], kConsumers);
    }
    if constexpr (has_slices(KIND)) {
      for (int s = 0; s < kVStages; ++s) {
        sm90::mbarrier_init(&slice_full[s], 1);
        sm90::mbarrier_init(&slice_empty[s], kConsumers);
      }
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier: the producer warpgroup leaves after its loop

  if (warpgroup == 0) {
    // Producer: the resident own tile, then per streamed tile its chunks (and, backward, its slice).
    sm90::setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x != 0 || tiles == 0) return;
    sm90::prefetch_tensor_map(own_map);
    sm90::prefetch_tensor_map(stream_map);
    sm90::mbarrier_arrive_expect_tx(x_full, chunks * kChunkBytes);
    for (int kc = 0; kc < chunks; ++kc)
      sm90::tma_load_2d(x_tile + kc * kChunkBytes, own_map, x_full, kc * kBK, static_cast<int32_t>(block_row0));
    uint32_t it = 0;
    for (int tile = 0; tile < tiles; ++tile) {
      const bool is_bank = tile >= args.stream_tiles;
      const CUtensorMap* map = is_bank ? &args.bank_map : stream_map;
      const int32_t c0 = (is_bank ? tile - args.stream_tiles : tile) * kBN;
      for (int kc = 0; kc < chunks; ++kc, ++it) {
        const Stage st = stage_of<kStages>(it);
        sm90::mbarrier_wait(&empty[st.index], st.parity ^ 1u);
        sm90::mbarrier_arrive_expect_tx(&full[st.index], kChunkBytes);
        sm90::tma_load_2d(ring + st.index * kChunkBytes, map, &full[st.index], kc * kBK, c0);
      }
      if constexpr (has_slices(KIND)) {
        // The slice [dv0, dv0 + DV) of the same streamed tile, as chunks (zeros past D). A chunk wholly
        // past D is not loaded: it only feeds dx/dy columns that are never stored.
        const int64_t chunks_left = (p.x.cols - dv0 + kBK - 1) / kBK;  // dv0 < D: at least 1
        const int slice_chunks = chunks_left < DV / kBK ? static_cast<int>(chunks_left) : DV / kBK;
        const Stage st = stage_of<kVStages>(tile);
        sm90::mbarrier_wait(&slice_empty[st.index], st.parity ^ 1u);
        sm90::mbarrier_arrive_expect_tx(&slice_full[st.index], slice_chunks * kChunkBytes);
        for (int h = 0; h < slice_chunks; ++h)
          sm90::tma_load_2d(slices + st.index * kVStageBytes + h * kChunkBytes, map, &slice_full[st.index],
                            dv0 + h * kBK, c0);
      }
    }
    return;
  }

  // Consumers. Both warpgroups walk every chunk (the empty barriers count both), even when all their
  // rows are past M.
  sm90::setmaxnreg_inc<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4;
  const int64_t M = p.x.rows, NY = p.y.rows, D = p.x.cols;
  const int64_t own_rows = KIND == kCols ? NY : M;
  const int64_t row0 = block_row0 + 64 * consumer;  // this warpgroup's first (own) row
  const float scale = *p.scale;
  const float qk = scale * kLog2e;

  // The two own rows of this thread (fragment registers 0-1 and 2-3 of every 8-column block).
  int64_t row[2], pcol[2];
  float row_lse2[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = row0 + sm90::acc_row(tid, 2 * h);
    pcol[h] = KIND != kCols && row[h] < M ? mod_ny(row[h] + p.pos_offset, NY, args.inv_ny) : -1;
    if constexpr (row_weights(KIND)) row_lse2[h] = row[h] < M ? lse2_of(args.g.lse[row[h]]) : 0.0f;
  }
  float g_inv = 0.0f;  // column weights: 1 / max|grad_lse|
  if constexpr (col_weights(KIND)) {
    const float g_max = *args.g.grad_lse_absmax;
    g_inv = g_max > 0.0f ? 1.0f / g_max : 0.0f;
  }
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.0f, 0.0f};  // kFwd
  float acc[has_slices(KIND) ? kAcc : 1];  // the slice of dx (kRows, kSym) or dy (kCols)
  float acc2[KIND == kSym ? kAcc : 1];     // kSym: the slice of dy
#pragma unroll
  for (int r = 0; r < (has_slices(KIND) ? kAcc : 1); ++r) acc[r] = 0.0f;
#pragma unroll
  for (int r = 0; r < (KIND == kSym ? kAcc : 1); ++r) acc2[r] = 0.0f;

  if (tiles > 0) sm90::mbarrier_wait(x_full, 0);
  const uint32_t x_addr = sm90::smem_u32(x_tile) + consumer * kConsumerRowBytes;
  const uint32_t ring_addr = sm90::smem_u32(ring);
  // Tile t's logits into `acc` (64 x 128: the forward, dx and dy), one wgmma group per chunk, without
  // waiting. Chunk kc ≥ kStages needs the stage of chunk kc − kStages, whose group has retired once at
  // most kStages − 1 groups are in flight (only tile t's are, when it is called); chunks ≤ kStages
  // (D ≤ 256, every backward) never waits here.
  auto issue = [&](float (&acc)[kBN / 2], int tile) {
    const uint32_t it0 = static_cast<uint32_t>(tile) * chunks;
    auto chunk = [&](int kc) {
      const Stage st = stage_of<kStages>(it0 + kc);
      sm90::mbarrier_wait(&full[st.index], st.parity);
      sm90::wgmma_fence();
      const uint32_t a = x_addr + kc * kChunkBytes;
      const uint32_t b = ring_addr + st.index * kChunkBytes;
      if (kc == 0) sm90::Wgmma<T>::first(acc, sm90::sw128_desc(a), sm90::sw128_desc(b));
#pragma unroll
      for (int ks = kc == 0 ? 1 : 0; ks < kBK / 16; ++ks)
        sm90::Wgmma<T>::run(acc, sm90::sw128_desc(a + ks * sm90::kKStepBytes),
                            sm90::sw128_desc(b + ks * sm90::kKStepBytes), 1);
      sm90::wgmma_commit();
    };
    // Chunk 0 outside the loop: on every path a wgmma defines `acc` before it is in flight (a merge
    // with the path of no chunk makes ptxas serialise the wgmma, C7515).
    chunk(0);
    for (int kc = 1; kc < chunks; ++kc) {
      if (kc >= kStages) {
        sm90::wgmma_wait<kStages - 1>();
        if (tid == 0) sm90::mbarrier_arrive(&empty[stage_of<kStages>(it0 + kc - kStages).index]);
      }
      chunk(kc);
    }
  };
  if constexpr (KIND == kFwd) {
    // FlashAttention-3's intra-warpgroup overlap (Shah et al. 2024, section 3.2): two logit tiles in
    // registers, so tile t + 1's GEMM runs on the tensor cores while the masks and the online max/sum
    // (the exp2s) of tile t run beside it. One wgmma group per chunk; a stage is released only after
    // wait_group has retired the group that reads it.
    float sa[kBN / 2], sb[kBN / 2];  // first written by a tile's first wgmma (Wgmma::first)
    // Waits for tile t's groups (the only ones in flight) and releases the stages it still holds.
    auto retire = [&](int tile) {
      sm90::computed_here(m_run);  // tile t − 1's softmax before the wait, in the GEMM's shadow
      sm90::computed_here(l_run);
      sm90::wgmma_wait<0>();
      if (tid == 0) {
        const uint32_t it0 = static_cast<uint32_t>(tile) * chunks;
        for (int kc = chunks > kStages ? chunks - kStages : 0; kc < chunks; ++kc)
          sm90::mbarrier_arrive(&empty[stage_of<kStages>(it0 + kc).index]);
      }
    };
    // Masked logits in log2 units, then the online max/sum of each row (4 lanes share a row).
    auto online_lse = [&](float (&s)[kBN / 2], int tile) {
      const bool is_bank = tile >= args.stream_tiles;
      const int64_t c0 = static_cast<int64_t>(is_bank ? tile - args.stream_tiles : tile) * kBN;
      const int64_t n_cols = is_bank ? p.bank.rows : NY;
      // Which logits enter row h's LSE: the masks of pairwise_lse.cu, at each register's (row, column),
      // as int32 tile-local columns (registers: the 64-bit compares would not fit beside two tiles).
      int limit[2], pos_col[2], self_col[2];  // columns < limit; not pos_col, not self_col (−1: none)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t left = n_cols - c0, pl = pcol[h] - c0, sl = row[h] - c0;
        limit[h] = row[h] < M ? static_cast<int>(left < kBN ? left : kBN) : 0;
        pos_col[h] = !is_bank && pl >= 0 && pl < kBN ? static_cast<int>(pl) : -1;
        self_col[h] = !is_bank && p.exclude_self && sl >= 0 && sl < kBN ? static_cast<int>(sl) : -1;
      }
      auto in_lse = [&](int h, int r) {
        const int col = sm90::acc_col(tid, r);
        return (col < limit[h]) & (col != pos_col[h]) & (col != self_col[h]);
      };
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -CUDART_INF_F;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = 4 * j + 2 * h + e;
            s[r] = in_lse(h, r) ? s[r] * qk : -CUDART_INF_F;
            mx = fmaxf(mx, s[r]);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[h], mx);
        const float m_use = m_new == -CUDART_INF_F ? 0.0f : m_new;
        float sum = l_run[h] * exp2f(m_run[h] - m_use);
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) sum += exp2f(s[4 * j + 2 * h + e] - m_use);
        l_run[h] = sum;
        m_run[h] = m_new;
      }
    };
    // Tile t's logits are in `sa` or `sb` once its groups retire; then tile t + 1's GEMM goes into the
    // other one and tile t's softmax runs while it does. The loop is unrolled by two so the accumulators
    // swap roles under compile-time register names, and every path that leaves a GEMM in flight defines
    // its accumulator by wgmma alone (a copy or a merge of an in-flight accumulator makes ptxas
    // serialise the wgmma, C7515).
    // The "last tile" test comes before each wait: a branch between a softmax and the next wait keeps
    // ptxas from scheduling the wait into the softmax (it did, in one basic block).
    int tile = 0;
    if (tiles > 0) {
      issue(sa, 0);
      retire(0);
      while (tile + 1 < tiles) {
        issue(sb, tile + 1);
        online_lse(sa, tile);
        ++tile;
        if (tile + 1 == tiles) {
          retire(tile);
#pragma unroll
          for (int r = 0; r < kBN / 2; ++r) sa[r] = sb[r];  // nothing in flight
          break;
        }
        retire(tile);
        issue(sa, tile + 1);
        online_lse(sb, tile);
        ++tile;
        if (tile + 1 == tiles) {
          retire(tile);
          break;
        }
        retire(tile);
      }
      online_lse(sa, tile);
    }
  } else {
    float s[NS / 2];
#pragma unroll
    for (int r = 0; r < NS / 2; ++r) s[r] = 0.0f;

    // Column weights: thread tid stages the statistics of streamed row (an x row) c0 + tid in this
    // warpgroup's buffer of the tile's parity; the named barrier after the logit GEMM publishes them.
    // Two buffers make one barrier per tile enough: a thread writes tile t + 2's (= t's) buffer only
    // after the barrier of tile t + 1, which every thread of the warpgroup reaches after its reads of t
    // (dx and dy write tile t + 1's after their reads of t, which follow the barrier of t).
    auto stats_of = [&](int tile) { return reinterpret_cast<float*>(col_stats + col_stats_offset(consumer, tile)); };
    auto stage_col_stats = [&](int tile) {
      if constexpr (col_weights(KIND)) {
        const int64_t c = static_cast<int64_t>(tile) * kBN + tid;  // no bank with column weights
        const bool in = c < M;
        float* lse2 = stats_of(tile);
        lse2[tid] = in ? lse2_of(args.g.lse[c]) : CUDART_INF_F;
        lse2[kBN + tid] = in ? args.g.grad_lse[c] * g_inv : 0.0f;
        reinterpret_cast<int32_t*>(lse2 + 2 * kBN)[tid] =
            in ? static_cast<int32_t>(mod_ny(c + p.pos_offset, NY, args.inv_ny)) : -1;
      }
    };
    // A column tile: its first column, its operand's rows, and (column weights) its statistics.
    struct Cols {
      int64_t c0, n_cols;
      bool is_bank;
      const float* lse2;
      const float* g;
      const int32_t* pos;
    };
    auto cols_of = [&](int tile) {
      Cols t;
      t.is_bank = tile >= args.stream_tiles;
      t.c0 = static_cast<int64_t>(t.is_bank ? tile - args.stream_tiles : tile) * kBN;
      t.n_cols = t.is_bank ? p.bank.rows : NY;  // kSym: NY = M
      t.lse2 = stats_of(tile);
      t.g = t.lse2 + kBN;
      t.pos = reinterpret_cast<const int32_t*>(t.g + kBN);
      return t;
    };
    // Which logits enter row h's LSE: the masks of pairwise_lse.cu, at each register's (row, column);
    // cbase: the tile column of the register's block (kSym's second pass: 64).
    auto in_lse = [&](const Cols& t, int cbase, int h, int r) {
      const int64_t col = t.c0 + cbase + sm90::acc_col(tid, r);
      bool ok = row[h] < M && col < t.n_cols;
      if (!t.is_bank) ok = ok && col != pcol[h] && !(p.exclude_self && col == row[h]);
      return ok;
    };
    // Row weights P_ij = exp(s_ij − lse_i) (kRows, kSym; grad_lse_i is a row scale in the epilogue),
    // of the logit sr in register r. Computed unconditionally, then selected: no divergent path near
    // the wgmma.
    auto row_weight = [&](const Cols& t, int cbase, float sr, int r) {
      const int h = (r >> 1) & 1;
      const float w = exp2f(sr * qk - row_lse2[h]);
      return in_lse(t, cbase, h, r) ? w : 0.0f;
    };
    // Column weights (kCols, kSym). Own row o = row[h], streamed row c: the logit is s_co (x_c is the
    // row of G, o its column), so G_co/g_max = grad_lse_c/g_max·exp(s_co − lse_c) unless o is c's
    // positive or (self) c itself, as pairwise_lse.cu's kCols (kSym: its column statistics).
    auto col_weight = [&](const Cols& t, int cbase, float sr, int r) {
      const int h = (r >> 1) & 1;
      const int cl = cbase + sm90::acc_col(tid, r);
      const int64_t col = t.c0 + cl;
      const float w = t.g[cl] * exp2f(sr * qk - t.lse2[cl]);
      const bool ok = row[h] < own_rows && col < M && row[h] != t.pos[cl] && !(p.exclude_self && col == row[h]);
      return ok ? w : 0.0f;
    };

    if constexpr (KIND == kRows || KIND == kCols) {
      // dx and dy overlap as FlashAttention-3's forward does (Shah et al. 2024, section 3.2): the
      // logits of tile t + 1 are issued, then P·V_t (dx_I += P·V_J, or dy_J += W·X_I, with the weights
      // as wgmma's register A operand and the slice V_J of the streamed tile MN-major from shared
      // memory), and the weights of tile t + 1 are computed (in place, fp32) while P·V_t runs. P·V_t's
      // A registers and slice stage are reused only after the wait that retires it; a tile's chunks
      // (≤ kStages) are released after the wait that retires its logits.
      static_assert(SmemPlan<KIND>::kMaxChunks <= kStages, "a tile's chunks fit the ring");
      auto release_chunks = [&](int tile) {
        if (tid == 0)
          for (int kc = 0; kc < chunks; ++kc)
            sm90::mbarrier_arrive(&empty[stage_of<kStages>(static_cast<uint32_t>(tile) * chunks + kc).index]);
      };
      auto weigh = [&](int tile) {
        const Cols t = cols_of(tile);
        if constexpr (col_weights(KIND)) sm90::named_barrier_sync(1 + consumer, 128);
#pragma unroll
        for (int r = 0; r < NS / 2; ++r) s[r] = KIND == kCols ? col_weight(t, 0, s[r], r) : row_weight(t, 0, s[r], r);
      };
      uint32_t pa[NS / 16][4];
      auto issue_pv = [&](int tile) {
        const Stage vs = stage_of<kVStages>(tile);
        sm90::mbarrier_wait(&slice_full[vs.index], vs.parity);
        sm90::wgmma_fence();
        const uint32_t v = sm90::smem_u32(slices) + vs.index * kVStageBytes;
#pragma unroll
        for (int kk = 0; kk < NS / 16; ++kk)
          sm90::Wgmma<T>::run_rs(acc, pa[kk], sm90::sw128_mn_desc(v + kk * 16 * sm90::kSwizzleRowBytes, kChunkBytes),
                                 1);
        sm90::wgmma_commit();
      };
      if (tiles > 0) {
        stage_col_stats(0);
        issue(s, 0);
        sm90::wgmma_wait<0>();
        release_chunks(0);
        weigh(0);
        for (int tile = 0;; ++tile) {
          // Tile t's weights are in s; P·V_{t−1} may run. The wait heads the loop body: a branch (the
          // back edge) between the weights and the wait keeps ptxas from scheduling it into them.
          sm90::wgmma_wait<0>();
          if (tile > 0 && tid == 0) sm90::mbarrier_arrive(&slice_empty[stage_of<kVStages>(tile - 1).index]);
          // The weights, rounded, into the A fragments (all written before the fences that follow).
#pragma unroll
          for (int kk = 0; kk < NS / 16; ++kk)
#pragma unroll
            for (int q = 0; q < 4; ++q)
              pa[kk][q] = pack_floats<T>(s[sm90::acc_reg_of_a(kk, q, 0)], s[sm90::acc_reg_of_a(kk, q, 1)]);
          if (tile + 1 == tiles) break;
          stage_col_stats(tile + 1);
          issue(s, tile + 1);
          issue_pv(tile);
          sm90::wgmma_wait<1>();  // tile t + 1's logits retire; P·V_t runs on
          release_chunks(tile + 1);
          weigh(tile + 1);
        }
        issue_pv(tiles - 1);
        sm90::wgmma_wait<0>();
        if (tid == 0) sm90::mbarrier_arrive(&slice_empty[stage_of<kVStages>(tiles - 1).index]);
      }
    } else {
      // kSym: the serial order (the overlap above is not written for its two passes per tile).
      uint32_t it = 0;
      for (int tile = 0; tile < tiles; ++tile) {
        const Cols tc = cols_of(tile);
        stage_col_stats(tile);

        // kSym walks the tile in kPasses = 2 halves of NS = 64 columns (its registers: two accumulators
        // beside the logits), each over all chunks: the chunks stay in the ring until the last pass has
        // read them (chunks ≤ kStages, so the producer never waits on a stage this tile still holds).
        const Stage slice_st = stage_of<kVStages>(tile);
        for (int pass = 0; pass < kPasses; ++pass) {
          const bool last = pass == kPasses - 1;
          // S = X_I · C_Jᵀ over the chunks; chunk kc's stage is released once the wgmma group of chunk
          // kc + 1 is issued and kc's has retired (wait_group 1), so the tensor cores never idle on a release.
          uint32_t prev_stage = 0;
          for (int kc = 0; kc < chunks; ++kc) {
            const Stage st = stage_of<kStages>(it + kc);
            if (pass == 0) sm90::mbarrier_wait(&full[st.index], st.parity);
            sm90::wgmma_fence();
            const uint32_t a = x_addr + kc * kChunkBytes;
            const uint32_t b = ring_addr + st.index * kChunkBytes + pass * NS * sm90::kSwizzleRowBytes;
#pragma unroll
            for (int ks = 0; ks < kBK / 16; ++ks)
              sm90::Wgmma<T>::run(s, sm90::sw128_desc(a + ks * sm90::kKStepBytes),
                                  sm90::sw128_desc(b + ks * sm90::kKStepBytes), kc > 0 || ks > 0);
            sm90::wgmma_commit();
            if (kc > 0) {
              sm90::wgmma_wait<1>();
              if (last && tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);
            }
            prev_stage = st.index;
          }
          sm90::wgmma_wait<0>();
          if (last && tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);
          if (col_weights(KIND) && pass == 0) sm90::named_barrier_sync(1 + consumer, 128);
          const int cbase = pass * NS;  // this pass's first column of the tile

          // Row weights (dx) and column weights (dy), then acc += W_r · V_J and acc2 += W_c · V_J: two
          // GEMMs on the same slice.
          if (pass == 0) sm90::mbarrier_wait(&slice_full[slice_st.index], slice_st.parity);
          uint32_t pa[NS / 16][4];
          uint32_t pb[NS / 16][4];  // the column weights
#pragma unroll
          for (int kk = 0; kk < NS / 16; ++kk)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const int r0 = sm90::acc_reg_of_a(kk, q, 0), r1 = sm90::acc_reg_of_a(kk, q, 1);
              pa[kk][q] = pack_floats<T>(row_weight(tc, cbase, s[r0], r0), row_weight(tc, cbase, s[r1], r1));
              pb[kk][q] = pack_floats<T>(col_weight(tc, cbase, s[r0], r0), col_weight(tc, cbase, s[r1], r1));
            }
          sm90::wgmma_fence();
          // k = the pass's 16-row groups of the streamed tile (2 groups of 8 rows of 128 bytes each); the
          // slice's chunks are its 64-wide blocks of N.
          const uint32_t v = sm90::smem_u32(slices) + slice_st.index * kVStageBytes + cbase * sm90::kSwizzleRowBytes;
#pragma unroll
          for (int kk = 0; kk < NS / 16; ++kk)
            sm90::Wgmma<T>::run_rs(acc, pa[kk], sm90::sw128_mn_desc(v + kk * 16 * sm90::kSwizzleRowBytes, kChunkBytes),
                                   1);
#pragma unroll
          for (int kk = 0; kk < NS / 16; ++kk)
            sm90::Wgmma<T>::run_rs(acc2, pb[kk], sm90::sw128_mn_desc(v + kk * 16 * sm90::kSwizzleRowBytes, kChunkBytes),
                                   1);
          sm90::wgmma_commit();
          sm90::wgmma_wait<0>();
          if (last && tid == 0) sm90::mbarrier_arrive(&slice_empty[slice_st.index]);
        }
        it += chunks;
      }
    }
  }

  if constexpr (KIND == kFwd) {
    // Epilogue: the row sums of the 4 lanes of a row, the positive as an fp32 row dot, lse and pos.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    float pos_raw[2] = {0.0f, 0.0f};
    for (int rr = 0; rr < 16; ++rr) {
      const int64_t i = row0 + 16 * warp + rr;
      if (i >= M) break;  // warp-uniform
      const float v = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                     mod_ny(i + p.pos_offset, NY, args.inv_ny), D, lane);
      if (rr == g) pos_raw[0] = v;
      if (rr == g + 8) pos_raw[1] = v;
    }
    if (lane % 4 == 0) {
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
  }
  if constexpr (row_weights(KIND)) {
    // Epilogue, as pairwise_lse.cu's kRows: dx_i = scale·(grad_lse_i·acc_i + coef_i·y_p(i)),
    // coef_i = grad_pos_i + grad_lse_i·P_i,p(i) (the positive is not in the tiles).
    float coef[2] = {0.0f, 0.0f}, gl[2] = {0.0f, 0.0f};
    for (int rr = 0; rr < 16; ++rr) {
      const int64_t i = row0 + 16 * warp + rr;
      if (i >= M) break;  // warp-uniform
      float c = args.g.grad_pos[i];
      if (p.include_pos) {
        const float pr = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                        mod_ny(i + p.pos_offset, NY, args.inv_ny), D, lane);
        c += args.g.grad_lse[i] * exp2f(pr * qk - lse2_of(args.g.lse[i]));
      }
      if (rr == g) { coef[0] = c; gl[0] = args.g.grad_lse[i]; }
      if (rr == g + 8) { coef[1] = c; gl[1] = args.g.grad_lse[i]; }
    }
    const T* y = static_cast<const T*>(p.y.ptr);
    T* dx = static_cast<T*>(args.g.dx);
#pragma unroll
    for (int r = 0; r < kAcc; ++r) {
      const int h = (r >> 1) & 1;
      const int64_t col = dv0 + sm90::acc_col(tid, r);
      if (row[h] >= M || col >= D) continue;
      const float yp = to_float(y[pcol[h] * p.y.stride_r + col * p.y.stride_c]);
      dx[row[h] * D + col] = from_float<T>(scale * (gl[h] * acc[r] + coef[h] * yp));
    }
  }
  if constexpr (col_weights(KIND)) {
    // Epilogue, as pairwise_lse.cu's kCols: dy_j = scale·(g_max·acc_j + Σ_{i : p(i) = j} coef_i·x_i),
    // i = ((j − pos_offset) mod Ny) + w·Ny < M, coef_i = grad_pos_i + grad_lse_i·P_i,j (kSym: acc2, and
    // the own rows j are x rows, Ny = M).
    const float g_max = *args.g.grad_lse_absmax;
    auto dy_epilogue = [&](float (&cacc)[kAcc]) {
#pragma unroll
      for (int r = 0; r < kAcc; ++r) cacc[r] *= g_max;
      const T* x = static_cast<const T*>(p.x.ptr);
      for (int64_t wrap = 0; wrap < M; wrap += NY) {
        float coef[2] = {0.0f, 0.0f};
        int64_t prow[2] = {-1, -1};
        for (int rr = 0; rr < 16; ++rr) {
          const int64_t j = row0 + 16 * warp + rr;
          if (j >= NY) break;  // warp-uniform
          const int64_t i = mod_ny(j + NY - p.pos_offset, NY, args.inv_ny) + wrap;
          if (i >= M) continue;  // warp-uniform
          float c = args.g.grad_pos[i];
          if (p.include_pos) {
            const float pr = warp_rowdot<T>(p.x.ptr, p.x.stride_r, p.x.stride_c, i, p.y.ptr, p.y.stride_r, p.y.stride_c,
                                            j, D, lane);
            c += args.g.grad_lse[i] * exp2f(pr * qk - lse2_of(args.g.lse[i]));
          }
          if (rr == g) { coef[0] = c; prow[0] = i; }
          if (rr == g + 8) { coef[1] = c; prow[1] = i; }
        }
#pragma unroll
        for (int r = 0; r < kAcc; ++r) {
          const int h = (r >> 1) & 1;
          const int64_t col = dv0 + sm90::acc_col(tid, r);
          if (prow[h] < 0 || col >= D) continue;
          cacc[r] += coef[h] * to_float(x[prow[h] * p.x.stride_r + col * p.x.stride_c]);
        }
      }
      T* dy = static_cast<T*>(args.g.dy);
#pragma unroll
      for (int r = 0; r < kAcc; ++r) {
        const int h = (r >> 1) & 1;
        const int64_t col = dv0 + sm90::acc_col(tid, r);
        if (row[h] >= NY || col >= D) continue;
        dy[row[h] * D + col] = from_float<T>(scale * cacc[r]);
      }
    };
    if constexpr (KIND == kSym) {
      dy_epilogue(acc2);
    } else {
      dy_epilogue(acc);
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------

template <typename T, int KIND>
cudaError_t launch(const Sm90Args& args, int64_t blocks, int64_t slices, cudaStream_t stream) {
  constexpr size_t kSmemBytes = SmemPlan<KIND>::kBytes;
  auto kernel = pairwise_lse_sm90_kernel<T, KIND>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(slices)), kThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <int KIND>
bool supported(const PairwiseLseProblem& p, DType dtype) {
  // dy never reads the bank. kSym: y is x (the same pointer, shape and strides), all of it in the LSE,
  // no bank, as pairwise_lse.cu's kSym; its passes hold a tile's chunks at once (≤ kStages).
  const bool same = p.x.ptr == p.y.ptr && p.x.rows == p.y.rows && p.x.cols == p.y.cols &&
                    p.x.stride_r == p.y.stride_r && p.x.stride_c == p.y.stride_c;
  static_assert(KIND != kSym || SmemPlan<KIND>::kMaxChunks <= kStages, "kSym's passes hold every chunk of a tile");
  return dtype != DType::kFloat32 && p.x.cols >= 1 && p.x.cols <= SmemPlan<KIND>::kMaxD &&
         sm90::tma_readable(p.x) && sm90::tma_readable(p.y) &&
         (KIND == kCols || p.bank.rows == 0 || sm90::tma_readable(p.bank)) &&
         (KIND != kSym || (same && p.bank.rows == 0 && p.y_negatives));
}

// The tensor maps and tile counts of a problem, then the launch over ceil(M / kBM) x slices CTAs.
template <int KIND>
cudaError_t run(Sm90Args a, DType dtype, cudaStream_t stream) {
  const PairwiseLseProblem& p = a.p;
  if (!supported<KIND>(p, dtype)) return cudaErrorInvalidValue;
  // kCols owns the y rows and streams x (no bank); the others own x and stream y (kSym: x), then the bank.
  const int64_t own_rows = KIND == kCols ? p.y.rows : p.x.rows;
  const int64_t streamed = KIND == kCols ? p.x.rows : p.y.rows;
  const bool with_bank = !col_weights(KIND) && p.bank.rows > 0;
  const int64_t blocks = (own_rows + kBM - 1) / kBM;
  const int64_t slices = KIND == kFwd ? 1 : (p.x.cols + slice_width(KIND) - 1) / slice_width(KIND);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  a.inv_ny = 1.0 / static_cast<double>(p.y.rows > 0 ? p.y.rows : 1);
  a.chunks = static_cast<int>((p.x.cols + kBK - 1) / kBK);
  a.stream_tiles = p.y_negatives ? static_cast<int>((streamed + kBN - 1) / kBN) : 0;
  a.bank_tiles = with_bank ? static_cast<int>((p.bank.rows + kBN - 1) / kBN) : 0;
  cudaError_t err = sm90::encode_map_2d(&a.x_map, p.x, dtype, kBK, kBM);
  if (err == cudaSuccess) err = sm90::encode_map_2d(&a.y_map, p.y, dtype, kBK, kBM);
  if (err == cudaSuccess && with_bank) err = sm90::encode_map_2d(&a.bank_map, p.bank, dtype, kBK, kBM);
  if (err != cudaSuccess) return err;
  return dtype == DType::kBFloat16 ? launch<__nv_bfloat16, KIND>(a, blocks, slices, stream)
                                   : launch<__half, KIND>(a, blocks, slices, stream);
}

}  // namespace

bool pairwise_lse_sm90_supported(const PairwiseLseProblem& p, DType dtype) { return supported<kFwd>(p, dtype); }

bool pairwise_lse_rows_sm90_supported(const PairwiseLseProblem& p, DType dtype) { return supported<kRows>(p, dtype); }

bool pairwise_lse_cols_sm90_supported(const PairwiseLseProblem& p, DType dtype) { return supported<kCols>(p, dtype); }

bool pairwise_lse_sym_sm90_supported(const PairwiseLseProblem& p, DType dtype) { return supported<kSym>(p, dtype); }

cudaError_t pairwise_lse_forward_sm90(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                      cudaStream_t stream) {
  Sm90Args a{};
  a.p = p;
  a.lse_out = lse;
  a.pos_out = pos;
  return run<kFwd>(a, dtype, stream);
}

cudaError_t pairwise_lse_backward_rows_sm90(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                            cudaStream_t stream) {
  Sm90Args a{};
  a.p = p;
  a.g = g;
  return run<kRows>(a, dtype, stream);
}

cudaError_t pairwise_lse_backward_cols_sm90(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                            cudaStream_t stream) {
  Sm90Args a{};
  a.p = p;
  a.g = g;
  return run<kCols>(a, dtype, stream);
}

cudaError_t pairwise_lse_backward_sym_sm90(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                           cudaStream_t stream) {
  Sm90Args a{};
  a.p = p;
  a.g = g;
  return run<kSym>(a, dtype, stream);
}

}  // namespace fastssl
