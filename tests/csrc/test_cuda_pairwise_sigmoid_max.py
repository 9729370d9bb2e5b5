"""backend="cuda" for the pairwise-sigmoid op (SigLIP) and the pairwise-max op (KoLeo) on a GPU
(docs/design.md layer 5; skipped, with the reason, without one).

Pairwise sigmoid: rows and every gradient (dx, dy, d scale, d bias) against a dense float64 oracle
(tests/backends/test_pairwise_sigmoid.py's: logits and a ±1 label matrix built by comparison) and
against the torch backend on the same CUDA tensors; fp32, bf16, fp16; shapes that cross the 64-row
tiles raggedly, D that is resident and D that streams (past 128 for fp32 and 256 for bf16/fp16) and
spans several 128-wide output slices; pos_offset with more columns than rows and with wrapping rows,
has_pos off; scale up to 100 (τ = 0.01); collapsed and zero rows; non-contiguous inputs; tiny fp16
weights; the public loss and module.

Pairwise max: exact selections on integer-valued inputs (every dot product exact in every dtype) against
the torch kernel, with ties across tiles, NaN, the self mask, a single column; selections on real data
within the dtype's tolerance of the float64 maximum; strided inputs read in place; the gradient through
the selected pair; KoLeo against the float64 spec.

Sizes are small (a few hundred rows): the GPU session runs these in seconds, with no autotuning.
The helpers take (backend, device), so the same checks can be run on the torch backend on a CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import reference
from fastssl.ops.pairwise_max import pairwise_max
from fastssl.ops.pairwise_sigmoid import pairwise_sigmoid
from tests.backends.test_new_losses import _pairs_of_neighbours
from tests.backends.test_pairwise_sigmoid import dense_oracle
# The fixture: skip without a GPU, fail when a GPU is present but the extension does not load.
from tests.csrc.test_cuda_backend import cuda_backend  # noqa: F401
from tests.utils import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ------------------------------------------------------------------------------------------------
# pairwise sigmoid

#: name -> (M, Ny, pos_offset, has_pos): SigLIP's square case over two ragged row tiles; a rank's rows
#: against gathered columns (positive at an offset past the first column tile); more rows than columns
#: (the positive wraps, and dy gathers several rows per column); a ring block with no positive.
SIGMOID_MODES = {
    "square": (70, 70, 0, True),
    "gathered": (33, 131, 70, True),
    "wrap": (150, 37, 5, True),
    "no-positive": (65, 90, 0, False),
}


def _sigmoid_inputs(m, ny, d, dtype, kind="random", seed=0):
    """Normalised rows (float64, CPU) rounded to `dtype`: random, collapsed (one row repeated in both
    towers) or with zero rows (every third row of x, row 1 of y)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(ny, d, generator=gen, dtype=torch.float64), dim=1)
    if kind == "collapsed":
        x, y = x[:1].expand(m, d).clone(), x[:1].expand(ny, d).clone()
    elif kind == "zero":
        x[::3] = 0
        y[1] = 0
    return x.to(dtype), y.to(dtype)


def _sigmoid_run(fn, x, y, scale, bias, grad):
    """fn's rows and the gradients of Σ grad·rows w.r.t. (x, y, scale, bias); x, y keep their strides."""
    leaves = [t.detach().requires_grad_() for t in (x, y, scale, bias)]
    rows = fn(*leaves)
    grads = torch.autograd.grad((rows * grad.to(rows.dtype)).sum(), leaves)
    return rows.detach(), grads


