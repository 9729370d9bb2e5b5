// Pairwise LSE for sm_80+ (A100-class), pipelined: the forward (kFwd) and the backward's row and
// column roles (kRows: dx, kCols: dy, kSym: both when y is x) of pairwise_lse.cu, same contract (fastssl/kernels/torch/pairwise_lse.py is the oracle),
// written as FlashAttention-2 (Dao 2023) writes its loops:
//
//   * 128-row CTAs: 8 warps of 16 own rows each, so every streamed 64-row tile feeds 128 rows;
//   * cp.async (16-byte cp.async.cg.shared.global) into a ring of kStages chunks: chunk it + kPrefetch
//     is in flight while chunk it feeds the tensor cores (commit_group / wait_group, one group per chunk);
//   * ldmatrix fragment loads: .x4 for the A operand (own rows) and the logit GEMM's B (streamed rows,
//     k contiguous), .x4.trans for P·V's B (the streamed rows read along D).
//
// Bf16/fp16 only, for operands whose rows are contiguous and 16-byte aligned (vec_ok) and D <= 256
// (the own tile stays resident); everything else runs pairwise_lse.cu. The own tile (kBM x D, padded to
// kBK; rows of x, of y for kCols) is copied once, in the first cp.async group. The streamed operand is
// cut into chunks of kBN rows x kBK columns of D; a CTA walks them in one order, numbered it = 0, 1, ...:
// per tile (y if y_negatives, then the bank; kCols: x) n_k chunks for the logit GEMM, and for
// the backward roles n_v more (their kDV-wide slice of D, grid axis y; kSym: 64-wide) for the accumulate
// GEMM(s). The last logit chunk of a tile of kCols / kSym also brings the tile's column statistics (lse
// and grad_lse of its x rows). kSym (x is y: SimCLR, DCL) computes each logit tile S_IJ = X_I·X_Jᵀ once
// and uses it twice, as pairwise_lse.cu's kSym: row weights (lse_I) → dx_I, column weights (lse_J) → dy_I. The masks, the online max/sum, the positive's fp32
// row dot and the epilogues are pairwise_lse_common.cuh's, shared with pairwise_lse.cu.
// tests/csrc/test_pipelined_layout.py emulates the ldmatrix maps and the ring on the CPU.
#include <math_constants.h>

#include "fastssl_kernels.h"
#include "mma_utils.cuh"
#include "pairwise_lse_common.cuh"
#include "pairwise_tiles.cuh"

