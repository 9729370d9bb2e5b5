"""The prototype cross-entropy op (docs/design.md family 4) and the DINO loss on every CPU-testable backend.

The oracle materialises the logit matrices in float64 and differentiates them with autograd: a
different route from the kernels (online LSE over prototype tiles or row chunks, the teacher's
expected prototype, a recomputing backward). Values and gradients under a random cotangent, odd
shapes that hit every mask, resident D and the D loop, fp32/bf16/fp16, τ down to 0.01.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.kernels.torch.prototype_ce as torch_kernels
import fastssl.nn as fnn
from fastssl import reference
from fastssl.kernels import PrototypeCEFlags
from fastssl.ops.prototype_ce import prototype_ce
from tests.utils import CPU_BACKENDS, assert_close

# (N student rows, Nt teacher rows, K prototypes, D): one row each; odd sizes; D past the Triton
# kernels' resident limit (300: the D loop, fp32 and half alike).
SHAPES = [(1, 1, 1, 1), (5, 3, 7, 3), (37, 11, 45, 20), (6, 4, 11, 300), (19, 6, 70, 300)]
OUTPUTS = ("lse_s", "P_t", "ds", "dW")


def dense_oracle(s, w, t, w_t, center, scale_s, scale_t):
    """(lse_s, P_t) from the full logit matrices in float64, differentiable in s and w."""
    s64, w64 = s.double(), w.double()
    lse_s = torch.logsumexp(float(scale_s) * (s64 @ w64.T), dim=1)
    shift = 0.0 if center is None else center.double()
    p_t = torch.softmax(float(scale_t) * (t.double() @ w_t.double().T - shift), dim=1)
    return lse_s, p_t @ w64


def make_case(n, n_t, k, d, dtype, temp_s=0.1, temp_t=0.04, center=True, separate_teacher=True, device="cpu"):
    """DINO-like inputs: L2-normalised rows (the head's bottleneck) and prototypes, cosine logits."""
    def rows(m):
        return F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(device, dtype)

    s, w, t = rows(n), rows(k), rows(n_t)
    w_t = rows(k) if separate_teacher else None
    c = 0.3 * torch.randn(k, dtype=torch.float64, device=device) if center else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(s=s, w=w, t=t, w_t=w_t, center=c, scale_s=torch.tensor(1 / temp_s, dtype=acc, device=device),
                scale_t=torch.tensor(1 / temp_t, dtype=acc, device=device))  # fmt: skip


def run_both(backend, case, seed=1):
    """(lse_s, P_t, ds, dW) of the op and of the oracle under one random cotangent (g, G)."""
    gen = torch.Generator().manual_seed(seed)
    n, n_t, d = case["s"].shape[0], case["t"].shape[0], case["s"].shape[1]
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    big_g = torch.randn(n_t, d, generator=gen, dtype=torch.float64)

    def grads(fn):
        s = case["s"].detach().clone().requires_grad_()
        w = case["w"].detach().clone().requires_grad_()
        lse_s, p_t = fn(s, w)
        ((lse_s * g.to(lse_s)).sum() + (p_t * big_g.to(p_t)).sum()).backward()
        return lse_s, p_t, s.grad, w.grad

    got = grads(lambda s, w: prototype_ce(s, w, case["t"], case["scale_s"], case["scale_t"],
                                          teacher_prototypes=case["w_t"], center=case["center"], backend=backend))
    # Without W_t the teacher scores with W, held fixed (stop-gradient); W's value role keeps its gradient.
    want = grads(lambda s, w: dense_oracle(s, w, case["t"], w.detach() if case["w_t"] is None else case["w_t"],
                                           case["center"], case["scale_s"], case["scale_t"]))  # fmt: skip
    return got, want


def check(got, want, dtype, what, scale=1.0):
    for name, a, b in zip(OUTPUTS, got, want):
        assert_close(a, b, dtype, what=f"{what} {name}", scale=scale)


def _skip_slow_triton(backend, n, k, d):
    if backend == "triton" and n * k * d > 37 * 45 * 20:
        pytest.skip("the Triton interpreter is slow; larger shapes run in the cuda tests")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,n_t,k,d", SHAPES)
@pytest.mark.parametrize("center,separate", [(True, True), (False, False)], ids=["center+W_t", "plain"])
def test_op_matches_oracle_fp32(backend, n, n_t, k, d, center, separate):
    _skip_slow_triton(backend, n, k, d)
    case = make_case(n, n_t, k, d, torch.float32, center=center, separate_teacher=separate)
    got, want = run_both(backend, case)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    check(got, want, torch.float32, f"{backend} N={n} Nt={n_t} K={k} D={d}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,d", [(21, 50, 40), (6, 11, 300)])
def test_op_half_precision(backend, dtype, n, k, d):
    case = make_case(n, 7, k, d, dtype)
    got, want = run_both(backend, case)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # The oracle sees the same rounded inputs; the error is the kernels' rounding of the softmax
    # weights and of the gradients to the input dtype, on gradients of size ~1/τ.
    check(got, want, dtype, f"{backend} D={d}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temp_s,temp_t", [(0.01, 0.01), (0.1, 0.04), (2.0, 1.0)])
def test_op_temperatures(backend, temp_s, temp_t):
    case = make_case(13, 5, 29, 11, torch.float32, temp_s=temp_s, temp_t=temp_t)
    got, want = run_both(backend, case)
    assert all(bool(torch.isfinite(x).all()) for x in got)
    check(got, want, torch.float32, f"{backend} τs={temp_s} τt={temp_t}", scale=1 / min(temp_s, temp_t))


def test_op_gradcheck_fp64():
    case = make_case(6, 4, 9, 5, torch.float64, temp_s=0.3, temp_t=0.2)
    s = case["s"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()

    def fn(s, w):
        return prototype_ce(s, w, case["t"], case["scale_s"], case["scale_t"], teacher_prototypes=case["w_t"],
                            center=case["center"], backend="torch")  # fmt: skip

    assert torch.autograd.gradcheck(fn, (s, w))


def test_torch_backend_chunks(monkeypatch):
    """Row chunks of a few rows (as K = 65,536 forces at scale) give the one-chunk result."""
    case = make_case(23, 9, 31, 7, torch.float64)
    whole = run_both("torch", case)[0]
    monkeypatch.setattr(torch_kernels, "_CHUNK_BYTES", 3 * 31 * 8)  # 3 rows of 31 fp64 logits
    chunked = run_both("torch", case)[0]
    for name, a, b in zip(OUTPUTS, chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=lambda m: f"{name}: {m}")


def test_torch_backend_drops_only_negligible_weights():
    """Logits far below the row max (exp → denormal) are dropped: the result still equals the oracle."""
    case = make_case(4, 3, 6, 3, torch.float32, temp_s=0.01, temp_t=0.01)
    case["s"] = case["s"] * 30  # logit gaps of thousands: most weights underflow
    got, want = run_both("torch", case)
    check(got, want, torch.float32, "large gaps", scale=3000)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_not_modified(backend):
    case = make_case(9, 4, 13, 6, torch.float32)
    before = {k: v.clone() for k, v in case.items() if v is not None}
    run_both(backend, case)
    for k, v in before.items():
        assert torch.equal(case[k], v), f"{k} was modified"


def test_opcheck_torch_ops():
    case = make_case(7, 3, 10, 5, torch.float32)
    args = (case["s"], case["w"], case["t"], case["w_t"], case["center"], case["scale_s"], case["scale_t"])
    for flags in (PrototypeCEFlags(), PrototypeCEFlags(needs_ds=False)):
        torch.library.opcheck(torch.ops.fastssl.prototype_ce_fwd.default, (*args, flags.to_list(), "torch"))
    lse_s, _, lse_t, _ = torch.ops.fastssl.prototype_ce_fwd(*args, PrototypeCEFlags().to_list(), "torch")
    grads = (torch.randn(7), torch.randn(3, 5))
    torch.library.opcheck(torch.ops.fastssl.prototype_ce_bwd.default, (*args, lse_s, lse_t, *grads, "torch"))


@pytest.mark.parametrize("student_grad", [True, False])
def test_forward_computes_the_student_mean_only_for_ds(monkeypatch, student_grad):
    """The forward is asked for P_s (the backward's ds) exactly when s needs a gradient, and a P_s
    it is not asked for comes back empty."""
    calls = []
    real = torch_kernels.prototype_ce_forward

    def spy(*args):
        calls.append(args[-1])
        out = real(*args)
        calls.append(out[1].shape)
        return out

    monkeypatch.setattr(torch_kernels, "prototype_ce_forward", spy)
    case = make_case(7, 3, 10, 5, torch.float32)
    s = case["s"].clone().requires_grad_(student_grad)
    w = case["w"].clone().requires_grad_()
    lse_s, p_t = prototype_ce(s, w, case["t"], case["scale_s"], case["scale_t"], teacher_prototypes=case["w_t"],
                              center=case["center"], backend="torch")  # fmt: skip
    (lse_s.sum() + p_t.sum()).backward()
    assert calls == [PrototypeCEFlags(needs_ds=student_grad), torch.Size([7 if student_grad else 0, 5])]
    assert (s.grad is not None) == student_grad and w.grad is not None


# --------------------------------------------------------------------------------------------------
# the DINO loss


def dino_case(n_student, n_teacher, b, k, d, dtype, separate=True):
    def rows(*shape):
        return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)

    return dict(student=rows(n_student, b, d), teacher=rows(n_teacher, b, d), prototypes=rows(k, d),
                teacher_prototypes=rows(k, d) if separate else None,
                center=0.2 * torch.randn(k, dtype=torch.float64).to(dtype))  # fmt: skip


def dino_value_and_grads(fn, case, g_out=0.7):
    student = case["student"].clone().requires_grad_()
    prototypes = case["prototypes"].clone().requires_grad_()
    loss = fn(student, prototypes)
    (loss * g_out).backward()
    return loss, student.grad, prototypes.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("views", [(4, 2), (2, 2), (1, 3), (3, 1), (5, 2)], ids=lambda v: f"S{v[0]}T{v[1]}")
def test_dino_loss_matches_reference(backend, views):
    case = dino_case(*views, 3, 19, 9, torch.float32, separate=views != (2, 2))
    kwargs = dict(student_temp=0.1, teacher_temp=0.04)

    def ours(s, w):
        return fastssl.dino_loss(s, case["teacher"], w, case["center"], teacher_prototypes=case["teacher_prototypes"],
                                 backend=backend, **kwargs)  # fmt: skip

    def spec(s, w):
        w_t = None if case["teacher_prototypes"] is None else case["teacher_prototypes"].double()
        return reference.dino_loss(s.double(), case["teacher"].double(), w.double(), case["center"].double(),
                                   teacher_prototypes=w_t, **kwargs)  # fmt: skip

    for what, a, b in zip(("loss", "d student", "d prototypes"), dino_value_and_grads(ours, case),
                          dino_value_and_grads(spec, case)):  # fmt: skip
        assert_close(a, b, torch.float32, what=f"{backend} S,T={views} {what}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dino_loss_half_precision(backend, dtype):
    case = dino_case(4, 2, 5, 33, 24, dtype)

    def ours(s, w):
        return fastssl.dino_loss(s, case["teacher"], w, case["center"], teacher_prototypes=case["teacher_prototypes"],
                                 backend=backend)  # fmt: skip

    def spec(s, w):
        return reference.dino_loss(s.double(), case["teacher"].double(), w.double(), case["center"].double(),
                                   teacher_prototypes=case["teacher_prototypes"].double())  # fmt: skip

    got, want = dino_value_and_grads(ours, case), dino_value_and_grads(spec, case)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for what, a, b in zip(("loss", "d student", "d prototypes"), got, want):
        assert_close(a, b, dtype, what=f"{backend} {what}", scale=10)


def test_dino_loss_gradcheck_fp64():
    case = dino_case(3, 2, 2, 7, 4, torch.float64)
    teacher, w_t, center = case["teacher"], case["teacher_prototypes"], case["center"]
    for backend in ("torch", "reference"):
        def fn(s, w):
            return fastssl.dino_loss(s, teacher, w, center, student_temp=0.3, teacher_temp=0.2, teacher_prototypes=w_t,
                                     normalize_prototypes=True, backend=backend)  # fmt: skip

        inputs = (case["student"].clone().requires_grad_(), case["prototypes"].clone().requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dino_loss_low_temperature_and_collapse(backend):
    """τ = 0.01 on collapsed embeddings (every crop the same) and on random ones: finite value and gradients."""
    for collapse in (True, False):
        case = dino_case(4, 2, 3, 17, 8, torch.float32)
        if collapse:
            case["student"] = case["student"][:1, :1].expand_as(case["student"]).contiguous()
            case["teacher"] = case["student"][:2].clone()
        got = dino_value_and_grads(lambda s, w: fastssl.dino_loss(s, case["teacher"], w, student_temp=0.01,
                                                                  teacher_temp=0.01, backend=backend), case)
        assert all(bool(torch.isfinite(x).all()) for x in got), f"collapse={collapse}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dino_loss_teacher_gets_no_gradient(backend):
    case = dino_case(3, 2, 4, 11, 6, torch.float32, separate=False)
    teacher = case["teacher"].clone().requires_grad_()
    prototypes = case["prototypes"].clone().requires_grad_()
    loss = fastssl.dino_loss(case["student"], teacher, prototypes, backend=backend)
    loss.backward()
    assert teacher.grad is None
    # W still gets the gradient of the teacher's average P_t = p_tᵀW (the value role), p_t held fixed:
    w_fixed_scores = prototypes.detach().clone().requires_grad_()
    spec = reference.dino_loss(case["student"], teacher.detach(), w_fixed_scores,
                               teacher_prototypes=prototypes.detach())
    spec.backward()
    assert_close(prototypes.grad, w_fixed_scores.grad, torch.float32, what="dW with W_t = W", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dino_loss_lists_normalisation_and_batch_center(backend):
    case = dino_case(3, 2, 4, 13, 5, torch.float32)
    raw_w = case["prototypes"] * torch.rand(13, 1) * 3  # a weight-normalised layer's raw v
    raw_w_t = case["teacher_prototypes"] * 2.0
    out = fastssl.dino_loss(list(case["student"]), list(case["teacher"]), raw_w, case["center"][None, None],
                            teacher_prototypes=raw_w_t, normalize_prototypes=True, return_batch_center=True,
                            backend=backend)  # fmt: skip
    assert isinstance(out, fastssl.functional.DINOLossOutput)
    spec = reference.dino_loss(case["student"], case["teacher"], F.normalize(raw_w, dim=1), case["center"],
                               teacher_prototypes=F.normalize(raw_w_t, dim=1))  # fmt: skip
    assert_close(out.loss, spec, torch.float32, what="loss")
    logits = case["teacher"].double() @ F.normalize(raw_w_t.double(), dim=1).T  # (T, B, K)
    assert_close(out.batch_center, logits.mean(dim=(0, 1)), torch.float32, what="batch centre")
    assert not out.batch_center.requires_grad


def test_dino_loss_auto_is_torch_on_cpu():
    case = dino_case(3, 2, 4, 13, 5, torch.float32)
    args = (case["student"], case["teacher"], case["prototypes"], case["center"])
    assert torch.equal(fastssl.dino_loss(*args), fastssl.dino_loss(*args, backend="torch"))


def test_dino_loss_compile_fullgraph():
    torch._dynamo.reset()
    case = dino_case(4, 2, 3, 21, 8, torch.float32)

    def fn(s, w):
        return fastssl.dino_loss(s, case["teacher"], w, case["center"], teacher_prototypes=case["teacher_prototypes"],
                                 backend="torch")  # fmt: skip

    eager = dino_value_and_grads(fn, case)
    compiled = dino_value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), case)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# fastssl.nn.DINOLoss: forward on logits and forward_fused on embeddings agree, centre included


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dino_module_fused_equals_logits(backend):
    k, d, b = 23, 8, 4
    w_t = F.normalize(torch.randn(k, d), dim=1)
    on_logits = fnn.DINOLoss(k, warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=3, center_momentum=0.8)
    fused = fnn.DINOLoss(k, warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=3, center_momentum=0.8,
                         backend=backend)  # fmt: skip
    for epoch in range(4):
        w = F.normalize(torch.randn(k, d), dim=1)
        teacher = [F.normalize(torch.randn(b, d), dim=1) for _ in range(2)]
        student = [F.normalize(torch.randn(b, d), dim=1) for _ in range(5)]
        results = []
        for run in ("logits", "fused"):
            ws = w.clone().requires_grad_()
            ss = [x.clone().requires_grad_() for x in student]
            if run == "logits":
                loss = on_logits([t @ w_t.T for t in teacher], [x @ ws.T for x in ss], epoch=epoch)
            else:
                loss = fused.forward_fused(teacher, ss, ws, w_t, epoch=epoch)
            loss.backward()
            results.append((loss, ws.grad, *(x.grad for x in ss)))
        for a, b_ in zip(*results):
            assert_close(b_, a, torch.float32, what=f"epoch {epoch}", scale=10)
        assert_close(fused.center, on_logits.center, torch.float32, what=f"centre after epoch {epoch}")
    assert fused.center.shape == (1, 1, k) and bool(fused.center.abs().sum() > 0)
    assert "center" in fused.state_dict()
    assert f"backend={backend!r}" in repr(fused)


# --------------------------------------------------------------------------------------------------
# iBOT's masked-patch loss: the same op, token i of the student against token i of the teacher


def ibot_case(dtype, b=4, h=3, w=5, k=29, d=12):
    mask = torch.rand(b, h, w) < 0.4
    mask[-1] = False  # an image without masked tokens
    m = int(mask.sum())

    def rows(*shape):
        return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)

    return dict(student=rows(m, d), teacher=rows(m, d), prototypes=rows(k, d), teacher_prototypes=rows(k, d),
                center=0.2 * torch.randn(k, dtype=torch.float64).to(dtype), mask=mask)  # fmt: skip


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in CPU_BACKENDS for dt in (torch.float32, torch.bfloat16)]
                         + [("reference", torch.float32)])  # fmt: skip
