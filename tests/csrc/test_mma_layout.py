"""CPU emulation of the mma.sync fragment layouts of the pairwise kernels (csrc/pairwise_tiles.cuh; no GPU needed).

The hand-written CUDA kernels keep the logits in registers between their two GEMMs, so every lane's
register must hold exactly the matrix element the PTX ISA says it holds. This file checks that
without a GPU: it gathers per-lane fragments with the *kernel's* load formulas, scatters them back
with the *PTX ISA's* fragment tables ("Matrix Fragments for mma.m16n8k16 with floating point type"
and "Matrix Fragments for mma.m16n8k8", .f16/.bf16 and .tf32 rows; written here from the ISA text,
independently of the kernel), multiplies, and compares the accumulator each lane ends up with
against the (row, column) the kernel's masks and epilogues assume for it.

What is mirrored (keep in sync when those lines change):
  * `logits_chunk`, csrc/pairwise_tiles.cuh (the bf16/fp16 branch: the pa/pb loads a[0..3], b[0..1];
    the fp32 branch: the split_tf32 loads of pa[0], pa[8*lda], pa[4], pa[8*lda+4] and pb[0], pb[4]);
  * `weighted_sum`, csrc/pairwise_tiles.cuh (bf16/fp16: a[i] = pack(w(2kk + i/2, 2(i%2)), ...) and the
    q[0], q[ldv], q[8*ldv], q[9*ldv] B loads; fp32: the k permutation {t -> 2t, t+4 -> 2t+1} in
    w(kk, 0), w(kk, 2), w(kk, 1), w(kk, 3) and pv[nb*8], pv[ldv + nb*8]);
  * the accumulator meaning used by the masks (`tv`, `w_row`, `w_col`) and the epilogues:
    s[nb][e] / acc[nb][e] is element (g + 8·(e >> 1), nb·8 + 2t + (e & 1)) of the warp's tile.
A wrong register order (e.g. the m16n8k8 .f16 A order, or a B operand loaded row-major) makes the
comparisons fail; `test_emulation_detects_a_wrong_layout` shows the check has teeth.
"""

from __future__ import annotations

import numpy as np
import pytest

LANES = 32
KBN = 64  # streamed-tile rows (kBN in pairwise_tiles.cuh)
KBK = 32  # k chunk of the logit GEMM (kBK)


def _gt(lane: int) -> tuple[int, int]:
    return lane >> 2, lane % 4  # groupID, threadID_in_group


# ---- PTX ISA fragment tables (element index i, low to high) -> (row, col) ----------------------


def ptx_a_k16(lane: int, i: int) -> tuple[int, int]:
    """m16n8k16 .f16/.bf16 A (16 x 16): a0..a7 in four .f16x2 registers."""
    g, t = _gt(lane)
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b_k16(lane: int, i: int) -> tuple[int, int]:
    """m16n8k16 .f16/.bf16 B (16 x 8): b0..b3 in two .f16x2 registers."""
    g, t = _gt(lane)
    return 2 * t + (i & 1) + (8 if i >= 2 else 0), g


def ptx_a_tf32(lane: int, i: int) -> tuple[int, int]:
    """m16n8k8 .tf32 A (16 x 8): a0..a3, one per register."""
    g, t = _gt(lane)
    return (g if i in (0, 2) else g + 8), (t if i < 2 else t + 4)


def ptx_b_tf32(lane: int, i: int) -> tuple[int, int]:
    """m16n8k8 .tf32 B (8 x 8): b0, b1."""
    g, t = _gt(lane)
    return (t if i == 0 else t + 4), g


def ptx_c(lane: int, i: int) -> tuple[int, int]:
    """m16n8 accumulator C/D (16 x 8, .f32): c0..c3."""
    g, t = _gt(lane)
    return (g if i < 2 else g + 8), 2 * t + (i & 1)


def mma(c_regs, a_regs, b_regs, a_map, b_map, k):
    """Emulate one warp-wide mma.sync: per-lane element lists in, per-lane accumulators updated."""
    a = np.full((16, k), np.nan)
    b = np.full((k, 8), np.nan)
    for lane in range(LANES):
        for i, v in enumerate(a_regs[lane]):
            r, col = a_map(lane, i)
            assert np.isnan(a[r, col]), f"A({r}, {col}) held by two lanes"
            a[r, col] = v
        for i, v in enumerate(b_regs[lane]):
            r, col = b_map(lane, i)
            assert np.isnan(b[r, col]), f"B({r}, {col}) held by two lanes"
            b[r, col] = v
    assert not np.isnan(a).any() and not np.isnan(b).any(), "a fragment element is held by no lane"
    d = a @ b
    for lane in range(LANES):
        for i in range(4):
            c_regs[lane][i] += d[ptx_c(lane, i)]


