"""The pairwise-sigmoid op (SigLIP's kernel family) on every CPU-testable backend against a dense float64 oracle.

The oracle materialises the logits and a ±1 label matrix built with boolean comparisons — another
route from the kernels, which place the positive by index arithmetic and handle it apart from the tiles.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastssl.ops.pairwise_sigmoid import pairwise_sigmoid
from tests.utils import CPU_BACKENDS, assert_close

# name -> (M, Ny, pos_offset, has_pos): SigLIP's square case; a rank's rows against gathered columns
# (positive at the rank's offset); more rows than columns (the positive wraps); a block with no positive.
MODES = {
    "square": (23, 23, 0, True),
    "gathered": (9, 31, 14, True),
    "wrap": (29, 11, 3, True),
    "no-positive": (13, 19, 0, False),
}


def dense_oracle(x, y, scale, bias, pos_offset, has_pos):
    x, y = x.double(), y.double()
    logits = scale.double() * (x @ y.T) + bias.double()
    rows = torch.arange(x.shape[0])[:, None]
    cols = torch.arange(y.shape[0])[None, :]
    labels = torch.where(has_pos & (cols == (rows + pos_offset) % y.shape[0]), 1.0, -1.0).double()
    return torch.log1p(torch.exp(-labels * logits)).sum(1)


def run_both(backend, x, y, scale, bias, pos_offset, has_pos, seed=1):
    """rows and gradients (x, y, scale, bias) of the op and of the oracle under one random cotangent."""
    grad = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def run(fn, cast):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, scale, bias)]
        rows = fn(*leaves)
        (rows * cast(grad)).sum().backward()
        return rows, [t.grad for t in leaves]

    got = run(lambda *a: pairwise_sigmoid(*a, pos_offset=pos_offset, has_pos=has_pos, backend=backend),
              lambda g: g.to(torch.float64 if x.dtype == torch.float64 else torch.float32))  # fmt: skip
    want = run(lambda xx, yy, s, b: dense_oracle(xx, yy, s, b, pos_offset, has_pos), lambda g: g)
    return got, want


def make(m, ny, d, dtype, scale=10.0, bias=-10.0):
    x = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)
    y = F.normalize(torch.randn(ny, d, dtype=torch.float64), dim=1).to(dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return x, y, torch.tensor(scale, dtype=stat), torch.tensor(bias, dtype=stat)


def check(backend, mode, d, dtype, scale=10.0, bias=-10.0):
    m, ny, off, has_pos = MODES[mode]
    x, y, s, b = make(m, ny, d, dtype, scale, bias)
    (rows, grads), (want, want_grads) = run_both(backend, x, y, s, b, off, has_pos)
    what = f"{mode}/{backend} D={d} t={scale} b={bias}"
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(rows).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(rows, want, dtype, what=f"{what} rows")
    for name, g, w in zip(("dx", "dy"), grads, want_grads):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"{what} {name}", scale=scale)
    # d scale and d bias are sums over M·Ny pairs: their fp32 error grows with the count.
    for name, g, w in zip(("d scale", "d bias"), grads[2:], want_grads[2:]):
        assert_close(g, w, dtype, what=f"{what} {name}", scale=m * ny)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("d", [1, 37, 150])  # 150 > 128: the fp32 D loop in Triton
def test_fp32_matches_dense_oracle(backend, mode, d):
    check(backend, mode, d, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["square", "gathered"])
@pytest.mark.parametrize("d", [24, 300])  # 300 > 256: the half-precision D loop in Triton
def test_half_precision_matches_dense_oracle(backend, dtype, mode, d):
    check(backend, mode, d, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale,bias", [(100.0, 0.0), (100.0, -100.0), (0.5, 20.0), (1e-3, 0.0)])
def test_extreme_scale_and_bias(backend, scale, bias):
    # t = 100 is τ = 0.01: logits reach ±200, where a naive log(1 + exp) or exp(−ℓ) overflows.
    check(backend, "square", 16, torch.float32, scale, bias)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_tiny_weights_keep_precision(backend):
    # Without a positive the gradient is made of negatives' weights σ(ℓ) only; at t = 5, b = −16 they
    # lie in [8e-10, 2e-5]: fp16 subnormals, most below its smallest one (6e-8). Rounded to fp16
    # unscaled for the tensor-core product they would be lost (the kernels scale them by 2^12 first).
    # The gradients are then ~1e-5, below the table's fp16 atol: compare relative to their size.
    m, ny, off, has_pos = MODES["no-positive"]
    x, y, s, b = make(m, ny, 32, torch.float16, 5.0, -16.0)
    (_, grads), (_, want_grads) = run_both(backend, x, y, s, b, off, has_pos)
    for name, g, w in zip(("dx", "dy"), grads, want_grads):
        rel = float((g.double() - w).norm() / w.norm())
        assert rel < 5e-3, f"fp16 {name} with tiny weights: relative error {rel:.2e}"


def test_gradcheck_fp64_torch_backend():
    for mode in MODES:
        m, ny, off, has_pos = MODES[mode]
        x, y, s, b = make(min(m, 6), min(ny, 5), 3, torch.float64, 3.0, -1.0)
        leaves = tuple(t.requires_grad_() for t in (x, y, s, b))
        torch.autograd.gradcheck(
            lambda *a: pairwise_sigmoid(*a, pos_offset=off, has_pos=has_pos, backend="torch"), leaves
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_and_inputs_not_modified(backend):
    x, y, s, b = make(19, 19, 21, torch.float32)
    xt = x.T.contiguous().T  # a transposed view, read through its strides
    before = [t.clone() for t in (xt, y, s, b)]
    (rows, grads), (want, want_grads) = run_both(backend, xt, y, s, b, 0, True)
    assert_close(rows, want, torch.float32, what="strided rows")
    assert_close(grads[0], want_grads[0], torch.float32, what="strided dx", scale=10.0)
    for a, c in zip((xt, y, s, b), before):
        assert torch.equal(a, c)


def test_torch_backend_chunking_matches_one_chunk(monkeypatch):
    import fastssl.kernels.torch.pairwise_lse as lse_kernels

    x, y, s, b = make(37, 37, 8, torch.float64)
    (one, grads_one), _ = run_both("torch", x, y, s, b, 0, True)
    monkeypatch.setattr(lse_kernels, "_CHUNK_BYTES", 5 * 37 * 8)  # 5 rows a chunk: 8 chunks, a ragged last
    (chunked, grads_chunked), _ = run_both("torch", x, y, s, b, 0, True)
    torch.testing.assert_close(chunked, one, rtol=1e-13, atol=1e-13)
    for g, h in zip(grads_chunked, grads_one):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_same_tensor_for_x_and_y_is_refused():
    x, _, s, b = make(4, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="two tensors"):
        pairwise_sigmoid(x, x, s, b, backend="torch")


def test_custom_op_registration_opcheck():
    x, y, s, b = make(7, 5, 4, torch.float32)
    torch.library.opcheck(torch.ops.fastssl.pairwise_sigmoid_fwd.default, (x, y, s, b, 2, True, "torch"))
    grad = torch.randn(7)
    torch.library.opcheck(torch.ops.fastssl.pairwise_sigmoid_bwd.default, (x, y, s, b, grad, 2, True, "torch"))
