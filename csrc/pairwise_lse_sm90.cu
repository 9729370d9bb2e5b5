// Pairwise LogSumExp forward for Hopper (sm_90a): TMA, an mbarrier pipeline and wgmma.
//
// Same contract as pairwise_lse.cu's kFwd role and fastssl/kernels/torch/pairwise_lse.py (the
// oracle): lse_i over {s_i,p(i)} (include_pos) ∪ {s_ij : j ≠ p(i), j ≠ i if exclude_self}
// (y_negatives) ∪ {scale·x_i·bank_k}, pos_i = s_i,p(i), with s_ij = scale·x_i·y_j and
// p(i) = (i + pos_offset) mod Ny. bf16/fp16 inputs whose rows TMA can read (row-contiguous,
// 16-byte aligned base and row stride) and D ≤ kMaxD; everything else runs pairwise_lse.cu.
//
// Structure (FlashAttention-3's, Shah et al. 2024, forward only):
//   * A CTA owns kBM = 128 rows of x and has three warpgroups. Warpgroup 0 is the producer: one
//     thread issues TMA copies. Warpgroups 1 and 2 are consumers, each owning 64 of the rows.
//   * The x tile (128 x D) is loaded once and stays resident, as D/64 chunks of 128 x 64 elements.
//   * The column tiles (kBN = 128 rows of y, then of the bank) stream through a ring of kStages
//     128 x 64 chunks; each chunk has a "full" barrier (TMA landed) and an "empty" one (both consumer
//     warpgroups finished reading it).
//   * Per column tile each consumer issues 4 wgmma m64n128k16 per chunk (operands straight from shared
//     memory through descriptors), keeps one wgmma group in flight while releasing the previous chunk,
//     then applies the masks and the online max/sum (base 2) on the accumulator registers.
//   * The positive logit is the fp32 row dot of pairwise_lse.cu (the masks drop column p(i)), so both
//     kernels and the backward see the same number.
#include <math_constants.h>

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "sm90_utils.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "pairwise_lse_sm90.cu uses wgmma and TMA: compile it with -gencode=arch=compute_90a,code=sm_90a only"
#endif

namespace fastssl {
namespace {

using detail::mod_ny;
using detail::warp_rowdot;

constexpr int kBM = 128;                     // x rows per CTA (two consumer warpgroups of 64)
constexpr int kBN = 128;                     // columns per tile (wgmma n128)
constexpr int kBK = 64;                      // elements per chunk: one 128-byte swizzled row
constexpr int kStages = 4;                   // column chunks in flight
constexpr int kMaxChunks = 8;                // resident x tile of at most 8 chunks ...
constexpr int64_t kMaxD = kMaxChunks * kBK;  // ... so D ≤ 512 (192 KiB of shared memory in all)
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr uint32_t kChunkBytes = kBM * kBK * 2;  // x chunk and column chunk alike: 16 KiB
constexpr uint32_t kConsumerRowBytes = 64 * sm90::kSwizzleRowBytes;  // a consumer's 64 rows of a chunk
static_assert(kBM == kBN, "x chunks and column chunks share kChunkBytes and the TMA box");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Sm90Args {
  CUtensorMap x_map;  // boxes of kBK x kBM, 128-byte swizzle (64-byte aligned, passed __grid_constant__)
  CUtensorMap y_map;
  CUtensorMap bank_map;  // unused when the bank is empty
  PairwiseLseProblem p;  // raw operands for the positive row dot; flags; device scale
  float* lse_out;
  float* pos_out;
  double inv_ny;   // 1 / Ny, for mod_ny
  int chunks;      // ceil(D / kBK)
  int y_tiles;     // column tiles of y in the LSE (0 without y negatives)
  int bank_tiles;  // column tiles of the bank
};

// Pipeline phases. The loads are numbered it = 0, 1, 2, ... in the one order producer and consumers
// both walk (column tile by column tile, chunk by chunk); load `it` uses stage it % kStages and is
// that stage's use number u = it / kStages. Each use completes exactly one phase of each of the
// stage's barriers: "full" when its one expect_tx arrival and the TMA bytes are in, "empty" when both
// consumer warpgroups arrived after their wgmma reading it retired. So consumers wait on full with
// parity u & 1. The producer, before use u, waits for empty's phase u − 1, i.e. parity (u & 1) ^ 1;
// for u = 0 that is the phase before a fresh barrier's first, which try_wait.parity reports complete.
// A barrier never runs two phases ahead of a waiter (the producer cannot refill a stage before both
// consumers released it; a consumer cannot release what it has not waited for), so a parity always
// names the intended phase, and every awaited phase has its arrivals issued by construction.
struct Stage {
  uint32_t index;
  uint32_t parity;
};
__host__ __device__ constexpr Stage stage_of(uint32_t it) { return {it % kStages, (it / kStages) & 1u}; }

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) pairwise_lse_fwd_sm90_kernel(const __grid_constant__ Sm90Args args) {
  extern __shared__ unsigned char smem_raw[];
  // TMA's 128-byte swizzle and the descriptors (base offset 0) need 1024-byte aligned tiles.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + sm90::kSwizzleAtomBytes - 1) & ~uintptr_t(sm90::kSwizzleAtomBytes - 1));
  unsigned char* x_tile = smem;                              // args.chunks x kChunkBytes
  unsigned char* ring = smem + kMaxChunks * kChunkBytes;     // kStages x kChunkBytes
  uint64_t* bars = reinterpret_cast<uint64_t*>(ring + kStages * kChunkBytes);
  uint64_t* x_full = bars;
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;

  const PairwiseLseProblem& p = args.p;
  const int chunks = args.chunks;
  const int tiles = args.y_tiles + args.bank_tiles;
  const int warpgroup = threadIdx.x / 128;
  const int64_t block_row0 = static_cast<int64_t>(blockIdx.x) * kBM;

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(x_full, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], kConsumers);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier: the producer warpgroup leaves after its loop