def check_sigmoid(backend, device, mode, d, dtype, scale=10.0, bias=-10.0, kind="random", strided=False):
    m, ny, off, has_pos = SIGMOID_MODES[mode]
    x, y = _sigmoid_inputs(m, ny, d, dtype, kind)
    grad = torch.randn(m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s64, b64 = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    want, want_grads = _sigmoid_run(lambda *a: dense_oracle(*a, off, has_pos), x.double(), y.double(), s64, b64, grad)

    xd, yd = x.to(device), y.to(device)
    if strided:  # x through a transposed copy (column stride ≠ 1), y a row-step slice of a wider matrix
        xd = xd.T.contiguous().T
        wide = torch.zeros(2 * ny, d + 3, dtype=dtype, device=device)
        wide[::2, 1 : d + 1] = yd
        yd = wide[::2, 1 : d + 1]
        assert not xd.is_contiguous() and not yd.is_contiguous()
    s32, b32 = s64.float().to(device), b64.float().to(device)

    def op(backend_name):
        return _sigmoid_run(lambda *a: pairwise_sigmoid(*a, pos_offset=off, has_pos=has_pos, backend=backend_name),
                            xd, yd, s32, b32, grad.to(device))  # fmt: skip

    rows, grads = op(backend)
    what = f"{backend} {mode} M={m} Ny={ny} D={d} t={scale} b={bias} {kind}{' strided' if strided else ''}"
    assert rows.dtype == torch.float32 and rows.device.type == torch.device(device).type, what
    assert torch.isfinite(rows).all() and all(torch.isfinite(g).all() for g in grads), what
    assert_close(rows, want, dtype, what=f"{what} rows")
    for name, g, w in zip(("dx", "dy"), grads, want_grads):
        assert g.dtype == dtype and g.shape == w.shape, (name, g.dtype, g.shape)
        assert_close(g, w, dtype, what=f"{what} {name}", scale=scale)
    # d scale and d bias are sums over M·Ny pairs: their fp32 error grows with the count.
    for name, g, w in zip(("d scale", "d bias"), grads[2:], want_grads[2:]):
        assert_close(g, w, dtype, what=f"{what} {name}", scale=m * ny)
    if backend != "torch":  # the same op on the torch backend, on the same tensors
        rows_t, grads_t = op("torch")
        assert_close(rows, rows_t, dtype, what=f"{what} rows vs torch")
        for name, g, w in zip(("dx", "dy", "d scale", "d bias"), grads, grads_t):
            assert g.dtype == w.dtype
            assert_close(g, w, dtype, what=f"{what} {name} vs torch", scale=scale if name in ("dx", "dy") else m * ny)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(SIGMOID_MODES))
@pytest.mark.parametrize("d", [1, 37, 300])  # resident; resident; streamed in 32-wide chunks, 3 output slices
def test_pairwise_sigmoid_cuda(cuda_backend, dtype, mode, d):
    check_sigmoid(cuda_backend, "cuda", mode, d, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["square", "wrap"])
def test_pairwise_sigmoid_cuda_fp32_streamed_d(cuda_backend, mode):
    check_sigmoid(cuda_backend, "cuda", mode, 150, torch.float32)  # 150 > 128: fp32's own tile streams


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,bias", [(100.0, 0.0), (100.0, -100.0), (0.5, 20.0)])
def test_pairwise_sigmoid_cuda_extreme_scale_and_bias(cuda_backend, dtype, scale, bias):
    # t = 100 is τ = 0.01: logits reach ±200, where a naive log(1 + exp) or exp(−ℓ) overflows.
    check_sigmoid(cuda_backend, "cuda", "gathered", 40, dtype, scale, bias)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["collapsed", "zero"])
def test_pairwise_sigmoid_cuda_collapsed_and_zero_rows(cuda_backend, dtype, kind):
    check_sigmoid(cuda_backend, "cuda", "square", 24, dtype, 100.0, -10.0, kind=kind)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["gathered", "wrap"])
def test_pairwise_sigmoid_cuda_strided(cuda_backend, dtype, mode):
    check_sigmoid(cuda_backend, "cuda", mode, 40, dtype, strided=True)


