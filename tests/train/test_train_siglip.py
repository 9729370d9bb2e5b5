"""`--loss siglip` in the trainer: SigLIP's learnable t' and b reach the optimiser and the checkpoint."""

import math

import torch

from fastssl.train.engine import Config, train
from fastssl.train.losses import LOSSES, build_criterion

TINY = dict(limit=64, batch_size=32, width=4, proj_hidden=16, proj_dim=16, knn_k=5, progress=False, device="cpu",
            eval_every=0)


def test_siglip_criterion_holds_learnable_t_and_b():
    assert LOSSES["siglip"][0] == "SigLIPLoss"
    crit = build_criterion("siglip", 16, backend="torch", options={"init_bias": -5.0})
    assert crit.views.global_views == 2 and crit.views.student_views == 2 and not crit.views.has_teacher
    params = dict(crit.module.named_parameters())
    assert set(params) == {"logit_scale", "logit_bias"}
    assert float(params["logit_bias"].detach()) == -5.0
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    crit([z1, z2]).backward()
    assert params["logit_scale"].grad is not None and params["logit_bias"].grad is not None


def test_training_moves_t_and_b_and_checkpoints_them(tmp_path):
    summary = train(Config(loss="siglip", epochs=1, out=str(tmp_path), **TINY))
    assert math.isfinite(summary["loss"])
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["criterion"]
    # Two AdamW steps from t' = log 10, b = −10: both moved (AdamW's first steps move each by ~lr).
    assert abs(float(state["logit_scale"]) - math.log(10.0)) > 1e-5
    assert abs(float(state["logit_bias"]) + 10.0) > 1e-5
