"""fastssl.metrics: class-centre divergence against the spec and an explicit loop; bad labels."""

from __future__ import annotations

import pytest
import torch

import fastssl
from fastssl import metrics, reference


def test_class_center_divergence_matches_spec_and_a_loop():
    z = torch.randn(40, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 1, 4, 1, 5] * 8)
    got = metrics.class_center_divergence(z, labels)
    torch.testing.assert_close(got, reference.class_center_divergence(z, labels))
    zn = torch.nn.functional.normalize(z.detach(), dim=1)
    centres = {k: zn[labels == k].mean(0) for k in (1, 3, 4, 5)}
    loop = max(float(centres[k] @ centres[m]) for k in centres for m in centres if k != m)
    assert abs(float(got.detach()) - loop) < 1e-12
    got.backward()  # differentiable: only the two classes of the maximising pair get gradient
    touched = labels[z.grad.abs().sum(1) > 0].unique().tolist()
    assert len(touched) == 2


def test_metrics_namespace_and_bad_labels():
    assert metrics.alignment is fastssl.alignment and metrics.uniformity is fastssl.uniformity
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match="at least two distinct classes"):
        metrics.class_center_divergence(z, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"1-D tensor of length N = 6, got \(5,\)"):
        metrics.class_center_divergence(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor, got torch.float32"):
        metrics.class_center_divergence(z, torch.zeros(6))