@pytest.mark.cuda
def test_pairwise_sigmoid_cuda_fp16_tiny_weights_keep_precision(cuda_backend):
    # No positive: the gradient is made of negatives' weights σ(ℓ) ∈ [8e-10, 2e-5] only (t = 5,
    # b = −16), fp16 subnormals that would be lost if rounded to fp16 unscaled for the tensor cores.
    # The gradients are ~1e-5, below the table's fp16 atol: compare relative to their size.
    m, ny, off, has_pos = SIGMOID_MODES["no-positive"]
    x, y = _sigmoid_inputs(m, ny, 32, torch.float16)
    grad = torch.randn(m, dtype=torch.float64)
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-16.0, dtype=torch.float64)
    _, want = _sigmoid_run(lambda *a: dense_oracle(*a, off, has_pos), x.double(), y.double(), s, b, grad)
    _, got = _sigmoid_run(lambda *a: pairwise_sigmoid(*a, pos_offset=off, has_pos=has_pos, backend=cuda_backend),
                          x.cuda(), y.cuda(), s.float().cuda(), b.float().cuda(), grad.cuda())  # fmt: skip
    for name, g, w in zip(("dx", "dy"), got, want):
        rel = float((g.double().cpu() - w).norm() / w.norm())
        assert rel < 5e-3, f"fp16 {name} with tiny weights: relative error {rel:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(2, 1), (70, 33), (200, 300)])
def test_siglip_loss_cuda_matches_float64_spec(cuda_backend, dtype, n, d):
    gen = torch.Generator().manual_seed(n + d)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t, b = 10.0, -10.0

    def run(fn, a, c, stat, device):
        leaves = [a.detach().clone().to(device).requires_grad_(), c.detach().clone().to(device).requires_grad_(),
                  torch.tensor(t, dtype=stat, device=device, requires_grad=True),
                  torch.tensor(b, dtype=stat, device=device, requires_grad=True)]  # fmt: skip
        loss = fn(*leaves)
        return loss.detach(), torch.autograd.grad(loss * 1.7, leaves)

    value, grads = run(lambda *a: fastssl.siglip_loss(*a, backend=cuda_backend), z1.to(dtype), z2.to(dtype),
                       torch.float32, "cuda")  # fmt: skip
    want, want_grads = run(reference.siglip_loss, z1.to(dtype).double(), z2.to(dtype).double(), torch.float64, "cpu")
    what = f"siglip cuda {dtype} N={n} D={d}"
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert_close(value, want, dtype, what=f"{what} loss", scale=max(1.0, abs(float(want))))
    for name, g, w in zip(("dz1", "dz2"), grads[:2], want_grads[:2]):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"{what} {name}", scale=t)
    for name, g, w in zip(("dt", "db"), grads[2:], want_grads[2:]):
        assert_close(g, w, dtype, what=f"{what} {name}", scale=n)


@pytest.mark.cuda
def test_siglip_module_cuda_learnable_parameters_match_torch_backend(cuda_backend):
    z1, z2 = torch.randn(90, 48, device="cuda"), torch.randn(90, 48, device="cuda")
    grads = {}
    for backend in (cuda_backend, "torch"):
        module = fastssl.nn.SigLIPLoss(backend=backend).cuda()
        loss = module(z1, z2)
        loss.backward()
        grads[backend] = (loss.detach(), module.logit_scale.grad, module.logit_bias.grad)
    for name, a, b in zip(("loss", "dL/dt'", "dL/db"), grads[cuda_backend], grads["torch"]):
        assert_close(a, b, torch.float32, what=f"SigLIPLoss cuda vs torch {name}", scale=90)


# ------------------------------------------------------------------------------------------------
# pairwise max


def _integer_rows(rows, d, seed):
    """Entries in {−2, ..., 2}: every dot product is an integer below 2^11, exact in bf16/fp16/TF32
    operands and fp32 sums, so every backend sees the same similarities and ties are exact."""
    return torch.randint(-2, 3, (rows, d), generator=torch.Generator().manual_seed(seed)).double()


def _max_oracle(x, y, exclude_self):
    """torch.max/argmax over the dense float64 similarities (first maximum; NaN above every number)."""
    sims = x.double().cpu() @ y.double().cpu().T
    if exclude_self:
        k = min(x.shape[0], y.shape[0])
        sims[torch.arange(k), torch.arange(k)] = float("-inf")
    return sims.max(dim=1).values, sims.argmax(dim=1)


