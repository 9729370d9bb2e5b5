"""gather_distributed with real processes: W = 2, 3, 4 gloo ranks on the CPU (docs/distributed.md).

One launch per world size (torch.multiprocessing.spawn, file:// rendezvous) runs every loss, in
every mode it accepts (all-gather True, and "ring" for the pairwise-LSE losses), on an even and an
uneven split of one global batch. Each rank feeds its rows through a tiny linear projector wrapped
in a real DistributedDataParallel, computes the loss, runs backward and saves what it got. The parent
then checks them against the float64 single-process computation on the concatenated batch:

* the loss averaged over the ranks (what DDP's gradient averaging differentiates) equals the
  single-process loss — and, for the losses that every rank computes whole, each rank's loss does;
* the projector's gradients, after DDP's own averaging, equal the single-process ones on every rank;
* every input gradient, divided by W (DDP's averaging), equals the single-process gradient of that
  rank's rows;
* CLIP's learnable temperature gets the single-process gradient after averaging; the MoCo bank holds
  every rank's keys, as the single-process bank does.

Where lightly 1.6 defines the distributed loss otherwise, the oracle is lightly's objective written
out for the concatenated batch: Barlow Twins batch-normalises each rank's slice and averages the
ranks' C; DCLW's weights are a softmax over each rank's batch.
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
import torch.nn.functional as F
from torch import nn

import fastssl
import fastssl.distributed as fdist
import fastssl.nn as fnn
from fastssl.ops.pairwise_lse import PairwiseLSEFlags, pairwise_lse
from tests.utils import CPU_BACKENDS, LIGHTLY_AVAILABLE, TOLERANCES

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)

D_IN, D = 7, 6
#: One launch runs every case of a world size in a few seconds; past this, a rank is stuck.
LAUNCH_TIMEOUT_S = 180
BANK = 64
TAU_DCL, SIGMA = 0.1, 0.5

#: Per-rank batch sizes of the global batch, per world size: equal, and unequal.
SPLITS = {
    2: {"even": [5, 5], "uneven": [4, 7]},
    3: {"even": [4, 4, 4], "uneven": [3, 5, 4]},
    4: {"even": [3, 3, 3, 3], "uneven": [3, 5, 3, 4]},
}
# At least 3 rows per rank: Barlow Twins batch-normalises each rank's slice, and a 2-row batch norm
# maps every column to ±1 whatever the data, which leaves an ill-conditioned, near-zero gradient.

#: loss -> (views per sample, modes, whether every rank computes the whole loss)
CASES = {
    "nt_xent": (2, ("gather", "ring"), False),
    "moco": (2, ("gather",), False),
    "dcl": (2, ("gather", "ring"), False),
    "dclw": (2, ("gather", "ring"), False),
    "clip": (2, ("gather", "ring"), False),
    "barlow_twins": (2, ("gather",), True),
    "vicreg": (2, ("gather",), False),
    "spectral": (2, ("gather",), True),
    "vicreg_exp": (2, ("gather",), True),
    "vicreg_ctr": (2, ("gather", "ring"), False),
    "arcl": (3, ("gather", "ring"), False),
}


class Projector(nn.Module):
    """The model under DDP: one linear map applied to every view, (n, m, D_IN) -> (n, m, D)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D_IN, D)

    def forward(self, x):
        return self.linear(x)


def _module(name: str, gather):
    """The fastssl module of `name` with gather_distributed=gather, and its call on z (n, m, D)."""
    common = dict(gather_distributed=gather, backend="torch")
    if name == "moco":
        torch.manual_seed(123)  # the bank's initial draw, identical on every rank and in the oracle
        module = fnn.NTXentLoss(memory_bank_size=(BANK, D), **common)
    elif name == "arcl":
        module = fnn.ArCLLoss(**common)
        return module, lambda z: module(z)
    else:
        module = {
            "nt_xent": lambda: fnn.NTXentLoss(**common),
            "dcl": lambda: fnn.DCLLoss(**common),
            "dclw": lambda: fnn.DCLWLoss(sigma=SIGMA, **common),
            "clip": lambda: fnn.CLIPLoss(learnable_temperature=True, **common),
            "barlow_twins": lambda: fnn.BarlowTwinsLoss(**common),
            "vicreg": lambda: fnn.VICRegLoss(**common),
            "spectral": lambda: fnn.SpectralContrastiveLoss(**common),
            "vicreg_exp": lambda: fnn.VICRegExpLoss(**common),
            "vicreg_ctr": lambda: fnn.VICRegCtrLoss(**common),
        }[name]()
    return module, lambda z: module(z[:, 0], z[:, 1])


