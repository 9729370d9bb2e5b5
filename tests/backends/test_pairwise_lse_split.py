"""The Triton pairwise-LSE forward's column splits (docs/design.md, family 1), under the interpreter
here and on CUDA tensors where there is a GPU.

The split forward (grid axis 1: S programs per row block, each over one run of the column tiles,
partial LSEs merged by a second kernel) must give the unsplit forward's values to fp32 rounding and
the float64 oracle's to the usual tolerance, in every mode, with ragged runs and runs without any
column.
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
