"""fastssl's DINO loss against lightly 1.6's `DINOLoss`: values, gradients and centre updates, fp32.

docs/design.md: where lightly has the loss, fastssl's value, defaults and argument names must match it.
lightly is not a dependency (nor installed in CI): the module is skipped, with the reason, without it.
Run it in a virtualenv with lightly (README, "Checking against lightly"): ``PYTHONPATH=. python -m pytest tests/spec/test_dino_lightly.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

lightly_loss = pytest.importorskip(
    "lightly.loss", reason="lightly is not installed; these tests compare fastssl's DINO loss with lightly 1.6"
)

import fastssl  # noqa: E402
import fastssl.nn as fnn  # noqa: E402
from fastssl import reference  # noqa: E402

RTOL = 1e-5


def close(ours, theirs, what):
    atol = 1e-6 * max(1.0, float(theirs.detach().abs().max()))  # entries near 0 have no relative precision
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def test_constructor_and_forward_signatures_match():
    ours, theirs = inspect.signature(fnn.DINOLoss.__init__), inspect.signature(lightly_loss.DINOLoss.__init__)
    theirs_params = {n: p.default for n, p in theirs.parameters.items()}
    ours_params = {n: p.default for n, p in ours.parameters.items() if n != "backend"}
    assert ours_params == theirs_params
    assert list(inspect.signature(fnn.DINOLoss.forward).parameters) == list(
        inspect.signature(lightly_loss.DINOLoss.forward).parameters
    )
    assert set(fnn.DINOLoss(64).state_dict()) == set(lightly_loss.DINOLoss(64).state_dict())


@pytest.mark.parametrize("n_teacher,n_student", [(2, 6), (2, 2), (1, 3), (3, 2)])
@pytest.mark.parametrize("kwargs", [{}, {"warmup_teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3,
                                          "center_momentum": 0.5, "student_temp": 0.2}])  # fmt: skip
def test_forward_on_logits_matches(n_teacher, n_student, kwargs):
    k, b = 33, 5
    theirs, ours = lightly_loss.DINOLoss(k, **kwargs), fnn.DINOLoss(k, **kwargs)
    calls = [dict(epoch=0), dict(epoch=1), dict(), dict(teacher_temp=0.06), dict(epoch=10)]
    for step, call in enumerate(calls):
        teacher = [torch.randn(b, k) * 2 for _ in range(n_teacher)]
        student = [torch.randn(b, k, requires_grad=True) for _ in range(n_student)]
        loss_theirs = theirs(teacher, student, **call)
        grads_theirs = torch.autograd.grad(loss_theirs, student)
        loss_ours = ours(teacher, student, **call)
        grads_ours = torch.autograd.grad(loss_ours, student)
        close(loss_ours, loss_theirs, f"loss at step {step} {call}")
        for v, (a, g) in enumerate(zip(grads_ours, grads_theirs)):
            close(a, g, f"d student[{v}] at step {step}")
        close(ours.center, theirs.center, f"centre after step {step}")


def test_teacher_logits_get_lightlys_gradient():
    """On logits, lightly differentiates through the teacher's softmax too; so does forward."""
    teacher = [torch.randn(4, 9, requires_grad=True) for _ in range(2)]
    student = [torch.randn(4, 9) for _ in range(3)]
    g_theirs = torch.autograd.grad(lightly_loss.DINOLoss(9)(teacher, student), teacher)
    g_ours = torch.autograd.grad(fnn.DINOLoss(9)(teacher, student), teacher)
    for a, b in zip(g_ours, g_theirs):
        close(a, b, "d teacher logits")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forward_fused_matches_lightly_on_logits(backend):
    """The fused path on embeddings and W equals lightly on the logits s·Wᵀ, t·W_tᵀ (teacher without grad)."""
    k, d, b = 41, 12, 6
    theirs = lightly_loss.DINOLoss(k, warmup_teacher_temp_epochs=2, center_momentum=0.7)
    ours = fnn.DINOLoss(k, warmup_teacher_temp_epochs=2, center_momentum=0.7, backend=backend)
    w_t = F.normalize(torch.randn(k, d), dim=1)
    for epoch in range(3):
        w = F.normalize(torch.randn(k, d), dim=1).requires_grad_()
        teacher = [F.normalize(torch.randn(b, d), dim=1) for _ in range(2)]
        student = [F.normalize(torch.randn(b, d), dim=1).requires_grad_() for _ in range(4)]
        with torch.no_grad():
            teacher_logits = [t @ w_t.T for t in teacher]
        loss_theirs = theirs(teacher_logits, [s @ w.T for s in student], epoch=epoch)
        grads_theirs = torch.autograd.grad(loss_theirs, [w, *student])
        loss_ours = ours.forward_fused(teacher, student, w, w_t, epoch=epoch)
        grads_ours = torch.autograd.grad(loss_ours, [w, *student])
        close(loss_ours, loss_theirs, f"loss at epoch {epoch}")
        for i, (a, g) in enumerate(zip(grads_ours, grads_theirs)):
            close(a, g, f"grad {i} at epoch {epoch}")
        close(ours.center, theirs.center, f"centre after epoch {epoch}")


