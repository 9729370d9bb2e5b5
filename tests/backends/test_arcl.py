"""ArCL (Zhao et al. 2023) on the worst-pair op + the pairwise-LSE op: every backend against an independent
float64 formula (tests/spec/test_reference.py's loop oracle, which autograd differentiates on its own),
N < D and N > D, several temperatures, m ∈ {2, 3, 6}; m = 2 is NT-Xent; the gradient reaches the
selected pair only; ties; list input; modules; bad input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import nn as fnn
from fastssl import reference
from fastssl.ops.worst_pair import worst_pair
from tests.spec.test_reference import oracle_arcl
from tests.utils import CPU_BACKENDS, assert_close

ALL_BACKENDS = CPU_BACKENDS + ["reference"]


def _views(n, m, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, d, generator=gen, dtype=dtype)
    return base + 0.7 * torch.randn(n, m, d, generator=gen, dtype=dtype)  # views of one sample correlate


def _value_and_grad(fn, views):
    v = views.detach().clone().requires_grad_()
    value = fn(v)
    (value * -0.7).backward()  # grad_output ≠ 1
    return value.detach(), v.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("m", [2, 3, 6])
@pytest.mark.parametrize("n,d", [(3, 17), (9, 4)])  # N < D and N > D
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_matches_independent_float64_formula(backend, m, n, d, temperature):
    views = _views(n, m, d, seed=100 * n + 10 * m + d)
    dtype = torch.float64 if backend != "triton" else torch.float32
    got = _value_and_grad(lambda v: fastssl.arcl_loss(v, temperature, backend=backend), views.to(dtype))
    want = _value_and_grad(lambda v: oracle_arcl(v, temperature), views)
    what = f"arcl/{backend} N={n} m={m} D={d} τ={temperature}"
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all(), what
    # The fp32 row of the table: relative 2e-4, atol scaled by the quantity's magnitude.
    assert_close(got[0], want[0], torch.float32, what=f"value {what}", scale=1 / temperature)
    assert_close(got[1], want[1], torch.float32, what=f"grad {what}", scale=float(want[1].abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    views = _views(10, 4, 24, seed=7, dtype=torch.float32).to(dtype)
    got = _value_and_grad(lambda v: fastssl.arcl_loss(v, 0.2, backend=backend), views)
    want = _value_and_grad(lambda v: reference.arcl_loss(v, 0.2), views.double())
    assert got[1].dtype == dtype
    assert_close(got[0], want[0], dtype, what=f"arcl {backend} {dtype} value")
    assert_close(got[1], want[1], dtype, what=f"arcl {backend} {dtype} grad", scale=float(want[1].abs().max()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_two_views_equal_nt_xent(backend):
    views = _views(11, 2, 13, seed=3, dtype=torch.float32)
    arcl = _value_and_grad(lambda v: fastssl.arcl_loss(v, 0.3, backend=backend), views)
    nt = _value_and_grad(lambda v: fastssl.nt_xent_loss(v[:, 0], v[:, 1], 0.3, backend=backend), views)
    torch.testing.assert_close(arcl[0], nt[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(arcl[1], nt[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_only_the_worst_pair_gets_gradient(backend):
    # Views 2.. are never anchors nor negatives: view 2 of sample i gets a gradient iff i's worst
    # pair contains it. Sample 0's worst pair is forced to (1, 2), sample 1's to (0, 3).
    views = _views(6, 4, 8, seed=11, dtype=torch.float32)
    views[0, 2] = -views[0, 1]
    views[1, 3] = -views[1, 0]
    _, grad = _value_and_grad(lambda v: fastssl.arcl_loss(v, 0.5, backend=backend), views)
    z = F.normalize(views.double(), dim=-1)
    for i in range(6):
        sims = {(j, k): float(z[i, j] @ z[i, k]) for j in range(4) for k in range(j + 1, 4)}
        worst = min(sims, key=sims.get)
        for view in (2, 3):
            assert (grad[i, view].abs().max() > 0) == (view in worst), (backend, i, view, worst)
    assert grad[0, 2].abs().max() > 0 and grad[1, 3].abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_worst_pair_op_selection_ties_and_gradient(backend):
    views = F.normalize(_views(7, 5, 9, seed=5, dtype=torch.float32), dim=-1)
    views[3] = views[3, :1]  # sample 3: all five views identical, every pair ties: (0, 1) wins
    v = views.clone().requires_grad_()
    sims = worst_pair(v, backend=backend)
    gram = views.double() @ views.double().transpose(1, 2)
    j, k = torch.triu_indices(5, 5, offset=1)
    expected = gram[:, j, k].min(dim=1).values
    torch.testing.assert_close(sims.double(), expected, rtol=0, atol=1e-6)
    weights = torch.randn(7)
    (grad,) = torch.autograd.grad((sims * weights).sum(), v)
    for i in range(7):
        pair = (0, 1) if i == 3 else divmod(int(torch.argmin(gram[i] + torch.tril(torch.full((5, 5), 9.0)))), 5)
        want = torch.zeros(5, 9)
        want[pair[0]] = weights[i] * views[i, pair[1]]
        want[pair[1]] = weights[i] * views[i, pair[0]]
        torch.testing.assert_close(grad[i], want, rtol=1e-6, atol=1e-7, msg=f"sample {i}, pair {pair}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_views_read_in_place(backend):
    # (m, N, D) storage seen as (N, m, D): the kernels take the strides as given.
    storage = _views(5, 3, 6, seed=2, dtype=torch.float32).transpose(0, 1).contiguous()
    views = storage.transpose(0, 1)
    assert not views.is_contiguous()
    strided, contiguous = (fastssl.arcl_loss(v, backend=backend) for v in (views, views.contiguous()))
    torch.testing.assert_close(strided, contiguous)


def test_list_input_and_module():
    views = _views(8, 3, 5, seed=9, dtype=torch.float32)
    expected = fastssl.arcl_loss(views, 0.4, backend="torch")
    as_list = list(views.unbind(1))
    torch.testing.assert_close(fastssl.arcl_loss(as_list, 0.4, backend="torch"), expected)
    module = fnn.ArCLLoss(0.4, backend="torch")
    torch.testing.assert_close(module(views), expected)
    torch.testing.assert_close(module(as_list), expected)
    torch.testing.assert_close(module(*as_list), expected)
    assert "temperature=0.4" in repr(module)
    torch.testing.assert_close(fnn.ArCLLoss(backend="torch")(views), fastssl.arcl_loss(views, 0.5, backend="torch"))


def test_collapsed_and_zero_views_stay_finite():
    collapsed = torch.randn(1, 1, 16).expand(12, 4, 16).clone()
    zeros = torch.zeros(12, 4, 16)
    for views in (collapsed, zeros):
        value, grad = _value_and_grad(lambda v: fastssl.arcl_loss(v, 0.01, backend="torch"), views)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
    # collapsed: every logit is 1/τ, the loss is log(2N − 1)
    torch.testing.assert_close(fastssl.arcl_loss(collapsed, 0.01, backend="torch"), torch.tensor(23.0).log())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_not_modified(backend):
    views = _views(6, 3, 5, seed=1, dtype=torch.float32).requires_grad_()
    before = views.detach().clone()
    fastssl.arcl_loss(views, backend=backend).backward()
    assert torch.equal(views.detach(), before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_cuda_matches_float64_spec(dtype, m):
    views = _views(300, m, 128, seed=m, dtype=torch.float32).to(dtype)
    want = _value_and_grad(lambda v: reference.arcl_loss(v, 0.1), views.double())
    for backend in [b for b in fastssl.available_backends() if b in ("triton", "cuda")]:
        got = _value_and_grad(lambda v: fastssl.arcl_loss(v, 0.1, backend=backend), views.cuda())
        what = f"arcl {backend} {dtype} m={m}"
        assert_close(got[0], want[0], dtype, what=f"{what} value", scale=10)
        assert_close(got[1], want[1], dtype, what=f"{what} grad", scale=float(want[1].abs().max()))


@pytest.mark.parametrize(
    "views,match",
    [
        (torch.randn(4, 8), "must have 3 dimensions"),
        (torch.randn(4, 1, 8), "m ≥ 2"),
        (torch.randn(1, 3, 8), "at least 2 rows"),
        ([torch.randn(4, 8)], "at least 2 views"),
        ([torch.randn(4, 8), torch.randn(5, 8)], r"same shape.*\(4, 8\).*\(5, 8\)"),
        ([torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)], "float64"),
        (torch.randint(0, 3, (4, 2, 8)), "float16, bfloat16"),
    ],
)
def test_bad_views(views, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastssl.arcl_loss(views)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        fastssl.arcl_loss(torch.randn(4, 3, 8), temperature)
    with pytest.raises(ValueError, match="temperature"):
        fnn.ArCLLoss(temperature)
