"""The Triton pairwise-LSE forward's column splits and tile masks (docs/design.md, family 1), under
the interpreter here and on CUDA tensors where there is a GPU.

The split forward (grid axis 1: S programs per row block, each over one run of the column tiles,
partial LSEs merged by a second kernel) must give the unsplit forward's values to fp32 rounding and
the float64 oracle's to the usual tolerance, in every mode, with ragged runs and runs without any
column. The forward masks only the tiles that hold a dropped column (`_y_tile_needs_mask`); that
predicate is checked exactly against a brute force, and the forward with other tile shapes (so that
the diagonal, the positive band and the ragged edge fall at other places) against the oracle.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastssl._common import triton_interpreting as interpreting  # noqa: E402
from fastssl.kernels import PairwiseLSEFlags  # noqa: E402
from fastssl.kernels.triton import pairwise_lse as T  # noqa: E402
from tests.backends.test_pairwise_lse import MODES, dense_oracle, make_case, run_both  # noqa: E402
from tests.utils import assert_close  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if interpreting() else "cuda"


def unit(rows, d):
    return torch.nn.functional.normalize(torch.randn(rows, d), dim=1).to(DEVICE)


def check_forward(x, y, bank, scale, flags, n_split, what):
    """The split forward against the unsplit one (pos bit for bit, lse to a few fp32 ulps) and the oracle."""
    lse, pos = T.pairwise_lse_forward(x, y, bank, scale, flags, n_split=n_split)
    lse1, pos1 = T.pairwise_lse_forward(x, y, bank, scale, flags, n_split=1)
    want_lse, want_pos = dense_oracle(x.cpu(), y.cpu(), None if bank is None else bank.cpu(), scale.cpu(), flags)
    assert torch.equal(pos, pos1), f"{what}: the positive must be computed once, as unsplit"
    torch.testing.assert_close(lse, lse1, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}, split vs unsplit: {m}")
    assert_close(lse, want_lse, torch.float32, what=f"{what} lse")
    assert_close(pos, want_pos, torch.float32, what=f"{what} pos")


@pytest.mark.parametrize("n_split", [2, 3, 5])
@pytest.mark.parametrize("m", [6, 37])
@pytest.mark.parametrize("mode", list(MODES))
def test_split_forward_every_mode(mode, m, n_split):
    """m = 37 columns in 16-wide tiles (interpreter): 3 tiles, so S = 2 gives runs of 2 and 1 tiles,
    S = 3 one tile each, S = 5 two runs without columns; m = 6: one tile, every other run empty."""
    x, y, bank, scale, flags = make_case(mode, m, 9, torch.float32, device=DEVICE)
    if mode == "moco":  # a bank of several tiles, with a ragged edge
        bank = unit(53, 9)
    check_forward(x, y, bank, scale, flags, n_split, f"{mode} M={m} S={n_split}")


@pytest.mark.parametrize("n_split", [1, 4])
@pytest.mark.parametrize("m,n_y,offset", [(41, 23, 17), (19, 50, 49), (40, 40, 39)])
@pytest.mark.parametrize("exclude_self,include_pos", [(True, True), (False, True), (True, False)])
def test_rows_and_columns_differ(m, n_y, offset, exclude_self, include_pos, n_split):
    """M ≠ Ny: the positive band wraps around y (more than once when M > Ny), the diagonal ends
    inside y or past it; y negatives then a bank, so that runs cross from y's tiles to the bank's."""
    flags = PairwiseLSEFlags(offset, exclude_self, include_pos, True)
    x, y, bank = unit(m, 12), unit(n_y, 12), unit(21, 12)
    check_forward(x, y, bank, torch.tensor(3.0, device=DEVICE), flags, n_split, f"M={m} Ny={n_y} +{offset}")


@pytest.mark.skipif(not interpreting(), reason="replaces the interpreter's single tile config")
@pytest.mark.parametrize("n_split", [1, 3])
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("mode", ["simclr", "clip", "dcl", "bank+batch", "uniformity"])
def test_tile_masks_with_other_tiles(monkeypatch, mode, block_m, block_n, n_split):
    """70 columns: tiles without the diagonal, the band or the edge (no mask) beside tiles with them."""
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
    monkeypatch.setattr(T._pairwise_lse_fwd_kernel, "configs", [config])
    x, y, bank, scale, flags = make_case(mode, 70, 8, torch.float32, device=DEVICE)
    check_forward(x, y, bank, scale, flags, n_split, f"{mode} {block_m}x{block_n} S={n_split}")


@triton.jit
def _needs_mask_kernel(OUT, NY, pos_offset, EXCLUDE_SELF: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):  # fmt: skip
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    start_n = tl.program_id(1) * BLOCK_N
    hit = T._y_tile_needs_mask(start_n, row0, (row0 + pos_offset) % NY, NY, EXCLUDE_SELF, BLOCK_M, BLOCK_N)
    tl.store(OUT + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), hit.to(tl.int32))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 64), (64, 16)])
@pytest.mark.parametrize("n_y", [23, 64])
def test_tile_mask_predicate_is_exact(n_y, block_m, block_n, exclude_self):
    """`_y_tile_needs_mask` is true exactly on the tiles with a column past Ny, a positive column or
    (EXCLUDE_SELF) a self column of any row of the block: never false there (a dropped column would
    enter the LSE), and never true elsewhere (the tile would pay for masks it does not need)."""
    row_blocks, col_tiles = triton.cdiv(3 * n_y, block_m), triton.cdiv(n_y, block_n)
    for offset in sorted({0, 1, n_y // 2, n_y - 1}):
        got = torch.empty(row_blocks, col_tiles, dtype=torch.int32, device=DEVICE)
        _needs_mask_kernel[(row_blocks, col_tiles)](got, n_y, offset, EXCLUDE_SELF=exclude_self, BLOCK_M=block_m,
                                                    BLOCK_N=block_n)  # fmt: skip
        rows = torch.arange(row_blocks * block_m).view(row_blocks, 1, block_m, 1)
        cols = torch.arange(col_tiles * block_n).view(1, col_tiles, 1, block_n)
        dropped = (cols >= n_y) | (cols == (rows + offset) % n_y) | (exclude_self & (cols == rows))
        want = dropped.any(dim=(2, 3)).to(torch.int32)
        assert torch.equal(got.cpu(), want), f"Ny={n_y} offset={offset}: predicate\n{got.cpu()}\nbrute force\n{want}"


@pytest.mark.parametrize("mode", ["simclr", "moco", "uniformity"])
def test_split_through_the_op(monkeypatch, mode):
    """FASTSSL_LSE_SPLITS forces S through the custom op: values and gradients (the backward reads the
    merged lse) against the oracle."""
    monkeypatch.setenv("FASTSSL_LSE_SPLITS", "3")
    x, y, bank, scale, flags = make_case(mode, 37, 10, torch.float32, device=DEVICE)
    got, want = run_both("triton", x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, torch.float32, what=f"{mode} {name}, S = 3")


def test_forward_splits_rule(monkeypatch):
    """The default S on a 132-SM GPU (no GPU needed: the SM count is stubbed), the forced S, and S = 1
    off a GPU; a scratch (S > 1) of S·M fp32 stays within 2·SMs·128·4 bytes whatever M."""
    monkeypatch.delenv("FASTSSL_LSE_SPLITS", raising=False)
    monkeypatch.setattr(T, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert T.forward_splits(8192, 8192, gpu) == 4  # 64 row blocks: 256 programs
    assert T.forward_splits(4096, 4096, gpu) == 8
    assert T.forward_splits(32768, 32768, gpu) == 1  # 256 row blocks fill the GPU alone
    assert T.forward_splits(256, 65536, gpu) == T.MAX_SPLIT  # MoCo: 2 row blocks, a 65536-row bank
    assert T.forward_splits(256, 1500, gpu) == 2  # at least MIN_SPLIT_COLUMNS columns per split
    assert T.forward_splits(256, 1000, gpu) == 1
    assert T.forward_splits(8192, 8192, torch.device("cpu")) == 1
    for m in (1, 100, 1000, 8192, 16896, 20000, 10**6):
        s = T.forward_splits(m, 10**6, gpu)
        assert s & (s - 1) == 0 and (s == 1 or s * m * 4 <= 2 * 132 * T.SPLIT_ROW_BLOCK * 4), (m, s)
    for forced, s in (("3", 3), ("0", 1), ("1000", T.MAX_SPLIT)):
        monkeypatch.setenv("FASTSSL_LSE_SPLITS", forced)
        assert T.forward_splits(8192, 8192, torch.device("cpu")) == s
