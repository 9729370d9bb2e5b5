"""The pairwise-LSE backward at its seams, on the CPU: every route and pass against a float64 oracle.

The Triton backward has two routes (fastssl/kernels/triton/pairwise_lse.py, `backward_route`) and
three fused passes (symmetric for x is y, rows with dy through atomics, dy alone); the torch backend
walks row chunks. Each boundary between pieces is a place to lose or double a term, so this file
checks them where the other tests do not look:

* the torch backend's chunk loop, with chunks of a few rows, in every mode (DCL, uniformity, bank);
* the blocked route (D past the resident width, and forced at small D) in fp32 and fp16, with a
  scratch so small that it takes several row blocks;
* positive offsets whose dy formula is visible: the positive row of column j, (j − pos_offset)
  mod Ny, differs from (j + pos_offset) mod Ny unless 2·pos_offset ≡ 0 (mod Ny), which is the case
  of every SimCLR batch (pos_offset = Ny / 2); also M > Ny, where positives wrap;
* needs_dx / needs_dy: only one gradient asked for, through the kernels directly (the op asks for
  both roles whenever x is y);
* half-precision weights: a cotangent scaled by 2^-k gives gradients scaled by exactly 2^-k, and
  weights pushed 20 binades down (P·2^-20, through the stored lse) keep their digits.

The gradients are compared at the kernel level: `pairwise_lse_backward(x, y, bank, scale, lse,
grad_lse, grad_pos, flags)` against autograd through the dense oracle, with x and y separate leaves
so that the row role (dx) and the column role (dy) are told apart even when x is y.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastssl.kernels.torch.pairwise_lse as torch_kernels
from fastssl.kernels import PairwiseLSEFlags
from tests.backends.test_pairwise_lse import MODES, dense_oracle, make_case, run_both
from tests.utils import CPU_BACKENDS, TOLERANCES, assert_close

TRITON = "triton" in CPU_BACKENDS
if TRITON:
    import fastssl.kernels.triton.pairwise_lse as triton_kernels

needs_triton = pytest.mark.skipif(not TRITON, reason="triton is not installed")

MODE_NAMES = list(MODES)
#: (backend, Triton backward route): the torch backend has one route.
BACKEND_ROUTES = [("torch", "chunks")] + ([("triton", "fused"), ("triton", "blocked")] if TRITON else [])


def _cotangents(m, seed=3, pos=True):
    gen = torch.Generator().manual_seed(seed)
    g_lse = torch.randn(m, generator=gen, dtype=torch.float64)
    g_pos = torch.randn(m, generator=gen, dtype=torch.float64) if pos else torch.zeros(m, dtype=torch.float64)
    return g_lse, g_pos


def oracle(x, y, bank, scale, flags, g_lse, g_pos):
    """(lse, dx, dy) in float64: dx through the row role, dy through the column role."""
    xr = x.detach().double().requires_grad_()
    yr = y.detach().double().requires_grad_()
    lse, pos = dense_oracle(xr, yr, None if bank is None else bank.double(), scale.double(), flags)
    dx, dy = torch.autograd.grad((lse * g_lse).sum() + (pos * g_pos).sum(), (xr, yr))
    return lse.detach(), dx, dy


def kernel_backward(module, x, y, bank, scale, flags, lse, g_lse, g_pos):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return module.pairwise_lse_backward(x, y, bank, scale.to(dt), lse.to(dt), g_lse.to(dt), g_pos.to(dt), flags)


def close(actual, expected, dtype, what):
    """Per-dtype tolerance, with atol relative to the largest expected entry (gradients are compared
    as a whole: a tiny entry is as exact as the products that feed it allow, not more)."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.double()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol + rtol * float(expected.abs().max()),
                               msg=lambda m: f"{what} ({dtype}): {m}")  # fmt: skip