# -------------------------------------------------------------------------------------------------
# The worker: one process per rank.
# -------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, init_file: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = torch.load(data_path)
        model = Projector()
        model.load_state_dict(data["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        results = {}
        for (name, mode, split), x_all in data["inputs"].items():
            sizes = SPLITS[world][split]
            start = sum(sizes[:rank])
            x = x_all[start : start + sizes[rank]].clone().requires_grad_(True)
            module, call = _module(name, {"gather": True, "ring": "ring"}[mode])
            model.zero_grad(set_to_none=True)
            loss = call(ddp(x))
            loss.backward()
            out = dict(
                loss=loss.detach(),
                x_grad=x.grad,
                weight_grad=model.linear.weight.grad.clone(),
                bias_grad=model.linear.bias.grad.clone(),
            )
            if name == "clip":
                out["logit_scale_grad"] = module.logit_scale.grad.clone()
            if name == "moco":
                out["bank"] = module.memory_bank.bank.clone()
            results[(name, mode, split)] = out
        # A clear error (on every rank, no hang) for embeddings that differ across ranks.
        try:
            fnn.NTXentLoss(gather_distributed=True, backend="torch")(torch.randn(3, D + rank), torch.randn(3, D + rank))
            results["mismatch"] = "no error"
        except ValueError as err:
            results["mismatch"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # DDP's reducer holds gloo work; release it while the group is alive
        dist.barrier()  # no rank tears its connections down while a peer still reads from them
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's C++ threads can still hold tensors there, and their
    # teardown then aborts the process ("terminate called without an active exception", seen once
    # in CI after every result was saved). The results are on disk and every check is in the parent.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_RUNS: dict = {}


def _inputs(world: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + world)
    inputs = {}
    for name, (views, modes, _) in CASES.items():
        for mode in modes:
            for split, sizes in SPLITS[world].items():
                inputs[(name, mode, split)] = torch.randn(sum(sizes), views, D_IN, generator=gen)
    return inputs


def _launch(world: int, tmp_path_factory) -> dict:
    """The ranks' saved results for `world`, launched once; a failed launch fails every later test
    of that world size at once with the same message (no relaunch, no second wait on a hang)."""
    if world not in _RUNS:
        _RUNS[world] = f"the launch of {world} ranks failed in an earlier test (its report has the cause)"
        tmp = tmp_path_factory.mktemp(f"world{world}")
        torch.manual_seed(world)
        state = Projector().state_dict()
        data = dict(state=state, inputs=_inputs(world))
        torch.save(data, tmp / "data.pt")
        context = mp.start_processes(
            _worker, args=(world, str(tmp / "rendezvous"), str(tmp / "data.pt"), str(tmp)), nprocs=world, join=False
        )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not context.join(timeout=1):  # raises, with the worker's traceback, if a rank fails
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} gloo ranks did not finish within {LAUNCH_TIMEOUT_S} s (a hang, killed)")
        ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
        _RUNS[world] = dict(data=data, ranks=ranks)
    if isinstance(_RUNS[world], str):
        pytest.fail(_RUNS[world])
    return _RUNS[world]


# -------------------------------------------------------------------------------------------------
# The oracle: the single-process objective on the concatenated batch, in float64.
# -------------------------------------------------------------------------------------------------


def _barlow_twins_per_rank(z1, z2, sizes, lambda_param=5e-3):
    """lightly's distributed Barlow Twins: C = mean over ranks of (BN(z1_r)ᵀ BN(z2_r) / n_r)."""
    cs = []
    for a, b in zip(z1.split(sizes), z2.split(sizes)):
        a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
        b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
        cs.append(a.T @ b / a.shape[0])
    c = torch.stack(cs).mean(0)
    diag = torch.diagonal(c)
    return (1 - diag).square().sum() + lambda_param * (c.square().sum() - diag.square().sum())


def _dclw_per_rank(z1, z2, sizes, tau=TAU_DCL, sigma=SIGMA):
    """DCLW on the concatenated batch, with lightly's distributed weights (a softmax per rank's batch)."""
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)

    def weights(p, q):
        return torch.cat(
            [2 - pr.shape[0] * torch.softmax((pr * qr).sum(1).detach() / sigma, 0) for pr, qr in zip(p.split(sizes), q.split(sizes))]
        )

    def half(p, q, w):
        n = p.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        s_pp, s_pq = p @ p.T / tau, p @ q.T / tau
        negatives = torch.cat([s_pp.masked_fill(eye, -math.inf), s_pq.masked_fill(eye, -math.inf)], 1)
        return (-w * torch.diagonal(s_pq) + torch.logsumexp(negatives, 1)).mean()

    return 0.5 * (half(a, b, weights(a, b)) + half(b, a, weights(b, a)))


def _oracle(name: str, state: dict, x_all: torch.Tensor, sizes: list[int]) -> dict:
    model = Projector().double()
    model.load_state_dict(state)
    x = x_all.double().requires_grad_(True)
    z = model(x)
    z.retain_grad()
    z1, z2 = z[:, 0], z[:, 1]
    extra = {}
    ref = dict(backend="reference")
    if name == "nt_xent":
        loss = fastssl.nt_xent_loss(z1, z2, 0.5, **ref)
    elif name == "moco":
        torch.manual_seed(123)
        bank = fnn.MemoryBankModule(size=(BANK, D)).bank.double()
        loss = fastssl.moco_loss(z1, z2, bank, 0.5, **ref)
        after = bank.clone()
        after[: z2.shape[0]] = F.normalize(z2.detach(), dim=1)
        extra["bank"] = after
    elif name == "dcl":
        loss = fastssl.dcl_loss(z1, z2, TAU_DCL, **ref)
    elif name == "dclw":
        loss = _dclw_per_rank(z1, z2, sizes)
    elif name == "clip":
        clip = fnn.CLIPLoss(learnable_temperature=True, **ref).double()
        loss = clip(z1, z2)
        extra["clip"] = clip
    elif name == "barlow_twins":
        loss = _barlow_twins_per_rank(z1, z2, sizes)
    elif name == "vicreg":
        loss = fastssl.vicreg_loss(z1, z2, **ref)
    elif name == "spectral":
        loss = fastssl.spectral_contrastive_loss(z1, z2, **ref)
    elif name == "vicreg_exp":
        loss = fastssl.vicreg_exp_loss(z1, z2, **ref)
    elif name == "vicreg_ctr":
        loss = fastssl.vicreg_ctr_loss(z1, z2, **ref)
    elif name == "arcl":
        loss = fastssl.arcl_loss(z, 0.5, **ref)
    else:
        raise KeyError(name)
    loss.backward()
    out = dict(loss=loss.detach(), x_grad=x.grad, weight_grad=model.linear.weight.grad, bias_grad=model.linear.bias.grad)
    # The bias gradient is Σ over rows and views of ∂loss/∂z; for the batch-normalised Barlow Twins it
    # is exactly 0, a cancelling sum whose fp32 rounding is relative to Σ|∂loss/∂z|, not to 0.
    out["bias_grad_magnitude"] = z.grad.abs().sum((0, 1)).max()
    if "clip" in extra:
        out["logit_scale_grad"] = extra["clip"].logit_scale.grad
    if "bank" in extra:
        out["bank"] = extra["bank"]
    return out


def _close(actual, expected, what, scale=1.0):
    """The fp32 row of the tolerance table; `scale` multiplies atol for a sum of terms of that size."""
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol * float(scale),
        msg=lambda m: f"{what}: {m}",
    )


