"""SigLIP with gather_distributed=True and "ring" on 2 and 3 real gloo ranks against the
single-process float64 objective.

The pattern of tests/distributed/test_distributed.py: one launch per world size (torch.multiprocessing,
file:// rendezvous, a watchdog) runs every case; each rank feeds its rows of one global batch
through the loss, runs backward, and saves what it got; the parent checks it against
reference.siglip_loss on the concatenated batch in float64. Two kinds of case:

* under DDP: a tiny linear projector and the SigLIPLoss module (its learnable t' and b) sit in one
  module wrapped in a real DistributedDataParallel, the setup fastssl.siglip_loss documents, so DDP
  averages the gradients of t' and b too. The loss averaged over the ranks, the input gradients ÷ W
  and every rank's projector, t' and b gradients equal the single-process ones, for each backend
  (Triton interpreted on the CPU), each mode, on an even and an uneven split; the ring's equal the
  all-gather's;
* functional, without DDP: fastssl.siglip_loss on leaf tensors z1, z2, t, b, in float32 and (torch
  backend) float64, so that each rank's own gradients of z1 (x tower), z2 (y tower), t and b are
  seen before any averaging: the ring's equal the all-gather's rank by rank, and their sums over the
  ranks are the single-process gradients. A spy on torch.distributed records every collective's
  payload: the ring all-gathers nothing but the per-rank shapes, all-reduces nothing, and sends
  blocks of at most one rank's rows (the all-gather mode, spied the same way, does gather the columns).

Errors: "ring" with the reference backend in a process group, and embeddings whose dimensions
differ across ranks, raise a ValueError on every rank (no hang); without a process group both modes
are the single-process loss (lightly's fallback, as for every loss).
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

D_IN, D = 7, 6
#: Per-rank rows of the global batch, per world size: equal, and unequal.
SPLITS = {
    2: {"even": [5, 5], "uneven": [4, 7]},
    3: {"even": [4, 4, 4], "uneven": [3, 5, 4]},
}
MODES = {"gather": True, "ring": "ring"}
#: The functional cases: (backend, dtype); float64 only where a backend computes in it.
FUNCTIONAL = [("torch", torch.float64)] + [(b, torch.float32) for b in CPU_BACKENDS]
LAUNCH_TIMEOUT_S = 180
#: t and b away from SigLIP's initialisation, where every negative's weight would be ~e^-10.
INIT_T, INIT_B = 3.0, -1.5
#: batch_sizes exchanges each rank's shape as 9 numbers (ndim + up to 8 sizes): the only all-gather
#: that the ring may make.
SHAPE_EXCHANGE = 9


class Model(nn.Module):
    """A linear projector for both towers and the SigLIP loss with its learnable t' and b."""

    def __init__(self, backend: str = "torch", gather=True):
        super().__init__()
        self.linear = nn.Linear(D_IN, D)
        self.loss = fastssl.nn.SigLIPLoss(INIT_T, INIT_B, gather_distributed=gather, backend=backend)

    def forward(self, x):  # x (n, 2, D_IN): the two towers' inputs
        z = self.linear(x)
        return self.loss(z[:, 0], z[:, 1])


class CollectiveSpy:
    """Records the payload (elements per rank) of every collective and point-to-point transfer made
    through torch.distributed's Python API while installed; fastssl calls them as `dist.<name>`."""

    WRAPPED = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter", "batch_isend_irecv")

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self._saved = {}

    def _wrap(self, name, original):
        def spy(*args, **kwargs):
            if name == "batch_isend_irecv":
                self.calls += [("p2p", op.tensor.numel()) for op in args[0]]
            elif name == "all_gather":
                self.calls.append((name, args[1].numel()))  # (outputs, input)
            else:
                self.calls.append((name, args[0].numel()))
            return original(*args, **kwargs)

        return spy

    def __enter__(self):
        for name in self.WRAPPED:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _functional_case(z_all, t0, b0, sizes, rank, backend, gather):
    """fastssl.siglip_loss on this rank's rows of z_all (N, 2, D) with leaf t and b; what each rank got."""
    start = sum(sizes[:rank])
    z1 = z_all[start : start + sizes[rank], 0].clone().requires_grad_(True)
    z2 = z_all[start : start + sizes[rank], 1].clone().requires_grad_(True)
    t = torch.tensor(t0, dtype=z_all.dtype, requires_grad=True)
    b = torch.tensor(b0, dtype=z_all.dtype, requires_grad=True)
    with CollectiveSpy() as spy:
        loss = fastssl.siglip_loss(z1, z2, t, b, gather_distributed=gather, backend=backend)
        loss.backward()
    return dict(loss=loss.detach(), z1_grad=z1.grad, z2_grad=z2.grad, t_grad=t.grad, b_grad=b.grad, calls=spy.calls)