def test_reference_and_functional_match_lightly():
    k, b = 17, 3
    module = lightly_loss.DINOLoss(k)
    module.center.normal_()
    center = module.center.clone()
    teacher = [torch.randn(b, k) for _ in range(2)]
    student = [torch.randn(b, k, requires_grad=True) for _ in range(5)]
    theirs = module(teacher, student)
    close(reference.dino_loss_from_logits(torch.stack(teacher), torch.stack(student), center), theirs, "reference")
    close(fastssl.dino_loss_from_logits(teacher, student, center), theirs, "functional")


# --------------------------------------------------------------------------------------------------
# iBOT's masked-patch loss (lightly's IBOTPatchLoss, DINOv2's form)


def test_ibot_signatures_match():
    ours, theirs = inspect.signature(fnn.IBOTPatchLoss.__init__), inspect.signature(lightly_loss.IBOTPatchLoss.__init__)
    assert {n: p.default for n, p in ours.parameters.items() if n != "backend"} == {
        n: p.default for n, p in theirs.parameters.items()
    }
    assert list(inspect.signature(fnn.IBOTPatchLoss.forward).parameters) == list(
        inspect.signature(lightly_loss.IBOTPatchLoss.forward).parameters
    )
    assert set(fnn.IBOTPatchLoss(64).state_dict()) == set(lightly_loss.IBOTPatchLoss(64).state_dict())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ibot_forward_and_fused_match_lightly(backend):
    k, d = 37, 10
    theirs = lightly_loss.IBOTPatchLoss(k, center_momentum=0.7)
    on_logits = fnn.IBOTPatchLoss(k, center_momentum=0.7)
    fused = fnn.IBOTPatchLoss(k, center_momentum=0.7, backend=backend)
    w_t = F.normalize(torch.randn(k, d), dim=1)
    for step, call in enumerate([{}, {"teacher_temp": 0.07}, {}]):
        mask = torch.rand(3, 4, 4) < 0.45
        m = int(mask.sum())
        w = F.normalize(torch.randn(k, d), dim=1).requires_grad_()
        teacher = F.normalize(torch.randn(m, d), dim=1)
        student = F.normalize(torch.randn(m, d), dim=1).requires_grad_()
        loss_theirs = theirs(teacher @ w_t.T, student @ w.T, mask, **call)
        g_theirs = torch.autograd.grad(loss_theirs, [student, w])
        loss_ours = on_logits(teacher @ w_t.T, student @ w.T, mask, **call)
        g_ours = torch.autograd.grad(loss_ours, [student, w])
        loss_fused = fused.forward_fused(teacher, student, mask, w, w_t, **call)
        g_fused = torch.autograd.grad(loss_fused, [student, w])
        runs = (("logits", loss_ours, g_ours, on_logits), ("fused", loss_fused, g_fused, fused))
        for name, loss, grads, module in runs:
            close(loss, loss_theirs, f"{name} loss at step {step}")
            for i, (a, b) in enumerate(zip(grads, g_theirs)):
                close(a, b, f"{name} grad {i} at step {step}")
            close(module.center.value, theirs.center.value, f"{name} centre after step {step}")
