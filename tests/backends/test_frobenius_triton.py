"""The Triton squared-Frobenius kernels (docs/design.md family 2) against a float64 oracle.

`fastssl.kernels.triton.frobenius` is called directly (no ops layer): on CPU tensors under the Triton
interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; its single 16-wide config
makes the odd shapes below hit several tiles, the triangle grid and every mask), on CUDA tensors
where there is a GPU. The oracle lives here, in float64: it forms the transformed operands
â = round_to_input_dtype((a − shift)·scale) with the kernels' own fp32 arithmetic and rounding (so a
half-precision comparison is fair: the oracle's inputs are the exact values the kernels multiply),
then the value by the *other* route's formula than the one tested (independent formulas for the same
number) and the gradients w.r.t. â, b̂. Gradients are compared in a norm-wise sense (atol scaled by
the largest expected entry): entries of b̂(b̂ᵀâ) are sums with cancellation, so their error scales
with the tensor, not the entry.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastssl.kernels.triton import frobenius as F  # noqa: E402
from fastssl._common import OP_ROUTES  # noqa: E402
from fastssl._common import triton_interpreting as interpreting  # noqa: E402
from tests.utils import TOLERANCES  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if interpreting() else "cuda"
SHAPES = [(2, 1), (5, 3), (37, 70), (70, 37), (33, 33), (130, 45)]
NO_PARAMS = (None, None, None, None)
#: Which of (a_shift, a_scale, b_shift, b_scale) a transform case sets.
TRANSFORMS = {
    "a_shift": (True, False, False, False),
    "a_scale": (False, True, False, False),
    "a_both": (True, True, False, False),
    "b_only": (False, False, True, True),
    "mixed": (True, False, False, True),
    "all": (True, True, True, True),
}


def make(r, k, dtype, layout, same, scale=1.0, offsets=(0.0, 0.0)):
    """a, b (R, K) in `dtype`, plus offsets[0] (a) and offsets[1] (b); "transposed": both are z.T views
    of (K, R) tensors (strides (1, R)); "mixed": a transposed, b contiguous; "sliced": both z[:, ::2]
    (no unit stride). b is None when `same`."""

    def one(kind, offset):
        if kind == "transposed":
            z = torch.randn(k, r).T
        elif kind == "sliced":
            z = torch.randn(r, 2 * k)[:, ::2]
        else:
            z = torch.randn(r, k)
        return (z * scale + offset).to(DEVICE, dtype)

    kinds = {"mixed": ("transposed", "contiguous")}.get(layout, (layout, layout))
    a = one(kinds[0], offsets[0])
    b = None if same else one(kinds[1], offsets[1])
    return a, b


def make_params(k, which, same, offset):
    """(a_shift, a_scale, b_shift, b_scale): contiguous fp32 (K,) or None; shifts near `offset`
    (centring), scales of either sign (a norm clip or batch norm's 1/σ·γ)."""
    on = TRANSFORMS[which] if which else (False,) * 4
    if same:
        on = (*on[:2], False, False)
    shift = lambda: (offset + 0.3 * torch.randn(k)).to(DEVICE)  # noqa: E731
    scale = lambda: (torch.rand(k) + 0.5) * torch.where(torch.rand(k) < 0.2, -1.0, 1.0).to(DEVICE)  # noqa: E731
    return tuple(make() if flag else None for flag, make in zip(on, (shift, scale, shift, scale)))


def transformed(x, shift, scale):
    """â in float64: (x − shift)·scale in fp32, in that order, rounded to x's dtype (as the kernels)."""
    v = x.to(torch.float32)
    if shift is not None:
        v = v - shift
    if scale is not None:
        v = v * scale
    return v.to(x.dtype).to(torch.float64)


def oracle(a, b, params, grad, route):
    """(value by the route other than `route`, dâ, db̂) in float64; db̂ None when b is None."""
    a_hat = transformed(a, *params[:2])
    b_hat = a_hat if b is None else transformed(b, *params[2:])
    if route == "inner":  # the outer formula: ⟨ââᵀ, b̂b̂ᵀ⟩_F
        value = ((a_hat @ a_hat.T) * (b_hat @ b_hat.T)).sum()
    else:
        value = (a_hat.T @ b_hat).square().sum()
    g = grad.to(torch.float64)
    if b is None:
        return value, 4 * g * a_hat @ (a_hat.T @ a_hat), None
    return value, 2 * g * b_hat @ (b_hat.T @ a_hat), 2 * g * a_hat @ (a_hat.T @ b_hat)


def check(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    want = want.detach().to("cpu", torch.float64)
    scale = max(want.abs().max().item(), 1e-30) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().to("cpu", torch.float64), want, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")  # fmt: skip


def run_and_compare(r, k, dtype, route, same, layout, scale=1.0, grad_value=None, which=None, offset=0.0):
    params = make_params(k, which, same, offset)
    # Data off-centre only where a shift centres it (else fp16 gradients of |b| ~ 8 would overflow).
    a, b = make(r, k, dtype, layout, same, scale, [0.0 if p is None else offset for p in params[::2]])
    grad = torch.tensor(grad_value if grad_value is not None else -1.7 + torch.rand(()).item(), device=DEVICE)
    inputs = [t for t in (a, b, grad, *params) if t is not None]
    copies = [t.clone() for t in inputs]

    value = F.sq_frobenius_forward(a, b, *params, route)
    da, db = F.sq_frobenius_backward(a, b, *params, grad, route)
    want_value, want_da, want_db = oracle(a.cpu(), None if same else b.cpu(), [p if p is None else p.cpu() for p in params],
                                          grad.cpu(), route)  # fmt: skip

    where = f"{route} route, R={r}, K={k}, b {'is a' if same else 'given'}, {layout}, transform {which}"
    assert value.shape == () and value.dtype == torch.float32, where
    assert da.shape == a.shape and da.dtype == a.dtype, where
    if same:
        assert db.numel() == 0 and db.dtype == a.dtype, where
    else:
        assert db.shape == b.shape and db.dtype == b.dtype, where
    # The value keeps fp32 accuracy in every dtype: the oracle's â, b̂ are the kernels' bits (a wrong
    # rounding of the transform would show here at 2^-9), products exact in fp32, accumulation fp32.
    check(value, want_value, torch.float32, f"value, {where}")
    check(da, want_da, dtype, f"da, {where}")
    if not same:
        check(db, want_db, dtype, f"db, {where}")
    for before, after in zip(copies, inputs):
        assert torch.equal(before, after), f"an input was modified, {where}"


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", OP_ROUTES)
@pytest.mark.parametrize("r,k", SHAPES)
def test_fp32_matches_oracle(r, k, route, same, layout):
    run_and_compare(r, k, torch.float32, route, same, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", OP_ROUTES)
@pytest.mark.parametrize("r,k", [(5, 3), (33, 33), (70, 37)])
def test_half_precision_matches_oracle(r, k, route, same, dtype):
    # "mixed": a is a transposed view, b contiguous (b is a: the transposed one).
    run_and_compare(r, k, dtype, route, same, "mixed")


@pytest.mark.parametrize("which", list(TRANSFORMS))
@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", OP_ROUTES)
def test_transform_fp32(route, same, which):
    """The per-column transform in the tile loads: K columns lie along M ("inner") or L ("outer");
    odd sizes put padded rows and columns in every tile (they must stay zero after the shift)."""
    if same and which == "b_only":
        pytest.skip("b is a: b has no parameters of its own")
    run_and_compare(37, 21, torch.float32, route, same, "mixed", which=which, offset=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", ["a_shift", "a_scale", "all"])
@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", OP_ROUTES)
def test_transform_half_precision(route, same, which, dtype):
    """bf16/fp16: (x − shift)·scale in fp32, rounded to nearest even to the input dtype before the dot;
    data centred far from zero (offset 8) so that the shift is what keeps the rounding small."""
    run_and_compare(21, 37, dtype, route, same, "transposed", which=which, offset=8.0)


@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", OP_ROUTES)
def test_transform_no_unit_stride(route, same):
    """Inputs without any unit stride (z[:, ::2]), both parameters on both operands."""
    run_and_compare(19, 23, torch.bfloat16, route, same, "sliced", which="all", offset=1.0)


@pytest.mark.parametrize("same", [False, True], ids=["b", "b_is_a"])
@pytest.mark.parametrize("route", OP_ROUTES)
def test_fp16_matrix_past_fp16_range(route, same):
    """Entries of aᵀb and aaᵀ far above fp16's 65504 (|a| ~ 80): W is divided by max|W| before the
    tensor-core rounding, so nothing overflows; a small grad keeps the gradients themselves in range."""
    run_and_compare(40, 24, torch.float16, route, same, "contiguous", scale=80.0, grad_value=1e-7)


@pytest.mark.parametrize("route", OP_ROUTES)
@pytest.mark.parametrize("r,k", [(0, 3), (3, 0)])
def test_empty(r, k, route):
    a, b = torch.randn(r, k, device=DEVICE), torch.randn(r, k, device=DEVICE)
    shift, scale = torch.randn(k, device=DEVICE), torch.randn(k, device=DEVICE)
    assert F.sq_frobenius_forward(a, b, shift, scale, shift, None, route).item() == 0.0
    da, db = F.sq_frobenius_backward(a, b, shift, scale, None, scale, torch.tensor(2.0, device=DEVICE), route)
    assert da.shape == (r, k) and db.shape == (r, k) and not da.any() and not db.any()


def test_unknown_route():
    """The op checks its route once, for every backend (the kernels trust it)."""
    from fastssl.ops.frobenius import sq_frobenius

    a = torch.randn(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"route must be one of \('inner', 'outer'\), got 'diagonal'"):
        sq_frobenius(a, None, route="diagonal", backend="triton")


def test_bad_params():
    a = torch.randn(3, 4, device=DEVICE)
    grad = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="b_shift"):
        F.sq_frobenius_forward(a, None, None, None, torch.zeros(4, device=DEVICE), None, "inner")
    with pytest.raises(ValueError, match="a_scale"):
        F.sq_frobenius_backward(a, a, None, torch.ones(4, dtype=torch.float64, device=DEVICE), None, None, grad, "outer")
    with pytest.raises(ValueError, match="a_shift"):
        F.sq_frobenius_forward(a, a, torch.zeros(3, device=DEVICE), None, None, None, "inner")
    with pytest.raises(ValueError, match="b_scale"):
        F.sq_frobenius_forward(a, a, None, None, None, torch.ones(8, device=DEVICE)[::2], "outer")


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


@pytest.mark.parametrize("route", OP_ROUTES)
def test_forward_sums_every_partial_whatever_config_ran(monkeypatch, route):
    """The forward's value does not depend on a tile count read back from the autotuner's shared
    state: with a `best_config` that lies (as when another shape tuned between the launch and the
    read, or another thread launched) and with a buffer of partials larger than the grid and full of
    stale NaNs (as a benchmark run of a config with more tiles leaves it), the value is unchanged."""
    from triton.runtime.autotuner import Autotuner

    r, k = 37, 70
    a, b = make(r, k, torch.float32, "contiguous", same=False)
    want = oracle(a.cpu(), b.cpu(), NO_PARAMS, torch.tensor(1.0), route)[0]
    lie = triton.Config({"BLOCK": 128, "BLOCK_L": 16}, num_warps=4, num_stages=1)
    monkeypatch.setattr(Autotuner, "best_config", property(lambda self: lie, lambda self, value: None), raising=False)
    assert F._sq_frobenius_fwd_kernel.best_config is lie
    check(F.sq_frobenius_forward(a, b, *NO_PARAMS, route), want, torch.float32, f"{route}, best_config lies")

    make_partials = F._partials
    stale = lambda m, triangle, device: make_partials(3 * m, triangle, device).fill_(float("nan"))  # noqa: E731
    monkeypatch.setattr(F, "_partials", stale)
    check(F.sq_frobenius_forward(a, b, *NO_PARAMS, route), want, torch.float32, f"{route}, stale partials")
    check(F.sq_frobenius_forward(a, None, *NO_PARAMS, route), oracle(a.cpu(), None, NO_PARAMS, torch.tensor(1.0), route)[0],
          torch.float32, f"{route}, b is a, stale partials")  # fmt: skip