# ---- the kernel's fragment loads (mirrors of csrc/pairwise_tiles.cuh) -----------------------------


def logits_chunk(s, s_a, s_b, wr0, half, a_order=(0, 1, 2, 3)):
    """s[lane][nb][e] += A[wr0:wr0+16, :kBK] · B[:64, :kBK]ᵀ with the kernel's loads.
    `a_order` permutes the A registers (only to show a wrong order is caught)."""
    for k in range(0, KBK, 16 if half else 8):
        a_regs, b_regs = [], [[None] * 8 for _ in range(LANES)]
        for lane in range(LANES):
            g, t = _gt(lane)
            if half:
                # pa = sA + (wr0+g)*lda + k + 2t: a[0] = pa[0:2], a[1] = pa[8*lda:+2], a[2] = pa[8:10], a[3] = pa[8*lda+8:+2]
                regs = [
                    [s_a[wr0 + g, k + 2 * t], s_a[wr0 + g, k + 2 * t + 1]],
                    [s_a[wr0 + g + 8, k + 2 * t], s_a[wr0 + g + 8, k + 2 * t + 1]],
                    [s_a[wr0 + g, k + 2 * t + 8], s_a[wr0 + g, k + 2 * t + 9]],
                    [s_a[wr0 + g + 8, k + 2 * t + 8], s_a[wr0 + g + 8, k + 2 * t + 9]],
                ]
                a_regs.append([v for r in a_order for v in regs[r]])
                for nb in range(8):
                    # pb = sB + (nb*8+g)*ldb + k + 2t: b[0] = pb[0:2], b[1] = pb[8:10]
                    n = nb * 8 + g
                    b_regs[lane][nb] = [s_b[n, k + 2 * t], s_b[n, k + 2 * t + 1], s_b[n, k + 2 * t + 8], s_b[n, k + 2 * t + 9]]
            else:
                # pa = sA + (wr0+g)*lda + k + t: pa[0], pa[8*lda], pa[4], pa[8*lda+4]
                regs = [s_a[wr0 + g, k + t], s_a[wr0 + g + 8, k + t], s_a[wr0 + g, k + t + 4], s_a[wr0 + g + 8, k + t + 4]]
                a_regs.append([regs[r] for r in a_order])
                for nb in range(8):
                    n = nb * 8 + g  # pb = sB + (nb*8+g)*ldb + k + t: pb[0], pb[4]
                    b_regs[lane][nb] = [s_b[n, k + t], s_b[n, k + t + 4]]
        for nb in range(8):
            mma([s[lane][nb] for lane in range(LANES)], a_regs, [b_regs[lane][nb] for lane in range(LANES)],
                ptx_a_k16 if half else ptx_a_tf32, ptx_b_k16 if half else ptx_b_tf32, 16 if half else 8)  # fmt: skip


