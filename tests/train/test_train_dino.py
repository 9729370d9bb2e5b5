"""`--loss dino` in the trainer: the EMA teacher, the centre, multi-crop wiring, checkpoints, learning.

The unit tests check the pieces against their formulas; the runs use the tiny settings of test_train.py
(a 64-image subset, a width-4 CNN), except the learning test, which needs enough images and steps for
the linear probe to tell a trained encoder from a random one (a few seconds).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastssl.train import engine
from fastssl.train.cli import main
from fastssl.train.engine import Config, ema_momentum, ema_update, train
from fastssl.train.losses import DINO_DEFAULTS, build_criterion, head_prototypes
from fastssl.train.models import DINOHead, build_model

TINY = dict(limit=64, batch_size=32, width=4, proj_hidden=16, proj_dim=16, knn_k=5, progress=False, device="cpu",
            loss="dino", loss_options={"output_dim": 32}, local_crops=2)


def test_ema_momentum_is_a_cosine_from_m0_to_1():
    total, m0 = 100, 0.9
    ms = [ema_momentum(k, total, m0) for k in range(total + 1)]
    assert ms[0] == m0 and ms[-1] == 1.0
    assert ms[50] == pytest.approx((1 + m0) / 2, abs=1e-15)
    assert ms[25] == pytest.approx(1 - (1 - m0) * (1 + math.cos(math.pi / 4)) / 2, abs=1e-15)
    assert all(a < b for a, b in zip(ms, ms[1:]))
    assert {ema_momentum(k, total, 0.99, 0.99) for k in (0, 37, 100)} == {0.99}  # MoCo: constant


def test_ema_update_equals_its_formula_exactly():
    # dyadic weights and momentum: m·t + (1 − m)·s is exact in fp32, so equality is bit for bit
    torch.manual_seed(0)
    student, teacher = build_model(width=2, proj_hidden=8, proj_dim=4), build_model(width=2, proj_hidden=8, proj_dim=4)
    with torch.no_grad():
        for p in [*student.parameters(), *teacher.parameters()]:
            p.copy_(torch.randint(-64, 64, p.shape) / 16)
        for b in student.buffers():
            b.copy_(torch.randint(1, 64, b.shape) / 8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    ema_update(teacher, student, 0.75)
    params = dict(student.named_parameters())
    for k, v in teacher.state_dict().items():
        expected = 0.75 * before[k] + 0.25 * params[k] if k in params else student_before[k]  # buffers: copied
        assert torch.equal(v, expected), k
    for k, v in student.state_dict().items():
        assert torch.equal(v, student_before[k]), k  # the student is not modified


def test_dino_head_outputs_unit_rows_and_holds_the_prototypes():
    head = DINOHead(8, 16, 4, prototypes=32)
    z = head(torch.randn(5, 8))
    assert z.shape == (5, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert head.prototypes.shape == (32, 4) and head.prototypes.requires_grad
    model = build_model(width=2, proj_hidden=16, proj_dim=4, prototypes=32)
    assert isinstance(model.projector, DINOHead)
    with pytest.raises(ValueError, match="prototypes=0"):
        DINOHead(8, 16, 4, prototypes=0)


def test_criterion_loss_and_centre_follow_their_formulas():
    """The trainer's DINO criterion against DINO's formulas written out on explicit logits, with the
    teacher's own prototypes, the temperature of the warm-up epoch and the centre update."""
    torch.manual_seed(0)
    k, d, n, local = 12, 6, 5, 2
    crit = build_criterion("dino", d, backend="reference", local_crops=local, options={"output_dim": k})
    assert crit.views.global_views == 2 and crit.views.student_views == 2 + local
    assert head_prototypes("dino", {"output_dim": k}) == k and head_prototypes("simclr") == 0
    mod = crit.module
    c0 = torch.randn(k) * 0.1
    mod.center.copy_(c0.view(1, 1, k))
    student = [F.normalize(torch.randn(n, d), dim=1).double() for _ in range(2 + local)]
    teacher = F.normalize(torch.randn(2, n, d), dim=-1).double()
    w, w_t = torch.randn(k, d, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64)
    epoch = 3
    loss = crit(student, teacher, prototypes=w, teacher_prototypes=w_t, epoch=epoch)

    # the teacher temperature rises linearly from 0.04 at epoch 0 to 0.07 at epoch 29 (DINO's warm-up)
    assert (DINO_DEFAULTS["warmup_teacher_temp"], DINO_DEFAULTS["teacher_temp"]) == (0.04, 0.07)
    tau_t = mod.teacher_temp_schedule[epoch]  # fp32, as the module stores it
    torch.testing.assert_close(tau_t, torch.tensor(0.04 + 0.03 * epoch / 29))
    tau_t = tau_t.item()
    wn, wtn = F.normalize(w, dim=1), F.normalize(w_t, dim=1)
    p_t = [torch.softmax((teacher[q] @ wtn.T - c0.double()) / tau_t, dim=1) for q in range(2)]
    log_p_s = [torch.log_softmax(s @ wn.T / 0.1, dim=1) for s in student]
    terms = [-(p_t[q] * log_p_s[v]).sum(1).mean() for q in range(2) for v in range(2 + local) if v != q]
    torch.testing.assert_close(loss, torch.stack(terms).mean())

    m = mod.center_momentum
    batch_center = torch.cat([teacher[0], teacher[1]]) @ wtn.T
    expected = m * c0.double() + (1 - m) * batch_center.mean(0)
    torch.testing.assert_close(mod.center.view(k).double(), expected, rtol=1e-6, atol=1e-7)


