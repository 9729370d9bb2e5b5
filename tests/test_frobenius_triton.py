"""The Triton squared-Frobenius kernels (DESIGN.md family 2) against the torch backend in float64.

`fastssl.kernels.triton.frobenius` is called directly (no ops layer): on CPU tensors under the Triton
interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; its single 16-wide config
makes the odd shapes below hit several tiles, the triangle grid and every mask), on CUDA tensors
where there is a GPU. The oracle is the torch backend on the inputs upcast to float64: its two
routes are independent formulas in exact-ish arithmetic, so every Triton route is checked against
both. Gradients are compared in a norm-wise sense (atol scaled by the largest expected entry):
entries of b(bᵀa) are sums with cancellation, so their error scales with the tensor, not the entry.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastssl.kernels.torch.frobenius as oracle  # noqa: E402
from fastssl.kernels.triton import frobenius as F  # noqa: E402
from fastssl.kernels.triton._utils import interpreting  # noqa: E402
from tests.utils import TOLERANCES  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if interpreting() else "cuda"
SHAPES = [(2, 1), (5, 3), (37, 70), (70, 37), (33, 33), (130, 45)]


def make(r, k, dtype, layout, same, scale=1.0):
    """a, b (R, K) in `dtype`; "transposed": both are z.T views of (K, R) tensors (strides (1, R));
    "mixed": a transposed, b contiguous. b is None when `same`."""

    def one(transposed):
        z = torch.randn(k, r).T if transposed else torch.randn(r, k)
        return (z * scale).to(DEVICE, dtype)

    a = one(layout in ("transposed", "mixed"))
    b = None if same else one(layout == "transposed")
    return a, b


def check(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    want = want.detach().to("cpu", torch.float64)
    scale = max(want.abs().max().item(), 1e-30) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().to("cpu", torch.float64), want, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")  # fmt: skip


def run_and_compare(r, k, dtype, route, same, layout, scale=1.0, grad_value=None):
    a, b = make(r, k, dtype, layout, same, scale)
    grad = torch.tensor(grad_value if grad_value is not None else -1.7 + torch.rand(()).item(), device=DEVICE)
    copies = [t.clone() for t in (a, b, grad) if t is not None]

    value = F.sq_frobenius_forward(a, b, route)
    da, db = F.sq_frobenius_backward(a, b, grad, route)

    b64 = None if same else b.double()
    # Each Triton route against the *other* torch route too: independent formulas for the same number.
    want_value = oracle.sq_frobenius_forward(a.double(), b64, "outer" if route == "inner" else "inner")
    want_da, want_db = oracle.sq_frobenius_backward(a.double(), b64, grad.double(), route)

    where = f"{route} route, R={r}, K={k}, b {'is a' if same else 'given'}, {layout}"
    assert value.shape == () and value.dtype == torch.float32, where
    assert da.shape == a.shape and da.dtype == a.dtype, where
    if same:
        assert db.numel() == 0 and db.dtype == a.dtype, where
    else:
        assert db.shape == b.shape and db.dtype == b.dtype, where
    # The value keeps fp32 accuracy in every dtype: the inputs are exact in the oracle, products exact
    # in fp32 and accumulation is fp32.
    check(value, want_value, torch.float32, f"value, {where}")
    check(da, want_da, dtype, f"da, {where}")
    if not same:
        check(db, want_db, dtype, f"db, {where}")
    for before, after in zip(copies, [t for t in (a, b, grad) if t is not None]):
        assert torch.equal(before, after), f"an input was modified, {where}"


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", F.ROUTES)
@pytest.mark.parametrize("r,k", SHAPES)
def test_fp32_matches_oracle(r, k, route, same, layout):
    run_and_compare(r, k, torch.float32, route, same, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", F.ROUTES)
@pytest.mark.parametrize("r,k", [(5, 3), (33, 33), (70, 37)])
def test_half_precision_matches_oracle(r, k, route, same, dtype):
    # "mixed": a is a transposed view, b contiguous (b is a: the transposed one).
    run_and_compare(r, k, dtype, route, same, "mixed")


@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", F.ROUTES)
def test_fp16_matrix_past_fp16_range(route, same):
    """Entries of aᵀb and aaᵀ far above fp16's 65504 (|a| ~ 80): W is divided by max|W| before the
    tensor-core rounding, so nothing overflows; a small grad keeps the gradients themselves in range."""
    run_and_compare(40, 24, torch.float16, route, same, "contiguous", scale=80.0, grad_value=1e-7)


@pytest.mark.parametrize("route", F.ROUTES)
@pytest.mark.parametrize("r,k", [(0, 3), (3, 0)])
def test_empty(r, k, route):
    a, b = torch.randn(r, k, device=DEVICE), torch.randn(r, k, device=DEVICE)
    assert F.sq_frobenius_forward(a, b, route).item() == 0.0
    da, db = F.sq_frobenius_backward(a, b, torch.tensor(2.0, device=DEVICE), route)
    assert da.shape == (r, k) and db.shape == (r, k) and not da.any() and not db.any()


def test_unknown_route():
    a = torch.randn(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="route"):
        F.sq_frobenius_forward(a, None, "diagonal")


@triton.jit
def _coords_kernel(PID0, I, J, TRIANGLE: tl.constexpr):
    pid = tl.load(PID0) + tl.program_id(0).to(tl.int64)
    i, j = F._tile_coords(pid, 0, TRIANGLE, 16)
    tl.store(I + tl.program_id(0), i)
    tl.store(J + tl.program_id(0), j)


@pytest.mark.parametrize("j0", [0, 1000, 2**20 + 3, 2**23 - 5])
def test_triangle_coords(j0):
    """The triangle grid's pid -> (i, j) inversion (an fp32 sqrt plus a correction step) is exact
    around column starts j(j+1)/2, where a float error would show, up to j ~ 2^23."""
    start = max(j0 * (j0 + 1) // 2 - 40, 0)
    n = 96
    pids = torch.arange(start, start + n, dtype=torch.int64)
    i_out = torch.empty(n, dtype=torch.int64, device=DEVICE)
    j_out = torch.empty(n, dtype=torch.int64, device=DEVICE)
    _coords_kernel[(n,)](torch.tensor(start, dtype=torch.int64, device=DEVICE), i_out, j_out, TRIANGLE=True)
    j_want = ((torch.sqrt(8 * pids.double() + 1) - 1) / 2).floor().long()
    i_want = pids - j_want * (j_want + 1) // 2
    assert torch.equal(j_out.cpu(), j_want) and torch.equal(i_out.cpu(), i_want)
    assert bool(((0 <= i_want) & (i_want <= j_want)).all())
