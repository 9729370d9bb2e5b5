"""`--chunks K` (GradCache): parameter gradients equal the unchunked ones.

Exact for per-sample encoders (GroupNorm, LayerNorm, BatchNorm in eval mode). BatchNorm in training mode
normalises each chunk with its own statistics: then the chunked gradient equals that of the same
objective computed with a full graph chunk by chunk (tested), and the running statistics are updated once
per chunk. Dropout masks are the same in both passes (the RNG state is restored per chunk).
"""

import copy

import pytest
import torch
from torch import nn

from fastssl.train.engine import ssl_backward
from fastssl.train.losses import build_criterion
from fastssl.train.models import build_model


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _run(model, views, loss_fn, chunks):
    model.zero_grad(set_to_none=True)
    loss = ssl_backward(model, views, loss_fn, chunks)
    return loss, _grads(model)


def _assert_grads_equal(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    # relative per tensor, plus a floor at the largest gradient's scale: some gradients are exactly 0 in
    # exact arithmetic (Barlow Twins batch-normalises z, so the last bias gets none) and only rounding remains
    largest = max(g.abs().max().item() for g in b.values())
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        bound = 1e-4 * b[k].abs().max().item() + 1e-9 * largest
        assert err <= bound, f"{k}: chunked gradient differs from the unchunked one by {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("loss,m", [("simclr", 2), ("barlow", 2), ("vicreg-ctr", 2), ("arcl", 3)])
@pytest.mark.parametrize("chunks", [2, 3])
def test_chunked_gradients_equal_unchunked_groupnorm(loss, m, chunks):
    torch.manual_seed(0)
    model = build_model("small-cnn", width=4, norm="gn", proj_hidden=16, proj_dim=8).double()
    crit = build_criterion(loss, 8, views=m if loss == "arcl" else None)
    views = torch.randn(m, 10, 3, 12, 12, dtype=torch.float64)
    fn = lambda zs: crit(zs)  # noqa: E731
    l1, g1 = _run(model, views, fn, 1)
    lk, gk = _run(model, views, fn, chunks)
    torch.testing.assert_close(lk, l1)
    _assert_grads_equal(gk, g1)


def test_chunked_gradients_equal_unchunked_batchnorm_eval():
    torch.manual_seed(0)
    model = build_model("resnet18", width=2, norm="bn", proj_hidden=8, proj_dim=8).double()
    for mod in model.modules():  # non-trivial running statistics
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    model.eval()
    crit = build_criterion("dcl", 8)
    views = torch.randn(2, 9, 3, 8, 8, dtype=torch.float64)
    _, g1 = _run(model, views, lambda zs: crit(zs), 1)
    _, g3 = _run(model, views, lambda zs: crit(zs), 3)
    _assert_grads_equal(g3, g1)


def test_batchnorm_train_mode_is_per_chunk_statistics():
    torch.manual_seed(0)
    model = build_model("small-cnn", width=4, norm="bn", proj_hidden=16, proj_dim=8).double()
    crit = build_criterion("simclr", 8)
    views = torch.randn(2, 12, 3, 10, 10, dtype=torch.float64)
    ref = build_model("small-cnn", width=4, norm="bn", proj_hidden=16, proj_dim=8).double()
    ref.load_state_dict(model.state_dict())

    _, gk = _run(model, views, lambda zs: crit(zs), 3)
    # the same objective with a full graph: each chunk (all views of 4 samples) through BN on its own
    ref.zero_grad()
    parts = [ref(views[:, s].flatten(0, 1)).view(2, 4, -1) for s in (slice(0, 4), slice(4, 8), slice(8, 12))]
    z = torch.cat(parts, dim=1)
    crit([z[0], z[1]]).backward()
    _assert_grads_equal(gk, _grads(ref))
    for (k, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):  # running stats: once per chunk
        torch.testing.assert_close(b, rb, msg=k)

    _, g1 = _run(model, views, lambda zs: crit(zs), 1)
    worst = max(((gk[k] - g1[k]).abs().max() / g1[k].abs().max().clamp_min(1e-12)).item() for k in g1)
    assert worst > 1e-3  # and it is a different objective from full-batch BN: why --norm gn exists


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 8))

    def forward(self, x):
        return self.net(x)


def test_dropout_masks_identical_in_both_passes():
    torch.manual_seed(0)
    model = _DropoutNet().double()
    crit = build_criterion("clip", 8)
    views = torch.randn(2, 8, 3, 6, 6, dtype=torch.float64)
    torch.manual_seed(7)
    _, gk = _run(model, views, lambda zs: crit(zs), 2)
    # reference: the chunks drawn in the same RNG order, with a full graph
    torch.manual_seed(7)
    model.zero_grad()
    z = torch.cat([model(views[:, s].flatten(0, 1)).view(2, 4, -1) for s in (slice(0, 4), slice(4, 8))], dim=1)
    crit([z[0], z[1]]).backward()
    _assert_grads_equal(gk, _grads(model))


def test_moco_keys_and_bad_chunks():
    model = build_model("small-cnn", width=4, norm="gn", proj_hidden=8, proj_dim=8)
    crit = build_criterion("moco", 8, memory_bank=16)
    views = torch.randn(1, 6, 3, 8, 8)
    keys = torch.randn(1, 6, 8)  # the teacher's embeddings of its one view (T, N, D)
    bank = crit.module.memory_bank.bank.clone()
    _, g1 = _run(model, views, lambda zs: crit(zs, keys), 1)
    assert not torch.equal(crit.module.memory_bank.bank, bank)  # the keys were enqueued
    crit.module.memory_bank.bank.copy_(bank)  # same negatives for the chunked run
    crit.module.memory_bank.bank_ptr.zero_()
    _, g2 = _run(model, views, lambda zs: crit(zs, keys), 2)
    _assert_grads_equal(g2, g1)
    with pytest.raises(ValueError, match="chunks must be in"):
        ssl_backward(model, views, lambda zs: crit(zs, keys), 7)
    with pytest.raises(ValueError, match="views must be"):
        ssl_backward(model, views[0], lambda zs: crit(zs, keys), 1)


def test_chunked_gradients_equal_unchunked_multicrop_dino():
    """DINO's step: two groups of views at two resolutions (global and local crops), the teacher's
    embeddings and the head's prototypes; the prototypes get their gradient from the loss's backward."""
    torch.manual_seed(0)
    model = build_model("small-cnn", width=4, norm="gn", proj_hidden=16, proj_dim=8, prototypes=12).double()
    teacher = copy.deepcopy(model).requires_grad_(False)
    crit = build_criterion("dino", 8, local_crops=2, options={"output_dim": 12})
    crit.module.double()
    groups = [torch.randn(2, 10, 3, 12, 12, dtype=torch.float64), torch.randn(2, 10, 3, 8, 8, dtype=torch.float64)]
    with torch.no_grad():
        t = teacher(groups[0].flatten(0, 1)).view(2, 10, -1)
    centre = crit.module.center.clone()

    def fn(zs):
        assert [z.shape for z in zs] == [(10, 8)] * 4  # 2 global, then 2 local crops, in order
        return crit(zs, t, prototypes=model.projector.prototypes, teacher_prototypes=teacher.projector.prototypes)

    l1, g1 = _run(model, groups, fn, 1)
    crit.module.center.copy_(centre)  # the same centre for the chunked run
    lk, gk = _run(model, groups, fn, 3)
    torch.testing.assert_close(lk, l1)
    _assert_grads_equal(gk, g1)
    assert "projector.prototypes" in g1
