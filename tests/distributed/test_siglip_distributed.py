"""SigLIP with gather_distributed=True on 2 real gloo ranks against the single-process float64 objective.

The pattern of tests/distributed/test_distributed.py: one launch (torch.multiprocessing, file://
rendezvous, a watchdog) runs every case; each rank feeds its rows of one global batch through a
tiny linear projector and computes the loss, backward, and saves what it got; the parent checks it
against reference.siglip_loss on the concatenated batch in float64. Here the projector and the
SigLIPLoss module (its learnable t' and b) sit in one module wrapped in a real DistributedDataParallel,
the setup fastssl.siglip_loss documents, so DDP averages the gradients of t' and b too. Checked:

* the loss averaged over the ranks (what DDP's averaging differentiates) equals the global loss;
* every rank's projector, t' and b gradients (after DDP's averaging) equal the single-process ones;
* the input gradients divided by W (DDP's averaging) equal the single-process ones, row by row;
* on an even and an uneven split, on the torch backend and the Triton one (interpreted on the CPU);
* "ring" is refused with a ValueError on every rank (no hang).
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastssl
from fastssl import reference
from tests.utils import CPU_BACKENDS, TOLERANCES

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)

WORLD = 2
D_IN, D = 7, 6
SPLITS = {"even": [5, 5], "uneven": [4, 7]}
LAUNCH_TIMEOUT_S = 180
#: t and b away from SigLIP's initialisation, where every negative's weight would be ~e^-10.
INIT_T, INIT_B = 3.0, -1.5


class Model(nn.Module):
    """A linear projector for both towers and the SigLIP loss with its learnable t' and b."""

    def __init__(self, backend: str = "torch", gather=True):
        super().__init__()
        self.linear = nn.Linear(D_IN, D)
        self.loss = fastssl.nn.SigLIPLoss(INIT_T, INIT_B, gather_distributed=gather, backend=backend)

    def forward(self, x):  # x (n, 2, D_IN): the two towers' inputs
        z = self.linear(x)
        return self.loss(z[:, 0], z[:, 1])


def _worker(rank: int, init_file: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = torch.load(data_path)
        results = {}
        for (backend, split), x_all in data["inputs"].items():
            sizes = SPLITS[split]
            start = sum(sizes[:rank])
            x = x_all[start : start + sizes[rank]].clone().requires_grad_(True)
            model = Model(backend)
            model.load_state_dict(data["state"])
            ddp = nn.parallel.DistributedDataParallel(model)
            loss = ddp(x)
            loss.backward()
            results[(backend, split)] = dict(loss=loss.detach(), x_grad=x.grad,
                                             grads={k: p.grad.clone() for k, p in model.named_parameters()})  # fmt: skip
            del ddp
        try:
            fastssl.siglip_loss(torch.randn(3, D), torch.randn(3, D), gather_distributed="ring")
            results["ring"] = "no error"
        except ValueError as err:
            results["ring"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears its connections down while a peer still reads from them
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # As in test_distributed.py: skip interpreter finalisation, where gloo's threads can abort it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siglip_world2")
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    state = Model().state_dict()
    inputs = {(backend, split): torch.randn(sum(sizes), 2, D_IN, generator=gen)
              for backend in CPU_BACKENDS for split, sizes in SPLITS.items()}  # fmt: skip
    data = dict(state=state, inputs=inputs)
    torch.save(data, tmp / "data.pt")
    context = mp.start_processes(_worker, args=(str(tmp / "rendezvous"), str(tmp / "data.pt"), str(tmp)),
                                 nprocs=WORLD, join=False)  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not context.join(timeout=1):  # raises, with the worker's traceback, if a rank fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{WORLD} gloo ranks did not finish within {LAUNCH_TIMEOUT_S} s (a hang, killed)")
    return dict(data=data, ranks=[torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)])


def _oracle(state, x_all):
    """The single-process objective on the concatenated batch, float64, and its gradients."""
    model = Model(backend="reference", gather=False).double()
    model.load_state_dict(state)
    x = x_all.double().requires_grad_(True)
    z = model.linear(x)
    loss = reference.siglip_loss(z[:, 0], z[:, 1], model.loss.logit_scale.exp(), model.loss.logit_bias)
    loss.backward()
    return dict(loss=loss.detach(), x_grad=x.grad, grads={k: p.grad for k, p in model.named_parameters()})


def _close(actual, expected, what, scale=1.0):
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * float(scale), msg=lambda m: f"{what}: {m}")  # fmt: skip


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_single_process(run, backend, split):
    key = (backend, split)
    expected = _oracle(run["data"]["state"], run["data"]["inputs"][key])
    got = [r[key] for r in run["ranks"]]
    n = sum(SPLITS[split])
    _close(torch.stack([g["loss"] for g in got]).mean(), expected["loss"], f"{key} mean loss over ranks")
    _close(torch.cat([g["x_grad"] for g in got]) / WORLD, expected["x_grad"], f"{key} input gradient / W")
    for r, g in enumerate(got):
        for name, want in expected["grads"].items():
            # t' and b (and the projector's bias) are sums over the N² pairs.
            _close(g["grads"][name], want, f"{key} DDP gradient of {name}, rank {r}", scale=n)


def test_ring_is_refused_on_every_rank(run):
    for r, results in enumerate(run["ranks"]):
        assert "ring" in results["ring"] and "gather_distributed=True" in results["ring"], (r, results["ring"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uninitialised_falls_back_to_single_process(backend):
    assert not dist.is_initialized()
    z1, z2 = torch.randn(9, 5), torch.randn(9, 5)
    gathered = fastssl.siglip_loss(z1, z2, 4.0, -2.0, gather_distributed=True, backend=backend)
    torch.testing.assert_close(gathered, fastssl.siglip_loss(z1, z2, 4.0, -2.0, backend=backend))
    assert math.isfinite(float(gathered))