namespace fastssl {
namespace pipe {

using namespace detail;
using namespace lse;
using tiles::kLog2e;
using tiles::mod_ny;
using tiles::vec_ok;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = 128;  // own rows per CTA, 16 per warp
constexpr int kBN = 64;   // streamed rows per tile
constexpr int kBK = 64;   // columns of D per chunk
constexpr int kDV = 128;  // dx / dy columns per CTA (grid axis y)
constexpr int kSymDV = 64;  // kSym's, with its two accumulators
constexpr int kMaxD = 256;
// Rows padded by 16 bytes: a row stride of 16 (mod 128) bytes puts the 8 rows of every ldmatrix
// 8 x 8 matrix in 8 distinct 16-byte bank groups (tests/csrc/test_pipelined_layout.py).
constexpr int kPad = 8;
constexpr int kChunkLd = kBK + kPad;
constexpr int kChunkElems = kBN * kChunkLd;
// Ring depth. 3 keeps a CTA at D = 256 within sm_86's 99 KiB (95,232 bytes); the wait depth and the
// prefetch distance follow from it: kPrefetch groups are committed before the first use and one per use,
// so waiting until at most kWaitDepth are pending completes exactly the chunk about to be read.
constexpr int kStages = 3;
constexpr int kPrefetch = kStages - 1;
constexpr int kWaitDepth = kStages - 2;

__host__ __device__ constexpr int own_ld(int d_pad) { return d_pad + kPad; }
// Per stage, kCols's and kSym's column statistics: lse and grad_lse of the chunk's kBN streamed rows (fp32).
constexpr int kStatFloats = 2 * kBN;
__host__ __device__ constexpr int smem_bytes(int d_pad, bool stats) {
  return 2 * (kBM * own_ld(d_pad) + kStages * kChunkElems) + (stats ? 4 * kStages * kStatFloats : 0);
}
__host__ __device__ constexpr int ring_stage(int it) { return it % kStages; }

// ldmatrix.x4: lane l supplies the address of row l % 8 of matrix l / 8 and receives, in register i,
// elements (l / 4, 2(l % 4) : 2(l % 4) + 2) of matrix i (.trans: of its transpose).
// A (16 x 16 at rows r, columns k): matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
// are a0..a3 of m16n8k16. The same map over (streamed rows j, D columns) with .trans gives P·V's
// b0, b1 of n8 block nb and b0, b1 of nb + 1.
__host__ __device__ constexpr int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__host__ __device__ constexpr int ldsm_a_col(int lane) { return (lane >> 4) * 8; }
// The logit GEMM's B (streamed rows n, k contiguous): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15) are b0, b1 of n8 block nb and b0, b1 of nb + 1.
__host__ __device__ constexpr int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__host__ __device__ constexpr int ldsm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes global -> shared, bypassing L1; the bytes past src_bytes (0..16) are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// 4 bytes global -> shared (through L1), zero-filled when src_bytes is 0.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [row0, row0 + rows) x columns [col0, col0 + cols) of m (row-contiguous, 16-byte aligned rows)
// into dst (leading dimension ld), 16 bytes per cp.async; what lies outside m is zero-filled.
template <typename T>
__device__ __forceinline__ void copy_async(T* dst, int ld, const Matrix& m, int64_t row0, int64_t col0, int rows,
                                           int cols) {
  const T* src = static_cast<const T*>(m.ptr);
  const int pieces = cols / 8;
  for (int idx = threadIdx.x; idx < rows * pieces; idx += kThreads) {
    const int r = idx / pieces;
    const int c = (idx - r * pieces) * 8;
    const int64_t gr = row0 + r, gc = col0 + c;
    const T* from = src;
    int bytes = 0;
    if (gr < m.rows && gc < m.cols) {
      from = src + gr * m.stride_r + gc;
      bytes = static_cast<int>(m.cols - gc < 8 ? m.cols - gc : 8) * 2;
    }
    cp_async16(smem_u32(dst + r * ld + c), from, bytes);
  }
}

// lse and grad_lse of streamed rows c0 .. c0 + kBN (0 past M) into dst[0 : kBN] and dst[kBN : 2·kBN].
__device__ __forceinline__ void copy_stats_async(float* dst, const PairwiseLseGrads& g, int64_t c0, int64_t M) {
  static_assert(kThreads >= kStatFloats, "one thread per statistic");
  const int i = threadIdx.x;
  if (i < kStatFloats) {
    const int64_t c = c0 + (i < kBN ? i : i - kBN);
    const float* src = i < kBN ? g.lse : g.grad_lse;
    cp_async4(smem_u32(dst + i), c < M ? src + c : src, c < M ? 4 : 0);
  }
}

// s (warp's 16 x 64 logits) += A[wr0 : wr0 + 16, 0 : kBK] · B[0 : 64, 0 : kBK]ᵀ, B a ring chunk.
template <typename T>
__device__ __forceinline__ void logits_chunk_ldsm(float (&s)[8][4], const T* sA, int lda, const T* sB, int wr0,
                                                  int lane) {
  const uint32_t a_base = smem_u32(sA + (wr0 + ldsm_a_row(lane)) * lda + ldsm_a_col(lane));
  const uint32_t b_base = smem_u32(sB + ldsm_b_row(lane) * kChunkLd + ldsm_b_col(lane));
#pragma unroll
  for (int k = 0; k < kBK; k += 16) {
    uint32_t a[4];
    ldsm_x4(a, a_base + k * 2);
#pragma unroll
    for (int nb = 0; nb < 8; nb += 2) {
      uint32_t b[4];
      ldsm_x4(b, b_base + (nb * 8 * kChunkLd + k) * 2);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      MmaOp<T>::run(s[nb], a, b0);
      MmaOp<T>::run(s[nb + 1], a, b1);
    }
  }
}

// acc[nb0 : nb0 + kBK / 8] (warp's 16 x kBK) += W · V[0 : 64, 0 : kBK], W's A fragments packed.
template <typename T, int NB>
__device__ __forceinline__ void weighted_sum_ldsm(float (&acc)[NB][4], int nb0, const uint32_t (&w)[kBN / 16][4],
                                                  const T* sV, int lane) {
  const uint32_t v_base = smem_u32(sV + ldsm_a_row(lane) * kChunkLd + ldsm_a_col(lane));
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
    for (int nb = 0; nb < kBK / 8; nb += 2) {
      uint32_t b[4];
      ldsm_x4_trans(b, v_base + (kk * 16 * kChunkLd + nb * 8) * 2);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      MmaOp<T>::run(acc[nb0 + nb], w[kk], b0);
      MmaOp<T>::run(acc[nb0 + nb + 1], w[kk], b1);
    }
  }
}

struct Args {
  PairwiseLseProblem p;
  PairwiseLseGrads g;
  float* lse_out;
  float* pos_out;
  int d_pad;  // D rounded up to kBK
  double inv_ny;
};

template <int KIND>
struct Role {
  static constexpr bool kColStats = KIND == kCols || KIND == kSym;
  static constexpr int kWidth = KIND == kSym ? kSymDV : kDV;  // columns of D per CTA (backward)
};

template <typename T, int KIND>
__global__ void __launch_bounds__(kThreads) pairwise_lse_pipe_kernel(const Args args) {
  constexpr bool kColStats = Role<KIND>::kColStats;
  constexpr int DV = Role<KIND>::kWidth;
  extern __shared__ __align__(128) unsigned char smem[];
  const PairwiseLseProblem& p = args.p;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wr0 = warp * 16;
  const int64_t M = p.x.rows, NY = p.y.rows, D = p.x.cols;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t dv0 = static_cast<int64_t>(blockIdx.y) * DV;
  const int ldo = own_ld(args.d_pad);
  T* sO = reinterpret_cast<T*>(smem);
  T* ring = sO + kBM * ldo;
  float* ring_stats = reinterpret_cast<float*>(ring + kStages * kChunkElems);  // kColStats only
  const Matrix& own = KIND == kCols ? p.y : p.x;
  const int64_t own_rows = KIND == kCols ? NY : M;

  const float scale = *p.scale;
  const float qk = scale * kLog2e;
  // pcol: the positive column p(i) of own row i (row roles); qcol (column roles): p(c) = own row j
  // iff c ≡ qcol (mod Ny).
  int64_t row[2], pcol[2] = {-1, -1}, qcol[2] = {-1, -1};
  float row_lse2[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + wr0 + g + 8 * h;
    if constexpr (KIND != kCols) pcol[h] = row[h] < M ? mod_ny(row[h] + p.pos_offset, NY, args.inv_ny) : -1;
    if constexpr (kColStats) qcol[h] = row[h] < NY ? mod_ny(row[h] + NY - p.pos_offset, NY, args.inv_ny) : -1;
    if constexpr (KIND == kRows || KIND == kSym) row_lse2[h] = row[h] < M ? lse2_of(args.g.lse[row[h]]) : 0.0f;
  }
  float g_max = 0.0f, g_inv = 0.0f;
  if constexpr (kColStats) {
    g_max = *args.g.grad_lse_absmax;
    g_inv = g_max > 0.0f ? 1.0f / g_max : 0.0f;
  }

  // The chunk sequence: tiles of y (y_negatives), then of the bank (kCols, kSym: of x, if y_negatives);
  // per tile n_k + n_v chunks.
  const Matrix& str = kColStats ? p.x : p.y;
  const int n_k = args.d_pad / kBK;
  const int n_v = KIND != kFwd ? static_cast<int>((args.d_pad - dv0 < DV ? args.d_pad - dv0 : DV) / kBK) : 0;
  const int per_tile = n_k + n_v;
  const int y_tiles = p.y_negatives ? static_cast<int>((str.rows + kBN - 1) / kBN) : 0;
  const int n_tiles = y_tiles + (kColStats ? 0 : static_cast<int>((p.bank.rows + kBN - 1) / kBN));
  const int n_chunks = n_tiles * per_tile;
  auto issue = [&](int n) {
    if (n < n_chunks) {
      const int tile = n / per_tile, q = n - tile * per_tile;
      const bool bank = tile >= y_tiles;
      const int64_t c0 = static_cast<int64_t>(bank ? tile - y_tiles : tile) * kBN;
      const int64_t col0 = q < n_k ? static_cast<int64_t>(q) * kBK : dv0 + static_cast<int64_t>(q - n_k) * kBK;
      copy_async<T>(ring + ring_stage(n) * kChunkElems, kChunkLd, bank ? p.bank : str, c0, col0, kBN, kBK);
      if (kColStats && q == n_k - 1) copy_stats_async(ring_stats + ring_stage(n) * kStatFloats, args.g, c0, M);
    }
    cp_async_commit();  // empty past the end: every use commits one group, so the wait depth holds
  };

  // Prologue: the own tile joins chunk 0's group; kPrefetch groups in flight.
  copy_async<T>(sO, ldo, own, r0, 0, kBM, args.d_pad);
#pragma unroll
  for (int n = 0; n < kPrefetch; ++n) issue(n);
  int it = 0;
  // Chunk `it` ready in shared memory for every thread, and its successor kPrefetch ahead in flight
  // into the stage that chunk it - 1 used (which every thread has finished reading: the barrier).
  auto next_chunk = [&]() -> int {
    cp_async_wait<kWaitDepth>();
    __syncthreads();
    issue(it + kPrefetch);
    return ring_stage(it++);
  };

  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.0f, 0.0f};
  float acc[KIND != kFwd ? DV / 8 : 1][4];
  float acc2[KIND == kSym ? DV / 8 : 1][4];  // kSym's dy
#pragma unroll
  for (int i = 0; i < (KIND != kFwd ? DV / 8 : 1); ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
#pragma unroll
  for (int i = 0; i < (KIND == kSym ? DV / 8 : 1); ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc2[i][e] = 0.0f;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const bool is_bank = tile >= y_tiles;
    const int64_t c0 = static_cast<int64_t>(is_bank ? tile - y_tiles : tile) * kBN;
    const int64_t cols = is_bank ? p.bank.rows : str.rows;
    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    int stage = 0;
    for (int kc = 0; kc < n_k; ++kc) {
      stage = next_chunk();
      logits_chunk_ldsm<T>(s, sO + kc * kBK, ldo, ring + stage * kChunkElems, wr0, lane);
    }

    if constexpr (KIND == kFwd) {
      online_tile(s, p, M, row, pcol, c0, cols, is_bank, qk, t, m_run, l_run);
    } else {
      // The weights, packed once per tile as the A fragments of the accumulate GEMM (two n8 logit blocks
      // are one k16 A fragment). Row weights (kRows, kSym's dx): P_ij = exp(s_ij − lse_i) (grad_lse_i is
      // the epilogue's row scale). Column weights (kCols, kSym's dy): the logit (own row r, streamed x
      // row c) is s_cr, and G_cr/g_max = grad_lse_c/g_max·exp(s_cr − lse_c) unless r is c's positive
      // (c ≡ qcol (mod Ny): the bit mask) or (self) c = r; the statistics came with this tile's last logit
      // chunk, whose stage is read before the next barrier.
      [[maybe_unused]] const float* st = ring_stats + stage * kStatFloats;
      uint64_t positives[2] = {0, 0};
      if constexpr (kColStats) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (row[h] >= NY) continue;
          for (int64_t c = c0 + mod_ny(qcol[h] - c0, NY, args.inv_ny); c < c0 + kBN; c += NY)
            positives[h] |= 1ull << (c - c0);
        }
      }
      auto row_w = [&](int nb, int e) -> float {
        const int h = e >> 1;
        const int64_t col = c0 + nb * 8 + 2 * t + (e & 1);
        return row_keeps(p, M, row[h], pcol[h], col, cols, is_bank) ? exp2f(s[nb][e] * qk - row_lse2[h]) : 0.0f;
      };
      auto col_w = [&](int nb, int e) -> float {
        const int h = e >> 1;
        const int cl = nb * 8 + 2 * t + (e & 1);
        const int64_t col = c0 + cl;
        const bool ok = row[h] < NY && col < M && !((positives[h] >> cl) & 1) && !(p.exclude_self && col == row[h]);
        return ok ? st[kBN + cl] * g_inv * exp2f(s[nb][e] * qk - lse2_of(st[cl])) : 0.0f;
      };
      auto pack = [&](uint32_t (&w)[kBN / 16][4], auto&& w_of) {
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          w[kk][0] = pack_floats<T>(w_of(2 * kk, 0), w_of(2 * kk, 1));
          w[kk][1] = pack_floats<T>(w_of(2 * kk, 2), w_of(2 * kk, 3));
          w[kk][2] = pack_floats<T>(w_of(2 * kk + 1, 0), w_of(2 * kk + 1, 1));
          w[kk][3] = pack_floats<T>(w_of(2 * kk + 1, 2), w_of(2 * kk + 1, 3));
        }
      };
      uint32_t w[kBN / 16][4];
      [[maybe_unused]] uint32_t w2[KIND == kSym ? kBN / 16 : 1][4];
      if constexpr (KIND == kCols) {
        pack(w, col_w);
      } else {
        pack(w, row_w);
      }
      if constexpr (KIND == kSym) pack(w2, col_w);
#pragma unroll
      for (int vc = 0; vc < DV / kBK; ++vc) {
        if (vc < n_v) {
          const T* v = ring + next_chunk() * kChunkElems;
          weighted_sum_ldsm<T, DV / 8>(acc, vc * (kBK / 8), w, v, lane);
          if constexpr (KIND == kSym) weighted_sum_ldsm<T, DV / 8>(acc2, vc * (kBK / 8), w2, v, lane);
        }
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (KIND == kFwd) {
    forward_epilogue<T>(p, M, NY, D, args.inv_ny, r0 + wr0, row, g, t, lane, qk, scale, m_run, l_run, args.lse_out,
                        args.pos_out);
  } else if constexpr (KIND == kCols) {
    cols_epilogue<T, DV>(p, args.g, M, NY, D, args.inv_ny, r0 + wr0, row, own_rows, dv0, g_max, acc, g, t, lane, qk,
                         scale);
  } else {
    rows_epilogue<T, DV>(p, args.g, p.y /* kSym: y is x */, M, NY, D, args.inv_ny, r0 + wr0, row, pcol, dv0, acc, g,
                         t, lane, qk, scale);
    if constexpr (KIND == kSym)
      cols_epilogue<T, DV>(p, args.g, M, NY, D, args.inv_ny, r0 + wr0, row, own_rows, dv0, g_max, acc2, g, t, lane,
                           qk, scale);
  }
}

template <typename T, int KIND>
cudaError_t launch(Args a, cudaStream_t stream) {
  const int64_t D = a.p.x.cols;
  a.d_pad = static_cast<int>((D + kBK - 1) / kBK * kBK);
  a.inv_ny = 1.0 / static_cast<double>(a.p.y.rows > 0 ? a.p.y.rows : 1);
  constexpr int DV = Role<KIND>::kWidth;
  const int bytes = smem_bytes(a.d_pad, Role<KIND>::kColStats);
  const int64_t blocks = ((KIND == kCols ? a.p.y.rows : a.p.x.rows) + kBM - 1) / kBM;
  const int64_t slices = KIND == kFwd ? 1 : (D + DV - 1) / DV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = pairwise_lse_pipe_kernel<T, KIND>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(slices)), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <int KIND>
cudaError_t dispatch(const Args& a, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return launch<__half, KIND>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, KIND>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pipe

bool pairwise_lse_pipelined_supported(const PairwiseLseProblem& p, DType dtype) {
  return dtype != DType::kFloat32 && p.x.cols > 0 && p.x.cols <= pipe::kMaxD && pipe::vec_ok(p.x, 2) &&
         pipe::vec_ok(p.y, 2) && (p.bank.rows == 0 || pipe::vec_ok(p.bank, 2));
}

cudaError_t pairwise_lse_forward_pipelined(const PairwiseLseProblem& p, DType dtype, float* lse, float* pos,
                                           cudaStream_t stream) {
  if (!pairwise_lse_pipelined_supported(p, dtype)) return cudaErrorInvalidValue;
  pipe::Args a{};
  a.p = p;
  a.lse_out = lse;
  a.pos_out = pos;
  return pipe::dispatch<lse::kFwd>(a, dtype, stream);
}

cudaError_t pairwise_lse_backward_rows_pipelined(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                                 cudaStream_t stream) {
  if (!pairwise_lse_pipelined_supported(p, dtype)) return cudaErrorInvalidValue;
  pipe::Args a{};
  a.p = p;
  a.g = g;
  return pipe::dispatch<lse::kRows>(a, dtype, stream);
}

cudaError_t pairwise_lse_backward_cols_pipelined(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                                 cudaStream_t stream) {
  if (!pairwise_lse_pipelined_supported(p, dtype)) return cudaErrorInvalidValue;
  pipe::Args a{};
  a.p = p;
  a.g = g;
  return pipe::dispatch<lse::kCols>(a, dtype, stream);
}

cudaError_t pairwise_lse_backward_sym_pipelined(const PairwiseLseProblem& p, const PairwiseLseGrads& g, DType dtype,
                                                cudaStream_t stream) {
  // x is y (one pointer, same shape and strides), its columns are the negatives, and there is no bank.
  const bool same = p.x.ptr == p.y.ptr && p.x.rows == p.y.rows && p.x.stride_r == p.y.stride_r &&
                    p.x.stride_c == p.y.stride_c && p.y_negatives && p.bank.rows == 0;
  if (!same || !pairwise_lse_pipelined_supported(p, dtype)) return cudaErrorInvalidValue;
  pipe::Args a{};
  a.p = p;
  a.g = g;
  return pipe::dispatch<lse::kSym>(a, dtype, stream);
}

}  // namespace fastssl