def _error_of(call) -> str:
    try:
        call()
        return "no error"
    except ValueError as err:
        return str(err)


def _worker(rank: int, world: int, init_file: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(data_path)
        results = {}
        for (backend, split), x_all in data["ddp_inputs"].items():
            sizes = SPLITS[world][split]
            start = sum(sizes[:rank])
            for mode, gather in MODES.items():
                x = x_all[start : start + sizes[rank]].clone().requires_grad_(True)
                model = Model(backend, gather)
                model.load_state_dict(data["state"])
                ddp = nn.parallel.DistributedDataParallel(model)
                loss = ddp(x)
                loss.backward()
                results[("ddp", backend, mode, split)] = dict(
                    loss=loss.detach(), x_grad=x.grad, grads={k: p.grad.clone() for k, p in model.named_parameters()}
                )
                del ddp  # DDP's reducer holds gloo work; release it while the group is alive
        for (backend, dtype), z_all in data["functional_inputs"].items():
            sizes = SPLITS[world]["uneven"]
            for mode, gather in MODES.items():
                results[("functional", backend, dtype, mode)] = _functional_case(
                    z_all, INIT_T, INIT_B, sizes, rank, backend, gather
                )
        z = torch.randn(3, D)
        results["ring_reference"] = _error_of(
            lambda: fastssl.siglip_loss(z, z.clone(), gather_distributed="ring", backend="reference")
        )
        wide = torch.randn(3, D + rank)  # a different D on every rank
        results["ring_mismatch"] = _error_of(
            lambda: fastssl.siglip_loss(wide, wide.clone(), gather_distributed="ring", backend="torch")
        )
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


_RUNS: dict = {}


def _launch(world: int, tmp_path_factory) -> dict:
    """The ranks' saved results for `world`, launched once; a failed launch fails every later test
    of that world size at once (no relaunch, no second wait on a hang)."""
    if world not in _RUNS:
        _RUNS[world] = f"the launch of {world} ranks failed in an earlier test (its report has the cause)"
        tmp = tmp_path_factory.mktemp(f"siglip_world{world}")
        gen = torch.Generator().manual_seed(7 + world)
        torch.manual_seed(7)
        state = Model().state_dict()
        ddp_inputs = {(backend, split): torch.randn(sum(sizes), 2, D_IN, generator=gen)
                      for backend in CPU_BACKENDS for split, sizes in SPLITS[world].items()}  # fmt: skip
        n = sum(SPLITS[world]["uneven"])
        functional_inputs = {(backend, dtype): torch.randn(n, 2, D, generator=gen, dtype=torch.float64).to(dtype)
                             for backend, dtype in FUNCTIONAL}  # fmt: skip
        data = dict(state=state, ddp_inputs=ddp_inputs, functional_inputs=functional_inputs)
        torch.save(data, tmp / "data.pt")
        context = mp.start_processes(_worker, args=(world, str(tmp / "rendezvous"), str(tmp / "data.pt"), str(tmp)),
                                     nprocs=world, join=False)  # fmt: skip
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not context.join(timeout=1):  # raises, with the worker's traceback, if a rank fails
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} gloo ranks did not finish within {LAUNCH_TIMEOUT_S} s (a hang, killed)")
        _RUNS[world] = dict(data=data, ranks=[torch.load(tmp / f"rank{r}.pt") for r in range(world)])
    if isinstance(_RUNS[world], str):
        pytest.fail(_RUNS[world])
    return _RUNS[world]


# -------------------------------------------------------------------------------------------------
# The oracles: the single-process objective on the concatenated batch, in float64.
# -------------------------------------------------------------------------------------------------


def _ddp_oracle(state, x_all):
    model = Model(backend="reference", gather=False).double()
    model.load_state_dict(state)
    x = x_all.double().requires_grad_(True)
    z = model.linear(x)
    loss = reference.siglip_loss(z[:, 0], z[:, 1], model.loss.logit_scale.exp(), model.loss.logit_bias)
    loss.backward()
    return dict(loss=loss.detach(), x_grad=x.grad, grads={k: p.grad for k, p in model.named_parameters()})