PARAMS = [
    pytest.param(world, name, mode, split, id=f"W{world}-{name}-{mode}-{split}")
    for world in SPLITS
    for name, (_, modes, _) in CASES.items()
    for mode in modes
    for split in ("even", "uneven")
]


@pytest.mark.parametrize("world, name, mode, split", PARAMS)
def test_matches_single_process(world, name, mode, split, tmp_path_factory):
    run = _launch(world, tmp_path_factory)
    key = (name, mode, split)
    sizes = SPLITS[world][split]
    expected = _oracle(name, run["data"]["state"], run["data"]["inputs"][key], sizes)
    got = [r[key] for r in run["ranks"]]

    # The loss DDP's averaging differentiates: the mean over ranks.
    _close(torch.stack([g["loss"] for g in got]).mean(), expected["loss"], f"{key} mean loss over ranks")
    if CASES[name][2]:
        for r, g in enumerate(got):
            _close(g["loss"], expected["loss"], f"{key} loss of rank {r}")
    # Input gradients after DDP's averaging (÷W), rank by rank, in global row order.
    _close(torch.cat([g["x_grad"] for g in got]) / world, expected["x_grad"], f"{key} input gradient / W")
    # The projector's gradients after a real DDP's averaging, on every rank.
    for r, g in enumerate(got):
        _close(g["weight_grad"], expected["weight_grad"], f"{key} DDP weight gradient, rank {r}")
        _close(g["bias_grad"], expected["bias_grad"], f"{key} DDP bias gradient, rank {r}",
               scale=max(1.0, expected["bias_grad_magnitude"]))
    if name == "clip":  # a parameter outside DDP: averaged by hand
        mean_grad = torch.stack([g["logit_scale_grad"] for g in got]).mean(0)
        _close(mean_grad, expected["logit_scale_grad"], f"{key} logit_scale gradient averaged over ranks")
    if name == "moco":
        for r, g in enumerate(got):
            _close(g["bank"], expected["bank"], f"{key} memory bank of rank {r} after the step")