def check(module, x, y, bank, scale, flags, what, pos=True):
    """The kernel's (dx, dy) against the oracle for one random cotangent; where x is y and both
    roles are asked for, only their sum and Σ x·dx (what d scale is read from) are fixed by the op."""
    g_lse, g_pos = _cotangents(x.shape[0], pos=pos)
    lse, want_dx, want_dy = oracle(x, y, bank, scale, flags, g_lse, g_pos)
    dx, dy = kernel_backward(module, x, y, bank, scale, flags, lse, g_lse, g_pos)
    d = x.shape[1]
    assert dx.shape == ((x.shape[0], d) if flags.needs_dx else (0, d)) and dx.dtype == x.dtype
    assert dy.shape == ((y.shape[0], d) if flags.needs_dy else (0, d)) and dy.dtype == y.dtype
    if y is x and flags.needs_dx and flags.needs_dy:
        close(dx.double() + dy.double(), want_dx + want_dy, x.dtype, f"{what} dx + dy")
        close((x.double() * dx.double()).sum(), (x.double() * want_dx).sum(), x.dtype, f"{what} Σ x·dx")
        return
    if flags.needs_dx:
        close(dx, want_dx, x.dtype, f"{what} dx")
    if flags.needs_dy:
        close(dy, want_dy, y.dtype, f"{what} dy")


def case(mode, m, d, dtype, pos_offset=None, temperature=0.5):
    x, y, bank, scale, flags = make_case(mode, m, d, dtype, temperature=temperature)
    if pos_offset is not None:
        flags = flags._replace(pos_offset=pos_offset % y.shape[0])
    return x, y, bank, scale, flags