def weighted_sum(acc, w, s_v, dv, half):
    """acc[lane][nb][e] += W · V[:64, :DV], W given per lane in the logit accumulator layout
    (w(lane, nb, e)), with the kernel's A packing and B loads."""
    if half:
        for kk in range(KBN // 16):
            a_regs, b_all = [], []
            for lane in range(LANES):
                g, t = _gt(lane)
                a_regs.append([w(lane, 2 * kk, 0), w(lane, 2 * kk, 1), w(lane, 2 * kk, 2), w(lane, 2 * kk, 3),
                               w(lane, 2 * kk + 1, 0), w(lane, 2 * kk + 1, 1), w(lane, 2 * kk + 1, 2),
                               w(lane, 2 * kk + 1, 3)])  # fmt: skip
                r = kk * 16 + 2 * t  # pv = sV + (kk*16+2t)*ldv + g; q = pv + nb*8: q[0], q[ldv], q[8ldv], q[9ldv]
                b_all.append([[s_v[r, nb * 8 + g], s_v[r + 1, nb * 8 + g], s_v[r + 8, nb * 8 + g], s_v[r + 9, nb * 8 + g]]
                              for nb in range(dv // 8)])  # fmt: skip
            for nb in range(dv // 8):
                mma([acc[lane][nb] for lane in range(LANES)], a_regs, [b_all[lane][nb] for lane in range(LANES)],
                    ptx_a_k16, ptx_b_k16, 16)  # fmt: skip
    else:
        for kk in range(KBN // 8):
            a_regs, b_all = [], []
            for lane in range(LANES):
                g, t = _gt(lane)
                a_regs.append([w(lane, kk, 0), w(lane, kk, 2), w(lane, kk, 1), w(lane, kk, 3)])
                r = kk * 8 + 2 * t  # pv = sV + (kk*8+2t)*ldv + g: pv[nb*8], pv[ldv + nb*8]
                b_all.append([[s_v[r, nb * 8 + g], s_v[r + 1, nb * 8 + g]] for nb in range(dv // 8)])
            for nb in range(dv // 8):
                mma([acc[lane][nb] for lane in range(LANES)], a_regs, [b_all[lane][nb] for lane in range(LANES)],
                    ptx_a_tf32, ptx_b_tf32, 8)  # fmt: skip


def tile_of(regs, n_blocks):
    """The 16 x (8·n_blocks) matrix the kernel believes the per-lane accumulators hold:
    regs[lane][nb][e] is element (g + 8·(e >> 1), nb·8 + 2t + (e & 1))."""
    out = np.full((16, 8 * n_blocks), np.nan)
    for lane in range(LANES):
        g, t = _gt(lane)
        for nb in range(n_blocks):
            for e in range(4):
                out[g + 8 * (e >> 1), nb * 8 + 2 * t + (e & 1)] = regs[lane][nb][e]
    return out


def _zeros(n_blocks):
    return [[[0.0] * 4 for _ in range(n_blocks)] for _ in range(LANES)]


@pytest.mark.parametrize("half", [True, False], ids=["bf16-fp16-m16n8k16", "tf32-m16n8k8"])
@pytest.mark.parametrize("wr0", [0, 48])
def test_logits_chunk_layout(half, wr0):
    """S = X_I·Y_Jᵀ for one warp's 16 rows: the kernel's loads + the ISA's layout give the tile the
    masks index as (row g + 8h, column nb·8 + 2t + e)."""
    rng = np.random.default_rng(1)
    s_a = rng.integers(-4, 5, size=(64, KBK)).astype(np.float64)  # own tile (64 rows, one k chunk)
    s_b = rng.integers(-4, 5, size=(KBN, KBK)).astype(np.float64)  # streamed tile
    s = _zeros(8)
    logits_chunk(s, s_a, s_b, wr0, half)
    np.testing.assert_array_equal(tile_of(s, 8), s_a[wr0 : wr0 + 16] @ s_b.T)


@pytest.mark.parametrize("half", [True, False], ids=["bf16-fp16-m16n8k16", "tf32-m16n8k8"])
def test_weighted_sum_layout(half):
    """acc += W·V where W is the logit accumulator itself (FlashAttention-2's C-to-A reuse; for tf32
    under the k permutation the B loads mirror): the result is W @ V in the accumulator layout."""
    rng = np.random.default_rng(2)
    w_mat = rng.integers(-4, 5, size=(16, KBN)).astype(np.float64)
    dv = 32
    s_v = rng.integers(-4, 5, size=(KBN, dv)).astype(np.float64)

    def w(lane, nb, e):
        g, t = _gt(lane)
        return w_mat[g + 8 * (e >> 1), nb * 8 + 2 * t + (e & 1)]

    acc = _zeros(dv // 8)
    weighted_sum(acc, w, s_v, dv, half)
    np.testing.assert_array_equal(tile_of(acc, dv // 8), w_mat @ s_v)


@pytest.mark.parametrize("half", [True, False], ids=["bf16-fp16-m16n8k16", "tf32-m16n8k8"])
def test_emulation_detects_a_wrong_layout(half):
    """Swapping A registers 1 and 2 (the m16n8k8 .f16 order instead of m16n8k16's, or tf32's a1/a2)
    must break the product: the emulation is sensitive to the register order."""
    rng = np.random.default_rng(3)
    s_a = rng.standard_normal((64, KBK))
    s_b = rng.standard_normal((KBN, KBK))
    s = _zeros(8)
    logits_chunk(s, s_a, s_b, 0, half, a_order=(0, 2, 1, 3))
    assert not np.allclose(tile_of(s, 8), s_a[:16] @ s_b.T)
