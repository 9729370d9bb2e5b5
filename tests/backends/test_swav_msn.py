"""SwaV and MSN on every CPU-testable backend: the prototype-codes ops (docs/design.md, family 4) and the
fused losses, against float64 oracles that materialise every rows x prototypes matrix.

The ops: the LSE pass both ways round, with a centre; the Sinkhorn-Knopp scaling (codes rebuilt from
the returned centre and masses against fastssl.reference's literal iteration); the batch-mean
probabilities and their gradients under a random cotangent. The losses: values and gradients
against the float64 spec (autograd through its materialised scores), odd shapes that cross every
tile and mask, resident D and the D loop, fp32/bf16/fp16, queue / no queue, T = 0. And the memory
promise: with chunks of a few rows no tensor of rows x K entries is ever created, forward or backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
import fastssl.kernels.torch.prototype_ce as torch_kernels
import fastssl.nn as fnn
from fastssl import reference
from fastssl.ops.prototype_codes import prototype_lse, prototype_mean_probs, sinkhorn_scaling
from tests.utils import CPU_BACKENDS, assert_close


def rows(*shape, dtype=torch.float32, gen=None):
    """L2-normalised rows (SwaV normalises its embeddings and prototypes), rounded to dtype."""
    return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=gen), dim=-1).to(dtype)


def _skip_slow_triton(backend, n, k, d):
    if backend == "triton" and n * k * d > 40 * 70 * 300:
        pytest.skip("the Triton interpreter is slow; larger shapes run in the cuda tests")


# --------------------------------------------------------------------------------------------------
# the ops


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m,j,d", [(1, 1, 1), (7, 19, 5), (33, 20, 300)])
@pytest.mark.parametrize("center", [False, True])
def test_prototype_lse_matches_dense(backend, m, j, d, center):
    x, a = rows(m, d), rows(j, d)
    c = 0.3 * torch.randn(j) if center else None
    got = prototype_lse(x, a, c, torch.tensor(7.0), backend)
    shift = 0.0 if c is None else c.double()
    want = torch.logsumexp(7.0 * (x.double() @ a.double().T - shift), dim=1)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32, what=f"{backend} lse", scale=10)


def dense_codes(center, mass, x, w, scale):
    z = float(scale) * (x.double() @ w.double().T - (0.0 if center is None else center.double()))
    q = torch.softmax(z, dim=1)
    return q if mass is None else q * mass.double()[:, None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 3, 2), (13, 29, 7), (40, 17, 300)])
@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_sinkhorn_scaling_gives_the_spec_codes(backend, n, k, d, iterations, epsilon):
    x, w = rows(n, d), rows(k, d)
    center, mass = sinkhorn_scaling(x, w, torch.tensor(1 / epsilon), iterations, backend=backend)
    assert (center is None) == (iterations == 0) and (mass is None) == (iterations > 0)
    want = reference.swav_sinkhorn(x.double() @ w.double().T, iterations, epsilon)
    # A centre error δ moves each code by δ/ε relative: the scale below is 1/ε.
    assert_close(dense_codes(center, mass, x, w, 1 / epsilon), want, torch.float32, what=f"{backend} codes",
                 scale=1 / epsilon)  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_scaling_rows_first_is_msn(backend, iterations):
    x, w = rows(11, 6), rows(23, 6)
    center, mass = sinkhorn_scaling(x, w, torch.tensor(1 / 0.025), iterations, rows_first=True, backend=backend)
    assert mass is None
    probs = torch.softmax(x.double() @ w.double().T / 0.1, dim=1) ** 4  # MSN: τ = 0.1, sharpened at 0.25
    want = reference.msn_sinkhorn(probs / probs.sum(1, keepdim=True), iterations)
    assert_close(dense_codes(center, None, x, w, 1 / 0.025), want, torch.float32, what=backend, scale=40)


def test_sinkhorn_scaling_float64_is_exact():
    x, w = rows(9, 5, dtype=torch.float64), rows(14, 5, dtype=torch.float64)
    for iterations in (0, 2, 3):
        center, mass = sinkhorn_scaling(x, w, torch.tensor(20.0, dtype=torch.float64), iterations, backend="torch")
        torch.testing.assert_close(dense_codes(center, mass, x, w, 20.0),
                                   reference.swav_sinkhorn(x @ w.T, iterations, 0.05), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m,k,d", [(1, 1, 1), (21, 37, 9), (19, 40, 300)])
def test_mean_probs_matches_dense(backend, m, k, d):
    _skip_slow_triton(backend, m, k, d)
    x0, w0 = rows(m, d), rows(k, d)
    h = torch.randn(k, dtype=torch.float64)

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        pbar = fn(x, w)
        (pbar * h.to(pbar)).sum().backward()
        return pbar, x.grad, w.grad

    got = run(lambda x, w: prototype_mean_probs(x, w, torch.tensor(10.0), backend=backend))
    want = run(lambda x, w: torch.softmax(10.0 * (x.double() @ w.double().T), dim=1).mean(0))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b in zip(("pbar", "dx", "dw"), got, want):
        assert_close(a, b, torch.float32, what=f"{backend} {name}", scale=10)


def test_mean_probs_gradcheck_fp64():
    x, w = rows(5, 4, dtype=torch.float64).requires_grad_(), rows(7, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: prototype_mean_probs(x, w, torch.tensor(3.0), backend="torch"),
                                    (x, w))  # fmt: skip


def test_opcheck_torch_ops():
    x, w, c = rows(7, 5), rows(11, 5), torch.randn(11)
    torch.library.opcheck(torch.ops.fastssl.prototype_lse.default, (x, w, c, torch.tensor(3.0), "torch"))
    torch.library.opcheck(torch.ops.fastssl.prototype_mean_probs_fwd.default, (x, w, torch.tensor(3.0), "torch"))
    lse, _ = torch.ops.fastssl.prototype_mean_probs_fwd(x, w, torch.tensor(3.0), "torch")
    torch.library.opcheck(torch.ops.fastssl.prototype_mean_probs_bwd.default,
                          (x, w, torch.tensor(3.0), lse, torch.randn(11), True, True, "torch"))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the SwaV loss

#: (H high-resolution views, L low-resolution views, B, K, D, Bq queue rows or 0)
SWAV_SHAPES = [(2, 0, 1, 1, 1, 0), (2, 3, 5, 19, 6, 0), (2, 2, 7, 45, 20, 9), (1, 1, 6, 11, 300, 4),
               (3, 1, 9, 70, 300, 0)]  # fmt: skip


def swav_case(h, l, b, k, d, bq, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(high=rows(h, b, d, dtype=dtype, gen=gen), low=rows(l, b, d, dtype=dtype, gen=gen),
                prototypes=rows(k, d, dtype=dtype, gen=gen), queue=rows(h, bq, d, dtype=dtype, gen=gen) if bq else None)


def swav_value_and_grads(fn, case, g_out=0.7):
    high, low = case["high"].clone().requires_grad_(), case["low"].clone().requires_grad_()
    w = case["prototypes"].clone().requires_grad_()
    loss = fn(high, low, w)
    (loss * g_out).backward()
    # A view no pair differentiates (L = 0; H = 1, whose one view only gives codes) has zero gradient,
    # which autograd may leave as None.
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (high, low)]
    return loss, *grads, w.grad


def swav_spec(case, **kwargs):
    q = None if case["queue"] is None else case["queue"].double()
    return lambda high, low, w: reference.swav_loss(high.double(), low.double(), w.double(), q, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("shape", SWAV_SHAPES, ids=lambda s: "H{}L{}B{}K{}D{}Q{}".format(*s))
@pytest.mark.parametrize("iterations", [3, 0])
def test_swav_loss_matches_spec(backend, shape, iterations):
    h, l, b, k, d, bq = shape
    _skip_slow_triton(backend, (h + l) * b, k, d)
    case = swav_case(*shape, torch.float32)
    kwargs = dict(temperature=0.1, sinkhorn_iterations=iterations, sinkhorn_epsilon=0.05)

    def ours(high, low, w):
        return fastssl.swav_loss(high, low, w, case["queue"], backend=backend, **kwargs)

    got, want = swav_value_and_grads(ours, case), swav_value_and_grads(swav_spec(case, **kwargs), case)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1:])
    for what, a, b_ in zip(("loss", "d high", "d low", "d prototypes"), got, want):
        assert_close(a, b_, torch.float32, what=f"{backend} {shape} T={iterations} {what}", scale=20)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swav_loss_half_precision(backend, dtype):
    case = swav_case(2, 2, 5, 33, 24, 7, dtype)
    ours = lambda high, low, w: fastssl.swav_loss(high, low, w, case["queue"], backend=backend)  # noqa: E731
    got, want = swav_value_and_grads(ours, case), swav_value_and_grads(swav_spec(case), case)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1:])
    for what, a, b in zip(("loss", "d high", "d low", "d prototypes"), got, want):
        assert_close(a, b, dtype, what=f"{backend} {what}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature,epsilon", [(0.01, 0.01), (2.0, 1.0)])
def test_swav_loss_temperatures(backend, temperature, epsilon):
    case = swav_case(2, 1, 6, 13, 5, 3, torch.float32)
    kwargs = dict(temperature=temperature, sinkhorn_epsilon=epsilon)
    ours = lambda high, low, w: fastssl.swav_loss(high, low, w, case["queue"], backend=backend, **kwargs)  # noqa: E731
    got, want = swav_value_and_grads(ours, case), swav_value_and_grads(swav_spec(case, **kwargs), case)
    assert all(bool(torch.isfinite(x).all()) for x in got)
    for what, a, b in zip(("loss", "d high", "d low", "d prototypes"), got, want):
        assert_close(a, b, torch.float32, what=f"{backend} τ={temperature} ε={epsilon} {what}",
                     scale=1 / min(temperature, epsilon))  # fmt: skip


def test_swav_loss_gradcheck_fp64():
    """The low-resolution views and the queue-free high views' student role: what a numerical gradient
    sees (the codes, which depend on the high views and on W, carry no gradient by design)."""
    case = swav_case(2, 2, 3, 7, 4, 2, torch.float64)
    for backend in ("torch", "reference"):
        fn = lambda low: fastssl.swav_loss(case["high"], low, case["prototypes"], case["queue"], temperature=0.3,  # noqa: E731
                                           sinkhorn_epsilon=0.4, backend=backend)
        assert torch.autograd.gradcheck(fn, (case["low"].clone().requires_grad_(),)), backend


def test_swav_lists_and_stacked_views_agree():
    case = swav_case(2, 3, 4, 9, 5, 3, torch.float64)
    stacked = fastssl.swav_loss(case["high"], case["low"], case["prototypes"], case["queue"], backend="torch")
    listed = fastssl.swav_loss(list(case["high"]), list(case["low"]), case["prototypes"], list(case["queue"]),
                               backend="torch")  # fmt: skip
    torch.testing.assert_close(stacked, listed, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swav_queue_gets_no_gradient(backend):
    case = swav_case(2, 1, 4, 9, 5, 3, torch.float32)
    queue = case["queue"].clone().requires_grad_()
    high = case["high"].clone().requires_grad_()
    fastssl.swav_loss(high, case["low"], case["prototypes"], queue, backend=backend).backward()
    assert queue.grad is None and high.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swav_collapse_and_large_scores_stay_finite(backend):
    """Every crop the same embedding (collapse), and scores of 5 (exp(5/0.05) overflows fp32)."""
    case = swav_case(2, 2, 4, 10, 6, 0, torch.float32)
    collapsed = case["high"][:1, :1].expand_as(case["high"]).contiguous()
    for high, w in ((collapsed, case["prototypes"]), (case["high"], 5 * case["prototypes"])):
        got = swav_value_and_grads(lambda h, l, w: fastssl.swav_loss(h, l, w, backend=backend),
                                   dict(case, high=high, prototypes=w))  # fmt: skip
        assert all(bool(torch.isfinite(x).all()) for x in got)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swav_module_fused_equals_module_on_scores(backend):
    case = swav_case(2, 2, 5, 17, 8, 6, torch.float32)
    module = fnn.SwaVLoss(temperature=0.2, sinkhorn_iterations=2, sinkhorn_epsilon=0.1, backend=backend)
    w = case["prototypes"]
    fused = module.forward_fused(list(case["high"]), list(case["low"]), w, list(case["queue"]))
    on_scores = module(list(case["high"] @ w.T), list(case["low"] @ w.T), list(case["queue"] @ w.T))
    assert_close(fused, on_scores, torch.float32, what=backend)


# --------------------------------------------------------------------------------------------------
# the MSN loss

#: (V views, B, K, D)
MSN_SHAPES = [(1, 1, 1, 1), (2, 5, 19, 6), (3, 7, 45, 20), (1, 6, 11, 300)]


def msn_case(v, b, k, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Unnormalised inputs: MSN normalises anchors, targets and prototypes itself.
    rand = lambda *s: (2 * torch.randn(*s, dtype=torch.float64, generator=gen)).to(dtype)  # noqa: E731
    return dict(anchors=rand(v * b, d), targets=rand(b, d), prototypes=rand(k, d))


def msn_value_and_grads(fn, case, g_out=0.7):
    anchors, w = case["anchors"].clone().requires_grad_(), case["prototypes"].clone().requires_grad_()
    loss = fn(anchors, w)
    (loss * g_out).backward()
    return loss, anchors.grad, w.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("shape", MSN_SHAPES, ids=lambda s: "V{}B{}K{}D{}".format(*s))
@pytest.mark.parametrize("iterations,weight", [(3, 1.0), (0, 0.5), (1, 0.0)])
def test_msn_loss_matches_spec(backend, shape, iterations, weight):
    v, b, k, d = shape
    _skip_slow_triton(backend, v * b, k, d)
    case = msn_case(*shape, torch.float32)
    kwargs = dict(temperature=0.1, sinkhorn_iterations=iterations, regularization_weight=weight)

    def ours(anchors, w):
        return fastssl.msn_loss(anchors, case["targets"], w, 0.25, backend=backend, **kwargs)

    def spec(anchors, w):
        return reference.msn_loss(anchors.double(), case["targets"].double(), w.double(), 0.25, **kwargs)

    got, want = msn_value_and_grads(ours, case), msn_value_and_grads(spec, case)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for what, a, b_ in zip(("loss", "d anchors", "d prototypes"), got, want):
        assert_close(a, b_, torch.float32, what=f"{backend} {shape} T={iterations} λ={weight} {what}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_msn_loss_half_precision(backend, dtype):
    case = msn_case(2, 5, 33, 24, dtype)
    got = msn_value_and_grads(lambda a, w: fastssl.msn_loss(a, case["targets"], w, backend=backend), case)
    want = msn_value_and_grads(lambda a, w: reference.msn_loss(a.double(), case["targets"].double(), w.double()),
                               case)  # fmt: skip
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for what, a, b in zip(("loss", "d anchors", "d prototypes"), got, want):
        assert_close(a, b, dtype, what=f"{backend} {what}", scale=10)


def test_msn_loss_gradcheck_fp64():
    case = msn_case(2, 3, 7, 4, torch.float64)
    for backend in ("torch", "reference"):
        fn = lambda a: fastssl.msn_loss(a, case["targets"], case["prototypes"], 0.5, temperature=0.3,  # noqa: E731
                                        regularization_weight=0.7, backend=backend)
        assert torch.autograd.gradcheck(fn, (case["anchors"].clone().requires_grad_(),)), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_msn_targets_get_no_gradient_and_inputs_stay(backend):
    case = msn_case(2, 4, 9, 5, torch.float32)
    before = {key: t.clone() for key, t in case.items()}
    targets = case["targets"].clone().requires_grad_()
    anchors = case["anchors"].clone().requires_grad_()
    fnn.MSNLoss(backend=backend)(anchors, targets, case["prototypes"]).backward()
    assert targets.grad is None and anchors.grad is not None
    for key, t in before.items():
        assert torch.equal(case[key], t), key


# --------------------------------------------------------------------------------------------------
# memory: no rows x prototypes tensor, forward or backward


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _chunks_of_three_rows(monkeypatch, k_max, dtype):
    monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", 3 * k_max * torch.finfo(dtype).bits // 8)


def test_swav_torch_backend_never_holds_rows_by_prototypes(monkeypatch):
    """Chunks of 3 rows: the same value and gradients as one chunk, and no tensor of as many as B x K
    entries (B = 24 rows per view plus a queue of 30; K = 200 ≫ D = 4)."""
    h, l, b, k, d, bq = 2, 2, 24, 200, 4, 30
    case = swav_case(h, l, b, k, d, bq, torch.float64)
    fn = lambda high, low, w: fastssl.swav_loss(high, low, w, case["queue"], backend="torch")  # noqa: E731
    whole = swav_value_and_grads(fn, case)
    _chunks_of_three_rows(monkeypatch, max(k, b + bq), torch.float64)
    with _LargestTensor() as spy:
        chunked = swav_value_and_grads(fn, case)
    for a, b_ in zip(chunked, whole):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-13)
    assert spy.largest < b * k, f"a tensor of {spy.largest} entries (B x K = {b * k})"
    assert spy.largest <= max(3 * max(k, b + bq), (h + l) * b * d, k * d)


def test_msn_torch_backend_never_holds_rows_by_prototypes(monkeypatch):
    v, b, k, d = 3, 20, 150, 4
    case = msn_case(v, b, k, d, torch.float64)
    fn = lambda anchors, w: fastssl.msn_loss(anchors, case["targets"], w, backend="torch")  # noqa: E731
    whole = msn_value_and_grads(fn, case)
    _chunks_of_three_rows(monkeypatch, max(k, v * b), torch.float64)
    with _LargestTensor() as spy:
        chunked = msn_value_and_grads(fn, case)
    for a, b_ in zip(chunked, whole):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-13)
    assert spy.largest < b * k, f"a tensor of {spy.largest} entries (B x K = {b * k})"


# --------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("name", ["swav", "msn"])
def test_compile_fullgraph_matches_eager(name):
    """The custom ops and the Sinkhorn loop trace without graph breaks (the torch backend here; the
    Triton-backed ops in tests/gpu/test_swav_msn_gpu.py)."""
    torch._dynamo.reset()
    if name == "swav":
        case = swav_case(2, 2, 6, 17, 8, 5, torch.float32)
        fn = lambda x, w: fastssl.swav_loss(x[:2], x[2:], w, case["queue"], backend="torch")  # noqa: E731
        x = torch.cat([case["high"], case["low"]])
        w = case["prototypes"]
    else:
        case = msn_case(3, 4, 13, 8, torch.float32)
        fn = lambda x, w: fastssl.msn_loss(x, case["targets"], w, backend="torch")  # noqa: E731
        x, w = case["anchors"], case["prototypes"]
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(xr, wr)
        loss.backward()
        results.append((loss, xr.grad, wr.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