def test_dino_options_reach_the_loss_and_are_checked():
    crit = build_criterion("dino", 16, options={"output_dim": 64, "teacher_temp": 0.05})
    assert crit.module.center.shape[-1] == 64 and crit.module.teacher_temp == 0.05
    with pytest.raises(ValueError, match="only for --loss dino"):
        build_criterion("simclr", 16, local_crops=2)
    with pytest.raises(ValueError, match="--local-crops"):
        build_criterion("dino", 16, local_crops=-1)
    with pytest.raises(ValueError, match="output_dim must be a positive integer"):
        head_prototypes("dino", {"output_dim": 0})
    with pytest.raises(ValueError, match="not an argument of fastssl.nn.DINOLoss"):
        build_criterion("dino", 16, options={"prototypes": 8})


class _Recorder:
    """Wraps engine._embed and engine.ema_update to see what a run feeds the student and the teacher."""

    def __init__(self, monkeypatch):
        self.embeds, self.updates, self.teacher = [], [], None
        real_embed, real_update = engine._embed, engine.ema_update

        def embed(model, x, autocast):
            self.embeds.append((model, x.clone()))
            return real_embed(model, x, autocast)

        def update(teacher, student, momentum):
            before = {k: p.detach().clone() for k, p in teacher.named_parameters()}
            real_update(teacher, student, momentum)
            for k, p in teacher.named_parameters():  # m·θt + (1 − m)·θs, to fp32 rounding
                s = dict(student.named_parameters())[k].detach()
                torch.testing.assert_close(p, momentum * before[k] + (1 - momentum) * s, msg=k)
            self.teacher = teacher
            self.updates.append(momentum)

        monkeypatch.setattr(engine, "_embed", embed)
        monkeypatch.setattr(engine, "ema_update", update)