@pytest.mark.parametrize("world", list(SPLITS))
def test_mismatched_embeddings_error_on_every_rank(world, tmp_path_factory):
    run = _launch(world, tmp_path_factory)
    for r, got in enumerate(run["ranks"]):
        assert "same trailing dimensions" in got["mismatch"], f"rank {r}: {got['mismatch']}"


# -------------------------------------------------------------------------------------------------
# Against lightly 1.6 itself, rank by rank (where it is installed).
# -------------------------------------------------------------------------------------------------

LIGHTLY_PAIRS = ("NTXentLoss", "DCLLoss", "DCLWLoss", "BarlowTwinsLoss", "VICRegLoss")


def _lightly_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import lightly.loss

        n = 6
        z = torch.randn(world * n, 2, D, generator=torch.Generator().manual_seed(7))[rank * n : (rank + 1) * n]
        results = {}
        for name in LIGHTLY_PAIRS:
            for label, module in (
                ("lightly", getattr(lightly.loss, name)(gather_distributed=True)),
                ("fastssl", getattr(fnn, name)(gather_distributed=True, backend="torch")),
                ("fastssl-ring", getattr(fnn, name)(gather_distributed="ring", backend="torch")
                 if name in ("NTXentLoss", "DCLLoss", "DCLWLoss") else None),
            ):  # fmt: skip
                if module is None:
                    continue
                x = z.clone().requires_grad_(True)
                loss = module(x[:, 0], x[:, 1])
                loss.backward()
                results[(name, label)] = (loss.detach(), x.grad)
        torch.save(results, os.path.join(out_dir, f"lightly{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (see README, 'Checking against lightly')")
def test_matches_lightly_per_rank(tmp_path):
    """Each rank's loss and local input gradient equal lightly 1.6's with gather_distributed=True."""
    world = 2
    mp.spawn(_lightly_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    for r in range(world):
        results = torch.load(tmp_path / f"lightly{r}.pt")
        for (name, label), (loss, grad) in results.items():
            if label == "lightly":
                continue
            want_loss, want_grad = results[(name, "lightly")]
            _close(loss, want_loss, f"{name} {label} loss, rank {r}")
            _close(grad, want_grad, f"{name} {label} input gradient, rank {r}")


# -------------------------------------------------------------------------------------------------
# Without a process group: lightly's fallback to the single-process loss; argument checks.
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gather", [True, "ring"])
def test_uninitialised_falls_back_to_single_process(gather):
    assert not dist.is_initialized()
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    pairs = [
        (fnn.NTXentLoss(gather_distributed=gather), fnn.NTXentLoss()),
        (fnn.DCLWLoss(gather_distributed=gather), fnn.DCLWLoss()),
        (fnn.CLIPLoss(gather_distributed=gather), fnn.CLIPLoss()),
        (fnn.VICRegCtrLoss(gather_distributed=gather), fnn.VICRegCtrLoss()),
    ]
    if gather is True:
        pairs += [
            (fnn.BarlowTwinsLoss(gather_distributed=True), fnn.BarlowTwinsLoss()),
            (fnn.VICRegLoss(gather_distributed=True), fnn.VICRegLoss()),
            (fnn.SpectralContrastiveLoss(gather_distributed=True), fnn.SpectralContrastiveLoss()),
            (fnn.VICRegExpLoss(gather_distributed=True), fnn.VICRegExpLoss()),
        ]
    for distributed, single in pairs:
        assert torch.equal(distributed(z1, z2), single(z1, z2)), type(single).__name__
    views = torch.randn(6, 3, 5)
    assert torch.equal(fastssl.arcl_loss(views, gather_distributed=gather), fastssl.arcl_loss(views))
    # The reference backend is the single-process spec: without a process group it simply runs.
    assert torch.isfinite(fastssl.nt_xent_loss(z1, z2, gather_distributed=gather, backend="reference"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_decomposition(backend):
    """What both modes rely on, on each backend: the op with the all-columns flags is the plain LSE
    over a foreign block, and logaddexp(own block with masks, foreign block) is the op on the
    concatenated columns [own; foreign] (own first, so self i and positive i + n stay in place)."""
    n, m, d = 5, 7, 6
    x = F.normalize(torch.randn(2 * n, d), dim=1)
    foreign = F.normalize(torch.randn(m, d), dim=1)
    scale = torch.tensor(2.0)
    lse, _ = pairwise_lse(x, foreign, None, scale, backend=backend)  # the default flags: every column once
    _close(lse, torch.logsumexp(scale * x.double() @ foreign.double().T, dim=1), "all-columns LSE")
    for include_pos in (True, False):
        flags = PairwiseLSEFlags(pos_offset=n, exclude_self=True, include_pos=include_pos)
        own, pos = pairwise_lse(x[:n], x, None, scale, flags, backend=backend)
        whole, pos_whole = pairwise_lse(x[:n], torch.cat([x, foreign]), None, scale, flags, backend=backend)
        _close(torch.logaddexp(own, lse[:n]), whole, f"merged LSE, include_pos={include_pos}")
        _close(pos, pos_whole, "positive logit")


def test_gather_argument_checks():
    with pytest.raises(ValueError, match="'ring' is for the pairwise-LSE"):
        fnn.BarlowTwinsLoss(gather_distributed="ring")
    with pytest.raises(ValueError, match="'ring' is for the pairwise-LSE"):
        fastssl.vicreg_loss(torch.randn(4, 3), torch.randn(4, 3), gather_distributed="ring")
    with pytest.raises(ValueError, match="must be False, True or 'ring'"):
        fnn.NTXentLoss(gather_distributed="all")
    with pytest.raises(TypeError, match="must be False, True or 'ring'"):
        fnn.DCLLoss(gather_distributed=1)
    # With one rank every helper is the identity.
    x = torch.randn(3, 2)
    assert fdist.all_gather(x)[0] is x and fdist.all_reduce(x) is x and fdist.world_size() == 1


if __name__ == "__main__":  # pragma: no cover - `python tests/distributed/test_distributed.py` runs pytest on this file
    sys.exit(pytest.main([__file__, "-q"]))
