"""The DINO and iBOT-patch specs (fastssl.reference.dino_loss*, ibot_patch_loss*; Caron et al. 2021, Zhou
et al. 2022) against an independent float64 oracle, and the validation of the public API built on them.

The oracle loops over view pairs and images in numpy and writes the cross-entropy as −Σ_k p_k·log q_k
with explicit exponentials: no torch softmax, no einsum, no masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastssl
import fastssl.nn as fnn
from fastssl import reference as ref

RTOL, ATOL = 1e-10, 1e-12  # fp64 spec vs fp64 oracle


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def oracle_from_logits(teacher, student, center, tau_s, tau_t):
    """Mean over the pairs (teacher view q, student view v ≠ q, image b) of −Σ_k p_t log p_s, in numpy."""
    teacher, student = teacher.detach().numpy(), student.detach().numpy()
    c = np.zeros(teacher.shape[-1]) if center is None else center.detach().numpy().reshape(-1)
    terms = []
    for q in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if q == v:
                continue
            for b in range(teacher.shape[1]):
                p_t = np_softmax((teacher[q, b] - c) / tau_t)
                log_p_s = np.log(np_softmax(student[v, b] / tau_s))
                terms.append(-(p_t * log_p_s).sum())
    return float(np.mean(terms))


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(requires_grad)


@pytest.mark.parametrize("n_teacher,n_student", [(2, 4), (2, 2), (3, 1), (1, 3), (3, 5)])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("tau_s,tau_t", [(0.1, 0.04), (0.7, 1.3)])
def test_from_logits_matches_oracle(n_teacher, n_student, center, tau_s, tau_t):
    k, b = 7, 3
    teacher, student = randn(n_teacher, b, k), randn(n_student, b, k)
    c = randn(k) if center else None
    got = ref.dino_loss_from_logits(teacher, student, c, tau_s, tau_t)
    want = oracle_from_logits(teacher, student, c, tau_s, tau_t)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_embeddings_matches_oracle():
    student, teacher, w, w_t, c = randn(4, 3, 5), randn(2, 3, 5), randn(9, 5), randn(9, 5), randn(9)
    got = ref.dino_loss(student, teacher, w, c, 0.2, 0.05, teacher_prototypes=w_t)
    want = oracle_from_logits(teacher @ w_t.T, student @ w.T, c, 0.2, 0.05)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    # Without W_t the teacher scores with W.
    got = ref.dino_loss(student, teacher, w, c, 0.2, 0.05)
    torch.testing.assert_close(got, torch.tensor(oracle_from_logits(teacher @ w.T, student @ w.T, c, 0.2, 0.05),
                                                 dtype=torch.float64), rtol=RTOL, atol=ATOL)  # fmt: skip


def test_gradcheck_and_stop_gradient():
    teacher_logits, student_logits = randn(2, 3, 6, requires_grad=True), randn(3, 3, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: ref.dino_loss_from_logits(t, s, None, 0.3, 0.2),
                                    (teacher_logits, student_logits))  # fmt: skip
    student, w = randn(3, 2, 4, requires_grad=True), randn(8, 4, requires_grad=True)
    teacher = randn(2, 2, 4, requires_grad=True)
    # A separate W_t: with W_t = W the stop-gradient makes the analytic gradient differ from the numerical one.
    w_t = randn(8, 4)
    assert torch.autograd.gradcheck(lambda s, w: ref.dino_loss(s, teacher.detach(), w, None, 0.3, 0.2, w_t),
                                    (student, w))  # fmt: skip
    ref.dino_loss(student, teacher, w, None, 0.3, 0.2).backward()
    assert teacher.grad is None, "the teacher's logits are detached (DINO's stop-gradient)"


def test_dtype_rules():
    student, teacher, w = torch.randn(3, 2, 4), torch.randn(2, 2, 4), torch.randn(8, 4)
    assert ref.dino_loss(student, teacher, w).dtype == torch.float32
    assert ref.dino_loss(student.bfloat16(), teacher.bfloat16(), w.bfloat16()).dtype == torch.float32
    assert ref.dino_loss(student.double(), teacher.double(), w.double()).dtype == torch.float64


def test_functional_from_logits_matches_spec():
    teacher, student, c = randn(2, 4, 11), randn(5, 4, 11), randn(1, 1, 11)
    for t_in, s_in in ((teacher, student), (list(teacher), list(student))):
        got = fastssl.dino_loss_from_logits(t_in, s_in, c, student_temp=0.2, teacher_temp=0.05)
        torch.testing.assert_close(got, ref.dino_loss_from_logits(teacher, student, c, 0.2, 0.05), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------------
# validation


def _good():
    return dict(student=torch.randn(3, 2, 4), teacher=torch.randn(2, 2, 4), prototypes=torch.randn(8, 4))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(student=torch.randn(6, 4)), ValueError, r"student must have 3 dimensions, got shape \(6, 4\)"),
        (dict(student=torch.randn(3, 2, 5)), ValueError, r"student and teacher must have the same embedding"),
        (dict(teacher=torch.randn(2, 3, 4)), ValueError, r"same batch size B, got \(B, D\) = \(2, 4\) and \(3, 4\)"),
        (dict(prototypes=torch.randn(8, 5)), ValueError, r"student and prototypes must have the same embedding"),
        (dict(prototypes=torch.randn(8, 4).double()), TypeError, r"student is torch.float32 but prototypes is"),
        (dict(student=torch.randn(3, 2, 4).long()), TypeError, r"student must be float16, bfloat16, float32"),
        (dict(prototypes=[1.0]), TypeError, r"prototypes must be a torch.Tensor"),
        (dict(center=torch.randn(7)), ValueError, r"center must be a floating \(K,\) or \(1, 1, K\) tensor with K = 8"),
        (dict(teacher_prototypes=torch.randn(9, 4)), ValueError, r"prototypes and teacher_prototypes must have"),
        (dict(student_temp=0.0), ValueError, r"student_temp must be a finite number > 0, got 0.0"),
        (dict(teacher_temp=-1.0), ValueError, r"teacher_temp must be a finite number > 0"),
        (dict(student_temp=torch.tensor(0.1, requires_grad=True)), ValueError, r"student_temp gets no gradient"),
        (dict(backend="cudnn"), ValueError, r"backend must be one of"),
        (dict(student=[]), ValueError, r"student needs at least one view"),
        (dict(student=torch.randn(1, 2, 4), teacher=torch.randn(1, 2, 4)), ValueError,
         r"needs a pair of different views, but got 1 teacher view\(s\) and 1 student view\(s\)"),
    ],
)
def test_dino_loss_validation(change, error, match):
    kwargs = dict(_good(), **change)
    with pytest.raises(error, match=match):
        fastssl.dino_loss(**kwargs)


def test_dino_loss_validation_of_lists():
    with pytest.raises(ValueError, match=r"student\[0\] and student\[1\] must have the same shape"):
        fastssl.dino_loss([torch.randn(2, 4), torch.randn(3, 4)], torch.randn(2, 2, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"teacher_logits and student_logits must have the same embedding"):
        fastssl.dino_loss_from_logits([torch.randn(2, 8)], [torch.randn(2, 9)] * 2)
    with pytest.raises(ValueError, match=r"needs a pair of different views"):
        fastssl.dino_loss_from_logits([torch.randn(2, 8)], [torch.randn(2, 8)])


def test_triton_backend_rejects_float64():
    good = {k: v.double() for k, v in _good().items()}
    with pytest.raises((TypeError, ValueError), match="triton"):
        fastssl.dino_loss(**good, backend="triton")


def test_module_validation():
    with pytest.raises(ValueError, match=r"Unknown mode 'median'"):
        fnn.DINOLoss(center_mode="median")
    with pytest.raises(ValueError, match=r"output_dim must be a positive int"):
        fnn.DINOLoss(output_dim=0)
    with pytest.raises(ValueError, match=r"student_temp must be a finite number > 0"):
        fnn.DINOLoss(student_temp=0.0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fnn.DINOLoss(backend="nope")
    with pytest.raises(ValueError, match=r"DINOLoss\(output_dim=5\) got teacher_out with 6 columns \(logits\)"):
        fnn.DINOLoss(output_dim=5)([torch.randn(2, 6)], [torch.randn(2, 6)] * 2)
    with pytest.raises(ValueError, match=r"DINOLoss\(output_dim=5\) got prototypes with 6 rows"):
        fnn.DINOLoss(output_dim=5).forward_fused([torch.randn(2, 3)], [torch.randn(2, 3)] * 2, torch.randn(6, 3))


def test_inputs_not_modified():
    good = _good()
    center = torch.randn(8)
    before = [t.clone() for t in (*good.values(), center)]
    fnn.DINOLoss(8).forward_fused(good["teacher"], good["student"], good["prototypes"])
    fastssl.dino_loss(**good, center=center, normalize_prototypes=True)
    for a, b in zip((*good.values(), center), before):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# iBOT's masked-patch loss


def oracle_ibot(teacher, student, mask, center, tau_s, tau_t):
    """1/B Σ over images of the mean over its masked tokens of −Σ_k p_t log p_s, tokens image by image."""
    teacher, student = teacher.detach().numpy(), student.detach().numpy()
    c = np.zeros(teacher.shape[-1]) if center is None else center.detach().numpy().reshape(-1)
    flat = mask.reshape(mask.shape[0], -1).numpy()
    total, token = 0.0, 0
    for image in flat:
        ces = []
        for _ in range(int(image.sum())):
            p_t = np_softmax((teacher[token] - c) / tau_t)
            ces.append(-(p_t * np.log(np_softmax(student[token] / tau_s))).sum())
            token += 1
        total += float(np.mean(ces)) if ces else 0.0
    return total / flat.shape[0]


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("mask_shape", [(3, 2, 3), (4, 5)])
def test_ibot_from_logits_matches_oracle(center, mask_shape):
    mask = torch.rand(mask_shape) < 0.5
    mask[1] = False  # an image with no masked token contributes 0 (its count is clamped to 1)
    mask.reshape(mask_shape[0], -1)[0, 0] = True
    m, k = int(mask.sum()), 9
    teacher, student, c = randn(m, k), randn(m, k), (randn(1, k) if center else None)
    got = ref.ibot_patch_loss_from_logits(teacher, student, mask, c, 0.2, 0.05)
    want = oracle_ibot(teacher, student, mask, c, 0.2, 0.05)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    functional = fastssl.ibot_patch_loss_from_logits(teacher, student, mask, c, student_temp=0.2, teacher_temp=0.05)
    torch.testing.assert_close(functional, got, rtol=RTOL, atol=ATOL)
    s, w, t, w_t = randn(m, 4), randn(k, 4), randn(m, 4), randn(k, 4)
    torch.testing.assert_close(ref.ibot_patch_loss(s, t, w, mask, c, 0.2, 0.05, w_t),
                               torch.tensor(oracle_ibot(t @ w_t.T, s @ w.T, mask, c, 0.2, 0.05), dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)  # fmt: skip


def _ibot_good():
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 0], mask[1, 2, :2] = True, True  # 3 + 2 masked tokens
    return dict(student=torch.randn(5, 4), teacher=torch.randn(5, 4), prototypes=torch.randn(8, 4), mask=mask)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(mask=torch.zeros(2, 3, 3)), ValueError, r"mask must be a bool \(B, H, W\) or \(B, N\) tensor"),
        (dict(mask=torch.ones(2, 3, 3, dtype=torch.bool)), ValueError,
         r"mask \(2, 3, 3\) has 18 True entries \(masked tokens\) but the embeddings have 5 rows"),
        (dict(teacher=torch.randn(4, 4)), ValueError, r"student and teacher must have the same shape"),
        (dict(student=torch.randn(5, 4, 1)), ValueError, r"student must have 2 dimensions"),
        (dict(center=torch.randn(2, 8)), ValueError, r"center must be a floating"),
        (dict(mask=[True]), TypeError, r"mask must be a torch.Tensor"),
    ],
)
def test_ibot_validation(change, error, match):
    with pytest.raises(error, match=match):
        fastssl.ibot_patch_loss(**dict(_ibot_good(), **change))