def check_max_exact(backend, device, x, y, exclude_self, what):
    """The selection and its value equal the float64 oracle's (torch.max/argmax), exactly;
    y is None: the columns are x itself (one tensor, KoLeo's call)."""
    xd = x.to(device)
    got_value, got_index = pairwise_max(xd, xd if y is None else y.to(device), exclude_self=exclude_self,
                                        backend=backend)  # fmt: skip
    want_value, want_index = _max_oracle(x, x if y is None else y, exclude_self)
    assert got_index.dtype == torch.long and got_value.dtype == torch.float32, what
    assert torch.equal(got_index.cpu(), want_index), f"{what}: index {got_index.tolist()} != {want_index.tolist()}"
    torch.testing.assert_close(got_value.cpu().double(), want_value, rtol=0, atol=0, equal_nan=True, msg=what)
    if backend != "torch":  # and the torch kernel's, on the same tensors
        torch_value, torch_index = pairwise_max(xd, xd if y is None else y.to(device), exclude_self=exclude_self,
                                                backend="torch")  # fmt: skip
        assert torch.equal(got_index, torch_index), f"{what}: index differs from the torch kernel's"
        torch.testing.assert_close(got_value, torch_value.float(), rtol=0, atol=0, equal_nan=True, msg=what)


def check_max_ties_nan_and_self(backend, device, dtype, d):
    y = _integer_rows(131, d, seed=d)
    y[70] = y[3]  # copies of column 3 in the second and third 64-column tiles
    y[130] = y[3]
    x = torch.cat([y[3:4], _integer_rows(149, d, seed=d + 1)])  # row 0's best is column 3, tied thrice
    for exclude_self in (False, True):
        check_max_exact(backend, device, x.to(dtype), y.to(dtype), exclude_self, f"{backend} {dtype} D={d} "
                        f"ties exclude_self={exclude_self}")  # fmt: skip
    assert int(pairwise_max(x.to(dtype).to(device), y.to(dtype).to(device), backend=backend)[1][0]) == 3
    check_max_exact(backend, device, y.to(dtype), None, True, f"{backend} {dtype} D={d} y is x")
    # NaN ranks above every number, and the first NaN wins: a NaN row of x selects column 0; a NaN
    # column of y is every other row's selection.
    xn, yn = x.clone(), y.clone()
    xn[5, 0] = float("nan")
    yn[9, d - 1] = float("nan")
    for exclude_self in (False, True):
        check_max_exact(backend, device, xn.to(dtype), yn.to(dtype), exclude_self, f"{backend} {dtype} D={d} NaN "
                        f"exclude_self={exclude_self}")  # fmt: skip
    # every similarity 0: row 0 selects column 1 (itself excluded), every other row column 0
    zeros = torch.zeros(70, d, dtype=dtype)
    check_max_exact(backend, device, zeros, None, True, f"{backend} {dtype} zeros")
    # a single column, excluded for row 0: (−inf, 0), as the torch kernel
    check_max_exact(backend, device, x[:5].to(dtype), y[:1].to(dtype), True, f"{backend} {dtype} one column")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 37, 150, 300])  # resident for all; fp32 streams past 128; half past 256
def test_pairwise_max_cuda_exact_ties_nan_self(cuda_backend, dtype, d):
    check_max_ties_nan_and_self(cuda_backend, "cuda", dtype, d)