  if (warpgroup == 0) {
    // Producer: the resident x tile, then every column chunk in pipeline order.
    if (threadIdx.x != 0 || tiles == 0) return;
    sm90::prefetch_tensor_map(&args.x_map);
    sm90::prefetch_tensor_map(&args.y_map);
    sm90::mbarrier_arrive_expect_tx(x_full, chunks * kChunkBytes);
    for (int kc = 0; kc < chunks; ++kc)
      sm90::tma_load_2d(x_tile + kc * kChunkBytes, &args.x_map, x_full, kc * kBK, static_cast<int32_t>(block_row0));
    uint32_t it = 0;
    for (int tile = 0; tile < tiles; ++tile) {
      const bool is_bank = tile >= args.y_tiles;
      const CUtensorMap* map = is_bank ? &args.bank_map : &args.y_map;
      const int32_t c0 = (is_bank ? tile - args.y_tiles : tile) * kBN;
      for (int kc = 0; kc < chunks; ++kc, ++it) {
        const Stage st = stage_of(it);
        sm90::mbarrier_wait(&empty[st.index], st.parity ^ 1u);
        sm90::mbarrier_arrive_expect_tx(&full[st.index], kChunkBytes);
        sm90::tma_load_2d(ring + st.index * kChunkBytes, map, &full[st.index], kc * kBK, c0);
      }
    }
    return;
  }

  // Consumers. Both warpgroups walk every chunk (the empty barriers count both), even when all their
  // rows are past M.
  const int consumer = warpgroup - 1;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4;
  const int64_t M = p.x.rows, NY = p.y.rows, D = p.x.cols;
  const int64_t row0 = block_row0 + 64 * consumer;  // this warpgroup's first row
  const float scale = *p.scale;
  const float qk = scale * kLog2e;

  // The two rows of this thread (fragment registers 0-1 and 2-3 of every 8-column block).
  int64_t row[2], pcol[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = row0 + sm90::acc_row(tid, 2 * h);
    pcol[h] = row[h] < M ? mod_ny(row[h] + p.pos_offset, NY, args.inv_ny) : -1;
  }
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.0f, 0.0f};

  if (tiles > 0) sm90::mbarrier_wait(x_full, 0);
  const uint32_t x_addr = sm90::smem_u32(x_tile) + consumer * kConsumerRowBytes;
  const uint32_t ring_addr = sm90::smem_u32(ring);
  float s[64];