def test_ibot_patch_loss_matches_reference(backend, dtype):
    case = ibot_case(dtype)
    rest = dict(mask=case["mask"], center=case["center"], teacher_prototypes=case["teacher_prototypes"])

    def ours(s, w):
        return fastssl.ibot_patch_loss(s, case["teacher"], w, backend=backend, **rest)

    def spec(s, w):
        return reference.ibot_patch_loss(s.double(), case["teacher"].double(), w.double(), case["mask"],
                                         case["center"].double(),
                                         teacher_prototypes=rest["teacher_prototypes"].double())  # fmt: skip

    for what, a, b in zip(("loss", "d student", "d prototypes"), dino_value_and_grads(ours, case),
                          dino_value_and_grads(spec, case)):  # fmt: skip
        assert_close(a, b, dtype, what=f"{backend} {what}", scale=10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ibot_module_fused_equals_logits(backend):
    case = ibot_case(torch.float32)
    k = case["prototypes"].shape[0]
    on_logits, fused = fnn.IBOTPatchLoss(k, center_momentum=0.6), fnn.IBOTPatchLoss(k, center_momentum=0.6,
                                                                                    backend=backend)
    for step in range(2):
        results = []
        for run in ("logits", "fused"):
            s = case["student"].clone().requires_grad_()
            w = case["prototypes"].clone().requires_grad_()
            if run == "logits":
                loss = on_logits(case["teacher"] @ case["teacher_prototypes"].T, s @ w.T, case["mask"],
                                 teacher_temp=0.05)  # fmt: skip
            else:
                loss = fused.forward_fused(case["teacher"], s, case["mask"], w, case["teacher_prototypes"],
                                           teacher_temp=0.05)  # fmt: skip
            loss.backward()
            results.append((loss, s.grad, w.grad))
        for a, b in zip(*results):
            assert_close(b, a, torch.float32, what=f"step {step}", scale=10)
        assert_close(fused.center.value, on_logits.center.value, torch.float32, what=f"centre after step {step}")
    assert set(fused.state_dict()) == {"center.center"}