def check_max_real(backend, device, dtype, m, ny, d, exclude_self):
    """Normal data (near ties possible): the value is the float64 maximum to the dtype's tolerance,
    and the selected column's float64 similarity is that maximum to the same tolerance."""
    gen = torch.Generator().manual_seed(m + ny + d)
    x = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    y = x if ny == m else F.normalize(torch.randn(ny, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    xd = x.to(device)
    yd = xd if y is x else y.to(device)
    value, index = pairwise_max(xd, yd, exclude_self=exclude_self, backend=backend)
    want_value, _ = _max_oracle(x, y, exclude_self)
    sims = x.double() @ y.double().T
    what = f"{backend} {dtype} M={m} Ny={ny} D={d} exclude_self={exclude_self}"
    assert_close(value, want_value, dtype, what=f"{what} value")
    assert_close(sims.gather(1, index.cpu()[:, None]).squeeze(1), want_value, dtype, what=f"{what} selected column")
    if exclude_self:  # the self column is never selected (every row has another column here)
        rows = torch.arange(min(m, ny))
        assert (index.cpu()[rows] != rows).all(), what


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,ny,d", [(2, 2, 1), (130, 130, 64), (70, 200, 300), (257, 33, 129)])
def test_pairwise_max_cuda_real_data(cuda_backend, dtype, m, ny, d):
    for exclude_self in (True, False):
        check_max_real(cuda_backend, "cuda", dtype, m, ny, d, exclude_self)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_max_cuda_reads_strided_operands(cuda_backend, dtype):
    x = torch.randn(40, 150, device="cuda").to(dtype).T  # (150, 40), strides (1, 150)
    y = torch.randn(200, 60, device="cuda").to(dtype)[3:199:2, 7:47]  # (98, 40), strides (120, 1), offset start
    assert not x.is_contiguous() and not y.is_contiguous()
    for exclude_self in (False, True):
        got = pairwise_max(x, y, exclude_self=exclude_self, backend=cuda_backend)
        want = pairwise_max(x.contiguous(), y.contiguous(), exclude_self=exclude_self, backend=cuda_backend)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), dtype  # the same tiles, bit for bit


@pytest.mark.cuda
@pytest.mark.parametrize("same", [True, False])
def test_pairwise_max_cuda_gradient_flows_through_the_selected_pair(cuda_backend, same):
    x = torch.randn(90, 24, device="cuda", requires_grad=True)
    y = x if same else torch.randn(70, 24, device="cuda", requires_grad=True)
    weights = torch.randn(90, device="cuda")
    value, index = pairwise_max(x, y, exclude_self=same, backend=cuda_backend)
    leaves = (x,) if same else (x, y)
    got = torch.autograd.grad((value * weights).sum(), leaves)
    xd = x.detach().clone().requires_grad_()
    yd = xd if same else y.detach().clone().requires_grad_()
    want = torch.autograd.grad(((xd * yd[index]).sum(1) * weights).sum(), (xd,) if same else (xd, yd))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(3, 17), (130, 40), (300, 300)])
def test_koleo_loss_cuda_matches_float64_spec(cuda_backend, dtype, n, d):
    # Rows in clear neighbour pairs, so that rounding to bf16/fp16 cannot change a selection.
    x = _pairs_of_neighbours(n, d, seed=n, dtype=dtype)
    leaf = x.cuda().requires_grad_()
    value = fastssl.koleo_loss(leaf, backend=cuda_backend)
    (grad,) = torch.autograd.grad(value * -0.7, leaf)
    ref_leaf = x.double().requires_grad_()
    want = reference.koleo_loss(ref_leaf)
    (want_grad,) = torch.autograd.grad(want * -0.7, ref_leaf)
    what = f"koleo cuda {dtype} N={n} D={d}"
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert_close(value, want, dtype, what=f"{what} value", scale=max(1.0, float(want.abs())))
    assert_close(grad, want_grad, dtype, what=f"{what} grad", scale=float(want_grad.abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_ops_opcheck_on_cuda(cuda_backend, dtype):
    """The custom ops' schemas and fake kernels (shapes, dtypes, strides) agree with the cuda kernels."""
    x = torch.randn(70, 24, device="cuda").to(dtype)
    y = torch.randn(90, 24, device="cuda").to(dtype)
    s, b = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    grad = torch.randn(70, device="cuda")
    torch.library.opcheck(torch.ops.fastssl.pairwise_sigmoid_fwd.default, (x, y, s, b, 3, True, cuda_backend))
    torch.library.opcheck(torch.ops.fastssl.pairwise_sigmoid_bwd.default, (x, y, s, b, grad, 3, True, cuda_backend))
    for args in ((x, y, False, cuda_backend), (x, None, True, cuda_backend)):
        torch.library.opcheck(torch.ops.fastssl.pairwise_max_fwd.default, args)