#pragma unroll
  for (int r = 0; r < 64; ++r) s[r] = 0.0f;

  uint32_t it = 0;
  for (int tile = 0; tile < tiles; ++tile) {
    const bool is_bank = tile >= args.y_tiles;
    const int64_t c0 = static_cast<int64_t>(is_bank ? tile - args.y_tiles : tile) * kBN;
    const int64_t n_cols = is_bank ? p.bank.rows : NY;

    // S = X_I · C_Jᵀ over the chunks; chunk kc's stage is released once the wgmma group of chunk
    // kc + 1 is issued and kc's has retired (wait_group 1), so the tensor cores never idle on a release.
    uint32_t prev_stage = 0;
    for (int kc = 0; kc < chunks; ++kc, ++it) {
      const Stage st = stage_of(it);
      sm90::mbarrier_wait(&full[st.index], st.parity);
      sm90::wgmma_fence();
      const uint32_t a = x_addr + kc * kChunkBytes;
      const uint32_t b = ring_addr + st.index * kChunkBytes;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks)
        sm90::Wgmma<T>::run(s, sm90::sw128_desc(a + ks * sm90::kKStepBytes),
                            sm90::sw128_desc(b + ks * sm90::kKStepBytes), kc > 0 || ks > 0);
      sm90::wgmma_commit();
      if (kc > 0) {
        sm90::wgmma_wait<1>();
        if (tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);
      }
      prev_stage = st.index;
    }
    sm90::wgmma_wait<0>();
    if (tid == 0) sm90::mbarrier_arrive(&empty[prev_stage]);

    // Masked logits in log2 units, then the online max/sum of each row (4 lanes share a row).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 4 * j + 2 * h + e;
          const int64_t col = c0 + sm90::acc_col(tid, r);
          bool ok = row[h] < M && col < n_cols;
          if (!is_bank) ok = ok && col != pcol[h] && !(p.exclude_self && col == row[h]);
          s[r] = ok ? s[r] * qk : -CUDART_INF_F;
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
  }

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

// ---- host side ---------------------------------------------------------------------------------

// What TMA can read: row-contiguous, 16-byte aligned base and row stride, int32 row coordinates.
bool tma_readable(const Matrix& m) {
  return m.ptr != nullptr && (m.stride_c == 1 || m.cols == 1) && reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0 &&
         (m.stride_r * 2) % 16 == 0 && m.stride_r >= m.cols && m.rows < (int64_t{1} << 31);
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  // Through the runtime's driver entry point, so nothing links libcuda directly.
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

// A 2-D map over m (rows x cols, 2-byte elements) with kBK x 128 boxes and the 128-byte swizzle the
// descriptors assume; out-of-range elements read as zeros.
cudaError_t encode_map(CUtensorMap* map, const Matrix& m, DType dtype) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(m.cols), static_cast<cuuint64_t>(m.rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(m.stride_r) * 2};  // bytes, the outer dimension
  const cuuint32_t box[2] = {kBK, kBM};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(map, type, 2, const_cast<void*>(m.ptr), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch(const Sm90Args& args, int64_t blocks, cudaStream_t stream) {
  // The alignment slack, the x tile, the ring and the barriers.
  constexpr size_t kSmemBytes = sm90::kSwizzleAtomBytes + (kMaxChunks + kStages) * size_t{kChunkBytes} +
                                (1 + 2 * kStages) * sizeof(uint64_t);
  auto kernel = pairwise_lse_fwd_sm90_kernel<T>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

bool pairwise_lse_sm90_supported(const PairwiseLseProblem& p, DType dtype) {
  return dtype != DType::kFloat32 && p.x.cols >= 1 && p.x.cols <= kMaxD && tma_readable(p.x) && tma_readable(p.y) &&
         (p.bank.rows == 0 || tma_readable(p.bank));
}

cudaError_t pairwise_lse_forward_sm90(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                      cudaStream_t stream) {
  if (!pairwise_lse_sm90_supported(p, dtype)) return cudaErrorInvalidValue;
  const int64_t blocks = (p.x.rows + kBM - 1) / kBM;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  Sm90Args a{};
  a.p = p;
  a.lse_out = lse;
  a.pos_out = pos;
  a.inv_ny = 1.0 / static_cast<double>(p.y.rows > 0 ? p.y.rows : 1);
  a.chunks = static_cast<int>((p.x.cols + kBK - 1) / kBK);
  a.y_tiles = p.y_negatives ? static_cast<int>((p.y.rows + kBN - 1) / kBN) : 0;
  a.bank_tiles = static_cast<int>((p.bank.rows + kBN - 1) / kBN);
  cudaError_t err = encode_map(&a.x_map, p.x, dtype);
  if (err == cudaSuccess) err = encode_map(&a.y_map, p.y, dtype);
  if (err == cudaSuccess && p.bank.rows > 0) err = encode_map(&a.bank_map, p.bank, dtype);
  if (err != cudaSuccess) return err;
  return dtype == DType::kBFloat16 ? launch<__nv_bfloat16>(a, blocks, stream) : launch<__half>(a, blocks, stream);
}

}  // namespace fastssl