def test_teacher_sees_the_global_crops_and_follows_the_student(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    optimizers = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: optimizers.append(opt) if type(opt) is torch.optim.AdamW else None)
    try:
        train(Config(epochs=2, eval_every=0, teacher_momentum=0.9, local_size=12, **TINY))
    finally:
        hook.remove()

    # the momentum of each of the 4 steps follows the cosine from 0.9 to 1, planned over the run
    assert rec.updates == [ema_momentum(k, 4, 0.9) for k in range(4)]
    teacher, opt = rec.teacher, optimizers[0]
    training = [(m, x) for m, x in rec.embeds if x.shape[1] == 32]  # the batches (evaluation does not use _embed)
    assert len(training) == 4 * 3
    for step in range(4):
        (t_net, t_x), (s_net, s_global), (s_net2, s_local) = training[3 * step: 3 * step + 3]
        assert t_net is teacher and s_net is s_net2 and s_net is not teacher
        assert t_x.shape == (2, 32, 3, 32, 32) and torch.equal(t_x, s_global)  # the teacher: the 2 global crops
        assert s_local.shape == (2, 32, 3, 12, 12)                             # the student: + 2 local crops
    student = s_net

    # no gradient to the teacher, and the optimizer holds exactly the student's parameters
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in student.parameters()}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert id(student.projector.prototypes) in optimised
    # the teacher moved with the student and stayed behind it
    assert not torch.equal(teacher.projector.prototypes, student.projector.prototypes)


def test_checkpoint_round_trip_restores_teacher_head_and_centre(tmp_path, monkeypatch):
    cfg = dict(epochs=2, eval_every=0, **TINY)
    train(Config(out=str(tmp_path / "a"), **cfg))

    real = engine.save_atomic
    calls = {"n": 0}

    def stop_after_first_checkpoint(obj, path):
        if str(path).endswith("checkpoint.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(engine, "save_atomic", stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(Config(out=str(tmp_path / "b"), **cfg))
    monkeypatch.setattr(engine, "save_atomic", real)
    train(Config(out=str(tmp_path / "b"), resume=True, **cfg))

    a, b = (torch.load(tmp_path / r / "checkpoint.pt", map_location="cpu", weights_only=False) for r in "ab")
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "ema", "criterion"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # what was compared is real state: the head's prototypes, a teacher apart from the student, a centre
    assert "projector.prototypes" in a["ema"]
    assert not torch.equal(a["ema"]["projector.prototypes"], a["model"]["projector.prototypes"])
    assert a["criterion"]["center"].abs().sum() > 0


def _epoch_losses(out) -> list:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "epoch"]


def test_a_short_dino_run_learns_what_only_the_right_teacher_teaches(tmp_path, monkeypatch):
    """The loss falls, and falls well below that of a control whose teacher embeds other images (its
    embeddings rolled by one image in the batch): there the student can only learn the batch-mean
    target, which the centre keeps near uniform. The teacher temperature is held at 0.04, so the
    losses of different epochs are comparable (the default warm-up raises it)."""
    cfg = dict(loss="dino", epochs=10, limit=256, batch_size=64, width=8, proj_hidden=64, proj_dim=32, knn_k=5,
               eval_every=0, save_every=0, progress=False, device="cpu",
               loss_options={"output_dim": 64, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04})
    right = _epoch_losses(_run(tmp_path / "right", cfg))

    real = engine._embed

    def teacher_on_other_images(model, x, autocast):
        z = real(model, x, autocast)
        is_teacher = not next(model.parameters()).requires_grad
        return z.roll(1, dims=1) if is_teacher else z

    monkeypatch.setattr(engine, "_embed", teacher_on_other_images)
    wrong = _epoch_losses(_run(tmp_path / "wrong", cfg))

    last = lambda losses: sum(losses[-3:]) / 3  # noqa: E731
    assert last(right) < right[0] - 0.3
    assert last(right) < last(wrong) - 0.1, (right, wrong)


def _run(out, cfg):
    train(Config(out=str(out), **cfg))
    return out


@pytest.mark.parametrize("argv,match", [
    (["--local-crops", "2"], "--local-crops 2 is only for --loss dino"),
    (["--loss", "dino", "--local-scale", "0,0.5"], "--local-scale must be MIN,MAX with 0 < MIN <= MAX <= 1"),
    (["--loss", "dino", "--teacher-momentum", "1.5"], "--teacher-momentum must be in [0, 1]"),
    (["--loss", "dino", "--loss-option", "output_dim=0"], "output_dim must be a positive integer"),
])
def test_cli_errors_of_the_dino_options_are_one_line(tmp_path, capsys, argv, match):
    assert main(argv + ["--limit", "40", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