# ------------------------------------------------------------------------------------------------
# the torch backend's row chunks


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_torch_chunks_every_mode(monkeypatch, mode):
    """Chunks of 2-3 rows (M = 29: a ragged last chunk) give the oracle's gradients in every mode."""
    x, y, bank, scale, flags = case(mode, 29, 6, torch.float64, pos_offset=None if mode == "moco" else 5)
    n_cols = y.shape[0] + (0 if bank is None else bank.shape[0])
    monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", 8 * n_cols * 3 - 1)  # 2 rows a chunk
    assert torch_kernels._chunk_rows(n_cols, 8) == 2
    check(torch_kernels, x, y, bank, scale, flags, f"torch/{mode} chunked")
    g_lse, _ = _cotangents(29)
    lse, _ = dense_oracle(x, y, bank, scale, flags)
    got, _ = torch_kernels.pairwise_lse_forward(x, y, bank, scale, flags)
    torch.testing.assert_close(got, lse, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Triton: routes, the blocked route's scratch, positive offsets, needs_dx / needs_dy


def _force(monkeypatch, route, scratch_rows=None, n_cols=None, itemsize=None):
    monkeypatch.setattr(triton_kernels, "BACKWARD_ROUTE", route)
    if scratch_rows is not None:
        monkeypatch.setattr(triton_kernels, "SCRATCH_BYTES", scratch_rows * n_cols * itemsize)


@needs_triton
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_blocked_route_d_loop(monkeypatch, mode, dtype):
    """D = 300 is past the resident width in every dtype: the blocked route, its weights kernel
    looping over D, with a scratch of 7 rows, so that M = 19 takes three row blocks."""
    x, y, bank, scale, flags = case(mode, 19, 300, dtype, pos_offset=None if mode == "moco" else 3)
    assert triton_kernels.backward_route(300, dtype) == "blocked"
    n_cols = y.shape[0] + (0 if bank is None else bank.shape[0])
    _force(monkeypatch, "auto", scratch_rows=7, n_cols=n_cols, itemsize=x.element_size())
    check(triton_kernels, x, y, bank, scale, flags, f"blocked/{mode} D=300")


@needs_triton
@pytest.mark.parametrize("route", ["fused", "blocked"])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_triton_routes_fp16(monkeypatch, route, mode):
    """Both routes at a resident D in fp16; the blocked one with one row per block (the extreme seam)."""
    x, y, bank, scale, flags = case(mode, 21, 40, torch.float16, pos_offset=None if mode == "moco" else 5)
    assert triton_kernels.backward_route(40, torch.float16) == "fused"
    n_cols = y.shape[0] + (0 if bank is None else bank.shape[0])
    _force(monkeypatch, route, scratch_rows=1, n_cols=n_cols, itemsize=2)
    check(triton_kernels, x, y, bank, scale, flags, f"{route}/{mode} fp16")


@pytest.mark.parametrize("backend,route", BACKEND_ROUTES)
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("pos_offset", [1, 3, 7])
def test_odd_pos_offsets(monkeypatch, backend, route, same, pos_offset):
    """2·pos_offset ≢ 0 (mod Ny): the dy positive-row formula (j − pos_offset) mod Ny is visible.
    x is y (M = Ny = 18, exclude_self, positive in the LSE) and two matrices with M = 23 > Ny = 9
    (the positives wrap: column j is the positive of several rows)."""
    module = torch_kernels if backend == "torch" else triton_kernels
    if backend == "triton":
        _force(monkeypatch, route)
    gen = torch.Generator().manual_seed(pos_offset)
    x = torch.nn.functional.normalize(torch.randn(18 if same else 23, 12, generator=gen), dim=1)
    y = x if same else torch.nn.functional.normalize(torch.randn(9, 12, generator=gen), dim=1)
    n_y = y.shape[0]
    assert (2 * pos_offset) % n_y != 0
    flags = PairwiseLSEFlags(pos_offset, exclude_self=same, include_pos=True, y_negatives=True)
    check(module, x, y, None, torch.tensor(2.0), flags, f"{backend}/{route} offset {pos_offset}")
    # One role at a time, so that dy's positive term is compared on its own even when x is y.
    check(module, x, y, None, torch.tensor(2.0), flags._replace(needs_dx=False), f"{backend}/{route} dy only")


@pytest.mark.parametrize("backend,route", BACKEND_ROUTES)
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_one_gradient_only(monkeypatch, backend, route, mode, needs):
    """needs_dx / needs_dy alone: the other comes back empty, the asked one matches the oracle (the
    dx-only pass weighs by P·2^15, the dy-only pass owns columns; both skip the atomics)."""
    module = torch_kernels if backend == "torch" else triton_kernels
    if backend == "triton":
        _force(monkeypatch, route)
    x, y, bank, scale, flags = case(mode, 17, 20, torch.float32, pos_offset=None if mode == "moco" else 4)
    flags = flags._replace(needs_dx=needs[0], needs_dy=needs[1])
    check(module, x, y, bank, scale, flags, f"{backend}/{route}/{mode} needs={needs}")


@needs_triton
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("m,d", [(6, 3), (37, 70)])
def test_triton_fused_route_fp32_through_the_op(monkeypatch, mode, m, d):
    """fp32 takes the blocked route by default (backward_route); the fused passes, forced, through
    the op and autograd against the oracle, d scale included (read off Σ x·dx)."""
    assert triton_kernels.backward_route(d, torch.float32) == "blocked"
    _force(monkeypatch, "fused")
    assert triton_kernels.backward_route(d, torch.float32) == "fused"
    x, y, bank, scale, flags = make_case(mode, m, d, torch.float32)
    got, want = run_both("triton", x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, torch.float32, what=f"fused/{mode} {name} at M={m}, D={d}")


@needs_triton
@pytest.mark.parametrize("route", ["fused", "blocked"])
@pytest.mark.parametrize("mode", ["simclr", "clip"])
def test_triton_strided_and_unaligned_rows_fp16(monkeypatch, route, mode):
    """A transposed view (VICReg-exp) and an odd D: the backward copies such rows into zero-padded,
    16-byte aligned ones (aligned_rows) and returns gradients of the original width."""
    _force(monkeypatch, route)
    x, y, bank, scale, flags = make_case(mode, 26, 37, torch.float16, strided=True)
    assert not x.is_contiguous() and triton_kernels.aligned_rows(x, 48).shape == (26, 48)
    check(triton_kernels, x, y, bank, scale, flags, f"{route}/{mode} strided, D = 37")


@needs_triton
@pytest.mark.parametrize("route", ["fused", "blocked"])
def test_x_is_y_with_bank(monkeypatch, route):
    """x is y with a bank (no loss does it, the op allows it): the symmetric pass adds the bank to
    dx alone, after storing dy; dx + dy and Σ x·dx still match."""
    _force(monkeypatch, route)
    x, y, bank, scale, flags = case("simclr", 20, 24, torch.float32)
    bank = torch.nn.functional.normalize(torch.randn(6, 24), dim=1)
    check(triton_kernels, x, y, bank, scale, flags, f"{route} x is y + bank")


# ------------------------------------------------------------------------------------------------
# half-precision weights: a power-of-two scale


def _passes():
    """(name, mode, needs_dx, needs_dy, route): every Triton backward pass."""
    return [
        ("sym", "simclr", True, True, "fused"),
        ("rows+atomics", "clip", True, True, "fused"),
        ("rows dx only", "bank+batch", True, False, "fused"),
        ("dy only", "clip", False, True, "fused"),
        ("blocked", "clip", True, True, "blocked"),
        ("blocked x is y", "simclr", True, True, "blocked"),
    ]


@needs_triton
@pytest.mark.parametrize("name,mode,needs_dx,needs_dy,route", _passes())
def test_fp16_cotangent_scaled_by_power_of_two(monkeypatch, name, mode, needs_dx, needs_dy, route):
    """grad · 2^-k gives dx, dy · 2^-k exactly (every entry that stays an fp16 normal): the weights'
    scale is a power of two chosen from max|grad|, so the rounded weights are the same numbers."""
    _force(monkeypatch, route)
    x, y, bank, scale, flags = case(mode, 20, 32, torch.float16)
    flags = flags._replace(needs_dx=needs_dx, needs_dy=needs_dy)
    g_lse, g_pos = _cotangents(20)
    lse, _ = dense_oracle(x, y, bank, scale, flags)
    ref = kernel_backward(triton_kernels, x, y, bank, scale, flags, lse, g_lse, g_pos)
    k = 5
    got = kernel_backward(triton_kernels, x, y, bank, scale, flags, lse, g_lse * 2.0**-k, g_pos * 2.0**-k)
    tiny = torch.finfo(torch.float16).tiny
    for a, b, what in zip(got, ref, ("dx", "dy")):
        assert a.shape == b.shape
        if b.numel() == 0:  # not asked for
            continue
        normal = b.double().abs() >= tiny * 2.0**k
        assert normal.sum() > 0.9 * b.numel(), f"{name} {what}: the test needs mostly normal gradients"
        torch.testing.assert_close(a[normal].double(), b[normal].double() * 2.0**-k, rtol=0, atol=0,
                                   msg=lambda m: f"{name} {what}: {m}")  # fmt: skip


@needs_triton
@pytest.mark.parametrize("name,mode,needs_dx,needs_dy,route", _passes())
def test_fp16_tiny_weights(monkeypatch, name, mode, needs_dx, needs_dy, route):
    """Weights 20 binades down, as P ≈ 1/N is for N ≈ 2^25 columns: the same gradients from
    (lse + 20·ln 2, grad · 2^20) as from (lse, grad), in fp16. The softmax weights P·2^-20 (~2^-25
    here) are below fp16's smallest subnormal; rounded unscaled, or divided by max|grad|, they
    vanish and the gradient with them. With the power-of-two scale they stay fp16 normals."""
    _force(monkeypatch, route)
    x, y, bank, scale, flags = case(mode, 24, 32, torch.float16)
    flags = flags._replace(needs_dx=needs_dx, needs_dy=needs_dy)
    g_lse, g_pos = _cotangents(24)
    lse, want_dx, want_dy = oracle(x, y, bank, scale, flags, g_lse, g_pos)
    c = 20
    got = kernel_backward(triton_kernels, x, y, bank, scale, flags, lse + c * math.log(2), g_lse * 2.0**c,
                          g_pos)  # fmt: skip
    if y is x and needs_dx and needs_dy:
        close(got[0].double() + got[1].double(), want_dx + want_dy, torch.float16, f"{name} dx + dy")
        return
    if needs_dx:
        close(got[0], want_dx, torch.float16, f"{name} dx")
    if needs_dy:
        close(got[1], want_dy, torch.float16, f"{name} dy")
