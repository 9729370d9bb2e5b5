"""The pairwise-LSE op (docs/design.md family 1) on every CPU-testable backend against a dense float64 oracle.

The oracle below materialises the logits and masks them with boolean matrices, a different route
from the kernels (which mask by index arithmetic inside tiles and never build the matrix).
"""

from __future__ import annotations

import pytest
import torch

import fastssl.kernels.torch.pairwise_lse as torch_kernels
from fastssl.ops.pairwise_lse import PairwiseLSE, PairwiseLSEFlags, pairwise_lse
from tests.utils import CPU_BACKENDS, assert_close

# name -> (pos_offset as a function of M, exclude_self, include_pos, y_negatives, same x/y, bank rows)
MODES = {
    "simclr": (lambda m: m // 2, True, True, True, True, 0),
    "clip": (lambda m: 0, False, True, True, False, 0),
    "dcl": (lambda m: m // 2, True, False, True, True, 0),
    "moco": (lambda m: 0, False, True, False, False, 5),
    "bank+batch": (lambda m: 1, False, True, True, False, 3),
    "uniformity": (lambda m: 0, True, False, True, False, 0),
}


def dense_oracle(x, y, bank, scale, flags):
    """(lse, pos) from the full logit matrix, in float64, differentiable."""
    pos_offset, exclude_self, include_pos, y_negatives = flags.pos_offset, flags.exclude_self, flags.include_pos, flags.y_negatives
    x, y, scale = x.double(), y.double(), scale.double()
    m, n_y = x.shape[0], y.shape[0]
    s = scale * x @ y.T
    rows = torch.arange(m, device=x.device)[:, None]
    cols = torch.arange(n_y, device=x.device)[None, :]
    is_pos = cols == (rows + pos_offset) % n_y
    keep = torch.zeros(m, n_y, dtype=torch.bool, device=x.device)
    if y_negatives:
        keep = ~is_pos
        if exclude_self:
            keep &= cols != rows
    if include_pos:
        keep |= is_pos
    logits = s.masked_fill(~keep, float("-inf"))
    if bank is not None:
        logits = torch.cat([logits, scale * x @ bank.double().T], dim=1)
    return torch.logsumexp(logits, dim=1), s[is_pos]


def make_case(mode, m, d, dtype, temperature=0.5, strided=False, device="cpu"):
    offset_fn, exclude_self, include_pos, y_negatives, same, k = MODES[mode]
    x = torch.nn.functional.normalize(torch.randn(m, d), dim=1).to(device)
    if strided:  # a transposed view: read in place through strides
        x = x.T.contiguous().T
    x = x.to(dtype)
    y = x if same else torch.nn.functional.normalize(torch.randn(m, d), dim=1).to(device, dtype)
    bank = torch.nn.functional.normalize(torch.randn(k, d), dim=1).to(device, dtype) if k else None
    scale = torch.tensor(1.0 / temperature, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device=device)
    flags = PairwiseLSEFlags(offset_fn(m), exclude_self, include_pos, y_negatives)
    return x, y, bank, scale, flags


def run_both(backend, x, y, bank, scale, flags, seed=1):
    """Values and gradients (x, y, scale) of the op and the oracle under one random cotangent."""
    gen = torch.Generator().manual_seed(seed)
    m = x.shape[0]
    g_lse = torch.randn(m, generator=gen, dtype=torch.float64).to(x.device)
    g_pos = torch.randn(m, generator=gen, dtype=torch.float64).to(x.device)
    same = x is y

    def grads(fn, cast):
        xr = x.detach().clone().requires_grad_()
        yr = xr if same else y.detach().clone().requires_grad_()
        sr = scale.detach().clone().requires_grad_()
        lse, pos = fn(xr, yr, sr)
        ((lse * cast(g_lse)).sum() + (pos * cast(g_pos)).sum()).backward()
        dy = None if same else yr.grad
        return lse, pos, xr.grad, dy, sr.grad

    got = grads(lambda a, b, s: pairwise_lse(a, b, bank, s, flags, backend=backend), lambda g: g.to(scale.dtype))
    want = grads(lambda a, b, s: dense_oracle(a, b, bank, s, flags), lambda g: g)
    return got, want


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("m,d", [(2, 1), (6, 3), (37, 70), (130, 257)])
def test_matches_oracle_fp32(backend, mode, m, d):
    if backend == "triton" and m * d > 37 * 70:
        pytest.skip("the Triton interpreter is slow; larger shapes run in the cuda tests")
    if mode == "dcl" and m == 2:
        pytest.skip("DCL over one pair has no negatives (the public API requires N >= 2 pairs)")
    x, y, bank, scale, flags = make_case(mode, m, d, torch.float32)
    got, want = run_both(backend, x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, torch.float32, what=f"{backend}/{mode} {name} at M={m}, D={d}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["simclr", "clip", "moco"])
def test_half_precision(backend, dtype, mode):
    x, y, bank, scale, flags = make_case(mode, 33, 40, dtype)
    got, want = run_both(backend, x, y, bank, scale, flags)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, dtype, what=f"{backend}/{mode} {name}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 0.1, 2.0])
def test_temperatures_and_strided_inputs(backend, temperature):
    x, y, bank, scale, flags = make_case("clip", 24, 19, torch.float32, temperature=temperature, strided=True)
    assert not x.is_contiguous()
    got, want = run_both(backend, x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        assert_close(a, b, torch.float32, what=f"{name} at τ={temperature}", scale=1 / temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_unmodified_and_outputs_fresh(backend):
    x, y, bank, scale, flags = make_case("moco", 9, 5, torch.float32)
    copies = [t.clone() for t in (x, y, bank, scale)]
    x.requires_grad_()
    lse, pos = pairwise_lse(x, y, bank, scale, flags, backend=backend)
    (lse.sum() + pos.sum()).backward()
    for before, after in zip(copies, (x.detach(), y, bank, scale)):
        assert torch.equal(before, after)


def test_torch_backend_chunks_agree(monkeypatch):
    """Many small row chunks give the same numbers as one chunk (the chunk loop has no seams)."""
    x, y, bank, scale, flags = make_case("simclr", 50, 7, torch.float64)
    monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", 8 * 100 * 3)  # 3 rows of 100 logits
    small = run_both("torch", x, y, bank, scale, flags)[0]
    monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", 2**30)
    whole = run_both("torch", x, y, bank, scale, flags)[0]
    for a, b in zip(small, whole):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["simclr", "dcl"])
@pytest.mark.parametrize("pos_cotangent", [True, False])
def test_torch_backend_symmetric_backward(monkeypatch, mode, pos_cotangent):
    """x is y in one chunk: the one-GEMM (G + Gᵀ)·x backward equals the two-GEMM one and the oracle,
    with and without a cotangent on the positive logit (the zero case skips the positive's gathers)."""
    x, y, bank, scale, flags = make_case(mode, 40, 160, torch.float64)
    assert x is y and 40 <= torch_kernels._SYMMETRIC_MAX_ROWS and x.shape[1] >= 128  # the shared-GEMM path

    def run():
        xr = x.detach().clone().requires_grad_()
        sr = scale.detach().clone().requires_grad_()
        lse, pos = pairwise_lse(xr, xr, bank, sr, flags, backend="torch")
        g = torch.linspace(-1, 2, lse.shape[0], dtype=lse.dtype)
        ((lse * g).sum() + (pos * g.flip(0)).sum() * pos_cotangent).backward()
        return xr.grad, sr.grad

    shared = run()
    monkeypatch.setattr(torch_kernels, "_SYMMETRIC_MAX_ROWS", 0)
    separate = run()
    xr = x.detach().clone().requires_grad_()
    sr = scale.detach().clone().requires_grad_()
    lse, pos = dense_oracle(xr, xr, bank, sr, flags)
    g = torch.linspace(-1, 2, lse.shape[0], dtype=lse.dtype)
    ((lse * g).sum() + (pos * g.flip(0)).sum() * pos_cotangent).backward()
    for a, b, c, name in zip(shared, separate, (xr.grad, sr.grad), ("dx", "dscale")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{mode} {name}: {m}")
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12, msg=lambda m: f"{mode} {name} vs oracle: {m}")


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_fp64_torch_backend(mode):
    x, y, bank, scale, flags = make_case(mode, 7, 4, torch.float64)
    x.requires_grad_()
    scale.requires_grad_()
    if x is y:  # one operand in both roles: PairwiseLSE takes y=None
        torch.autograd.gradcheck(lambda a, s: PairwiseLSE.apply(a, None, bank, s, flags, "torch"), (x, scale))
    else:
        y.requires_grad_()
        torch.autograd.gradcheck(lambda a, b, s: PairwiseLSE.apply(a, b, bank, s, flags, "torch"), (x, y, scale))


def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) kernels and autograd registration are consistent."""
    x, y, bank, scale, flags = make_case("moco", 6, 5, torch.float32)
    args = (x, y, bank, scale, flags.to_list(), "torch")
    torch.library.opcheck(torch.ops.fastssl.pairwise_lse_fwd.default, args)
    lse, _ = torch.ops.fastssl.pairwise_lse_fwd(*args)
    g = torch.randn(6)
    torch.library.opcheck(torch.ops.fastssl.pairwise_lse_bwd.default, (x, y, bank, scale, lse, g, g) + args[4:])
    # A gradient nobody needs comes back empty, in the fake kernel as in the real one.
    no_dy = flags._replace(needs_dy=False).to_list()
    torch.library.opcheck(torch.ops.fastssl.pairwise_lse_bwd.default, (x, y, bank, scale, lse, g, g, no_dy, "torch"))


def test_needs_a_column():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="at least one column"):
        flags = PairwiseLSEFlags(include_pos=False, y_negatives=False)
        pairwise_lse(x, x, None, torch.tensor(1.0), flags, backend="torch")