def _functional_oracle(z_all):
    z1 = z_all[:, 0].double().requires_grad_(True)
    z2 = z_all[:, 1].double().requires_grad_(True)
    t = torch.tensor(INIT_T, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(INIT_B, dtype=torch.float64, requires_grad=True)
    loss = reference.siglip_loss(z1, z2, t, b)
    loss.backward()
    return dict(loss=loss.detach(), z1_grad=z1.grad, z2_grad=z2.grad, t_grad=t.grad, b_grad=b.grad)


def _close(actual, expected, what, dtype=torch.float32, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * float(scale), msg=lambda m: f"{what}: {m}")  # fmt: skip


# -------------------------------------------------------------------------------------------------
# Under DDP.
# -------------------------------------------------------------------------------------------------

DDP_PARAMS = [
    pytest.param(world, backend, mode, split, id=f"W{world}-{backend}-{mode}-{split}")
    for world in SPLITS
    for backend in CPU_BACKENDS
    for mode in MODES
    for split in SPLITS[world]
]


@pytest.mark.parametrize("world, backend, mode, split", DDP_PARAMS)
def test_matches_single_process(world, backend, mode, split, tmp_path_factory):
    run = _launch(world, tmp_path_factory)
    expected = _ddp_oracle(run["data"]["state"], run["data"]["ddp_inputs"][(backend, split)])
    key = ("ddp", backend, mode, split)
    got = [r[key] for r in run["ranks"]]
    n = sum(SPLITS[world][split])
    _close(torch.stack([g["loss"] for g in got]).mean(), expected["loss"], f"{key} mean loss over ranks")
    # x_grad[:, 0] is the x tower's input gradient, x_grad[:, 1] the y tower's.
    _close(torch.cat([g["x_grad"] for g in got]) / world, expected["x_grad"], f"{key} input gradient / W")
    for r, g in enumerate(got):
        for name, want in expected["grads"].items():
            # t' and b (and the projector's bias) are sums over the N² pairs.
            _close(g["grads"][name], want, f"{key} DDP gradient of {name}, rank {r}", scale=n)


@pytest.mark.parametrize("world", list(SPLITS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ring_equals_gather_under_ddp(world, backend, tmp_path_factory):
    run = _launch(world, tmp_path_factory)
    for split in SPLITS[world]:
        for r, results in enumerate(run["ranks"]):
            ring, gather = results[("ddp", backend, "ring", split)], results[("ddp", backend, "gather", split)]
            what = f"W{world} {backend} {split} rank {r}"
            _close(ring["loss"], gather["loss"], f"{what}: ring loss vs all-gather loss")
            _close(ring["x_grad"], gather["x_grad"], f"{what}: ring input gradient vs all-gather")
            for name, want in gather["grads"].items():
                _close(ring["grads"][name], want, f"{what}: ring gradient of {name} vs all-gather")


# -------------------------------------------------------------------------------------------------
# Functional, each rank's own gradients; the collectives.
# -------------------------------------------------------------------------------------------------

FUNCTIONAL_PARAMS = [
    pytest.param(world, backend, dtype, id=f"W{world}-{backend}-{str(dtype).removeprefix('torch.')}")
    for world in SPLITS
    for backend, dtype in FUNCTIONAL
]


@pytest.mark.parametrize("world, backend, dtype", FUNCTIONAL_PARAMS)
def test_each_rank_gradients(world, backend, dtype, tmp_path_factory):
    """Rank by rank, the ring's loss and gradients of z1, z2, t and b are the all-gather's; t and b
    get this rank's terms in both modes, so their sums over the ranks (before DDP's 1/W) are the
    single-process gradients, as are the input gradients of every rank's rows."""
    run = _launch(world, tmp_path_factory)
    expected = _functional_oracle(run["data"]["functional_inputs"][(backend, dtype)])
    n = sum(SPLITS[world]["uneven"])
    for mode in MODES:
        got = [r[("functional", backend, dtype, mode)] for r in run["ranks"]]
        what = f"W{world} {backend} {dtype} {mode}"
        _close(torch.stack([g["loss"] for g in got]).mean(), expected["loss"], f"{what}: mean loss", dtype)
        for name in ("z1_grad", "z2_grad"):
            _close(torch.cat([g[name] for g in got]) / world, expected[name], f"{what}: {name} / W", dtype)
        for name in ("t_grad", "b_grad"):  # sums over the N² pairs
            _close(sum(g[name] for g in got) / world, expected[name], f"{what}: {name} summed / W", dtype, scale=n)
    for r, results in enumerate(run["ranks"]):
        ring, gather = results[("functional", backend, dtype, "ring")], results[("functional", backend, dtype, "gather")]
        for name in ("loss", "z1_grad", "z2_grad", "t_grad", "b_grad"):
            _close(ring[name], gather[name], f"W{world} {backend} {dtype} rank {r}: ring {name} vs all-gather", dtype)


@pytest.mark.parametrize("world, backend, dtype", FUNCTIONAL_PARAMS)
def test_ring_never_all_gathers(world, backend, dtype, tmp_path_factory):
    """Forward and backward of the ring: no all-gather but the shape exchange, no all-reduce, and
    point-to-point blocks (and accumulators) of at most one rank's rows; the all-gather mode, under
    the same spy, gathers this rank's columns and all-reduces their gradients."""
    run = _launch(world, tmp_path_factory)
    sizes = SPLITS[world]["uneven"]
    for r, results in enumerate(run["ranks"]):
        ring = results[("functional", backend, dtype, "ring")]["calls"]
        gather = results[("functional", backend, dtype, "gather")]["calls"]
        assert ring, f"rank {r}: the spy saw no transfer in the ring at all"
        assert all(name in ("all_gather", "p2p") for name, _ in ring), (r, ring)
        assert all(size <= SHAPE_EXCHANGE for name, size in ring if name == "all_gather"), (r, ring)
        p2p = [size for name, size in ring if name == "p2p"]
        # Forward: W − 1 sends and receives; backward: blocks, accumulators and the hop home.
        assert len(p2p) == 2 * (world - 1) + 2 * (world - 1) + 2 * (world - 2) + 2, (r, ring)
        assert max(p2p) <= max(sizes) * D, (r, ring)
        assert ("all_gather", max(sizes) * D) in gather, (r, gather)  # padded to the longest block
        assert any(name == "all_reduce" and size >= world * max(sizes) * D for name, size in gather), (r, gather)


@pytest.mark.parametrize("world", list(SPLITS))
def test_errors_on_every_rank(world, tmp_path_factory):
    run = _launch(world, tmp_path_factory)
    for r, results in enumerate(run["ranks"]):
        assert "backend='reference'" in results["ring_reference"], (r, results["ring_reference"])
        assert "gather_distributed" in results["ring_reference"], (r, results["ring_reference"])
        assert "same trailing dimensions" in results["ring_mismatch"], (r, results["ring_mismatch"])


# -------------------------------------------------------------------------------------------------
# Without a process group.
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather", list(MODES.values()))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uninitialised_falls_back_to_single_process(backend, gather):
    assert not dist.is_initialized()
    z1, z2 = torch.randn(9, 5), torch.randn(9, 5)
    distributed = fastssl.siglip_loss(z1, z2, 4.0, -2.0, gather_distributed=gather, backend=backend)
    torch.testing.assert_close(distributed, fastssl.siglip_loss(z1, z2, 4.0, -2.0, backend=backend))
    assert math.isfinite(float(distributed))
    module = fastssl.nn.SigLIPLoss(4.0, -2.0, gather_distributed=gather, backend=backend)
    torch.testing.assert_close(module(z1, z2), distributed)
    # The reference backend is the single-process spec: without a process group it simply runs.
    spec = fastssl.siglip_loss(z1, z2, 4.0, -2.0, gather_distributed=gather, backend="reference")
    _close(spec, distributed, f"{backend} {gather!r} against the spec")


def test_gather_argument_checks():
    with pytest.raises(ValueError, match="gather_distributed must be False, True or 'ring'"):
        fastssl.nn.SigLIPLoss(gather_distributed="all")
    with pytest.raises(TypeError, match="gather_distributed must be False, True or 'ring'"):
        fastssl.siglip_loss(torch.randn(3, 2), torch.randn(3, 2), gather_distributed=1)
    assert fastssl.nn.SigLIPLoss(gather_distributed="ring").gather_distributed == "ring"
