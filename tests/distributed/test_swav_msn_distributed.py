"""SwaV's sinkhorn_gather_distributed and MSN's gather_distributed with real processes: W = 2 and 3 gloo
ranks on the CPU, uneven batch splits, float64.

With the gather, the Sinkhorn-Knopp steps (Cuturi 2013) take every prototype's total over the rows
of all ranks and each sample's over the prototypes locally (lightly 1.6's all_reduce of the row sums),
dividing each rank's columns by its own rows x ranks; the loss and its gradients stay local. The
oracle writes lightly's rule out literally on the concatenated scores (with even splits it is the
single-process Sinkhorn-Knopp of the concatenated batch, checked too), slices the rank's codes, and
writes the rank's loss out with them (autograd for the gradients). Each rank runs the fused losses on the torch backend and SwaV on scores;
where lightly is installed, each rank's loss and gradients are also compared with lightly's.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastssl
from fastssl import reference
from tests.utils import LIGHTLY_AVAILABLE

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)

LAUNCH_TIMEOUT_S = 180
SPLITS = {2: [3, 5], 3: [4, 2, 3]}  # images per rank
H, L, BQ, K, D, V = 2, 2, 4, 11, 5, 3  # SwaV views and queue rows per rank; MSN anchor views V
TAU, EPS, SHARPEN = 0.2, 0.1, 0.3
ITERATIONS = (3, 0)


def _data(world: int) -> dict:
    gen = torch.Generator().manual_seed(world)
    n = sum(SPLITS[world])

    def rows(*shape):
        return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=gen), dim=-1)

    return dict(high=rows(H, n, D), low=rows(L, n, D), queue=rows(H, world * BQ, D), w=rows(K, D),
                anchors=torch.randn(V, n, D, dtype=torch.float64, generator=gen),
                targets=torch.randn(n, D, dtype=torch.float64, generator=gen))  # fmt: skip


def _local(data: dict, world: int, rank: int) -> dict:
    start, size = sum(SPLITS[world][:rank]), SPLITS[world][rank]
    return dict(high=data["high"][:, start : start + size], low=data["low"][:, start : start + size],
                queue=data["queue"][:, rank * BQ : (rank + 1) * BQ], w=data["w"],
                anchors=data["anchors"][:, start : start + size].reshape(-1, D),
                targets=data["targets"][start : start + size])  # fmt: skip


def _run(local: dict, iterations: int, lightly_loss=None) -> dict:
    """{name: (loss, grads of the local inputs)} of every distributed loss on this rank."""
    out = {}

    def grads(name, fn, *inputs):
        inputs = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*inputs).reshape(())
        out[name] = (loss.detach(), [g for g in torch.autograd.grad(loss, inputs)])

    kw = dict(temperature=TAU, sinkhorn_iterations=iterations, sinkhorn_epsilon=EPS, sinkhorn_gather_distributed=True)
    q = local["queue"]
    grads("swav fused", lambda h, v, w: fastssl.swav_loss(h, v, w, q, backend="torch", **kw),
          local["high"], local["low"], local["w"])  # fmt: skip
    grads("swav scores", lambda h, v, w: fastssl.swav_loss_from_scores(list(h @ w.T), list(v @ w.T),
                                                                       list(q @ w.T), **kw),
          local["high"], local["low"], local["w"])  # fmt: skip
    msn_kw = dict(temperature=TAU, sinkhorn_iterations=iterations, regularization_weight=0.5, gather_distributed=True)
    grads("msn fused", lambda a, w: fastssl.msn_loss(a, local["targets"], w, SHARPEN, backend="torch", **msn_kw),
          local["anchors"], local["w"])  # fmt: skip
    if lightly_loss is not None:
        swav = lightly_loss.SwaVLoss(TAU, iterations, EPS, sinkhorn_gather_distributed=True)
        grads("swav lightly", lambda h, v, w: swav(list(h @ w.T), list(v @ w.T), list(q @ w.T)),
              local["high"], local["low"], local["w"])  # fmt: skip
        msn = lightly_loss.MSNLoss(TAU, iterations, 0.5, gather_distributed=True)
        grads("msn lightly", lambda a, w: msn(a, local["targets"], w, SHARPEN), local["anchors"], local["w"])
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:
            import lightly.loss as lightly_loss
        except ImportError:
            lightly_loss = None
        local = _local(_data(world), world, rank)
        results = {iterations: _run(local, iterations, lightly_loss) for iterations in ITERATIONS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort interpreter finalisation; the results are on disk


_RUNS: dict = {}


def _launch(world: int, tmp_path_factory) -> list:
    if world not in _RUNS:
        _RUNS[world] = f"the launch of {world} ranks failed in an earlier test (its report has the cause)"
        tmp = tmp_path_factory.mktemp(f"swav_world{world}")
        context = mp.start_processes(_worker, args=(world, str(tmp / "rendezvous"), str(tmp)), nprocs=world,
                                     join=False)  # fmt: skip
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} gloo ranks did not finish within {LAUNCH_TIMEOUT_S} s (a hang, killed)")
        _RUNS[world] = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
    if isinstance(_RUNS[world], str):
        pytest.fail(_RUNS[world])
    return _RUNS[world]


# -------------------------------------------------------------------------------------------------
# the oracle: global codes, local losses


def _lightly_sinkhorn(blocks: list, iterations: int, column_scale: list) -> list:
    """lightly 1.6's distributed Sinkhorn-Knopp, written on the concatenation of the ranks' (n_r, K)
    blocks of exp(scores/ε) (SwaV) or probabilities (MSN): Q = the blocks' transpose over the global
    sum; each step divides every prototype's row by its total over all ranks (MSN: and by K), then
    every sample's column by its total and by its rank's column_scale (SwaV: n_r·W, MSN: n_r); the
    codes are Qᵀ times that scale. With unequal n_r a rank's rows weigh as 1/n_r: not the codes of
    the concatenated batch on one process."""
    sizes = [b.shape[0] for b in blocks]
    q = torch.cat(blocks).T
    q = q / q.sum()
    scale = torch.cat([torch.full((n,), float(c), dtype=q.dtype) for n, c in zip(sizes, column_scale)])
    msn = column_scale == sizes
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / (q.shape[0] if msn else 1)
        q = q / q.sum(dim=0, keepdim=True) / scale
    return list((q * scale).T.split(sizes))


def _swav_codes(data: dict, world: int, rank: int, iterations: int) -> list:
    """Rank `rank`'s codes per high-resolution view, from every rank's [high; queue] rows."""
    codes = []
    for i in range(H):
        blocks = [torch.cat([_local(data, world, r)["high"][i], _local(data, world, r)["queue"][i]]) @ data["w"].T
                  for r in range(world)]  # fmt: skip
        blocks = [torch.exp(b / EPS) for b in blocks]
        q = _lightly_sinkhorn(blocks, iterations, [b.shape[0] * world for b in blocks])[rank]
        codes.append(q[: SPLITS[world][rank]])
    return codes


def _swav_with_codes(codes, high, low, w):
    views = [z @ w.T for z in (*high, *low)]
    total = 0.0
    for i, q in enumerate(codes):
        for v, z in enumerate(views):
            if v != i:
                total = total - (q * torch.log_softmax(z / TAU, dim=1)).sum(1).mean()
    return total / (H * (len(views) - 1))


def _msn_codes(data: dict, world: int, rank: int, iterations: int):
    t, w = F.normalize(data["targets"], dim=1), F.normalize(data["w"], dim=1)
    probs = torch.softmax(t @ w.T / (TAU * SHARPEN), dim=1)  # the sharpened target probabilities
    blocks = list(probs.split(SPLITS[world]))
    if iterations == 0:  # MSN's T = 0: the sharpened probabilities themselves
        return blocks[rank]
    return _lightly_sinkhorn(blocks, iterations, SPLITS[world])[rank]


def _msn_with_codes(codes, anchors, w):
    a, wn = F.normalize(anchors, dim=1), F.normalize(w, dim=1)
    log_p = torch.log_softmax(a @ wn.T / TAU, dim=1)
    ce = -(codes.repeat(V, 1) * log_p).sum(1).mean()
    mean = log_p.exp().mean(0)
    return ce + 0.5 * ((mean * mean.log()).sum() + torch.log(torch.tensor(float(K), dtype=mean.dtype)))


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", sorted(SPLITS))
@pytest.mark.parametrize("iterations", ITERATIONS)
def test_each_rank_matches_the_global_codes(world, iterations, tmp_path_factory):
    ranks = _launch(world, tmp_path_factory)
    data = _data(world)
    for rank, results in enumerate(ranks):
        local = _local(data, world, rank)
        inputs = [local[k].clone().requires_grad_() for k in ("high", "low", "w")]
        codes = _swav_codes(data, world, rank, iterations)
        want = _swav_with_codes(codes, *inputs)
        want_grads = torch.autograd.grad(want, inputs)
        for name in ("swav fused", "swav scores"):
            loss, grads = results[iterations][name]
            _close(loss, want.detach(), f"{name} loss, rank {rank} of {world}, T={iterations}")
            for label, a, b in zip(("d high", "d low", "d w"), grads, want_grads):
                _close(a, b, f"{name} {label}, rank {rank} of {world}, T={iterations}")
        anchors, w = local["anchors"].clone().requires_grad_(), local["w"].clone().requires_grad_()
        want = _msn_with_codes(_msn_codes(data, world, rank, iterations), anchors, w)
        want_grads = torch.autograd.grad(want, (anchors, w))
        loss, grads = results[iterations]["msn fused"]
        _close(loss, want.detach(), f"msn loss, rank {rank} of {world}, T={iterations}")
        for label, a, b in zip(("d anchors", "d w"), grads, want_grads):
            _close(a, b, f"msn {label}, rank {rank} of {world}, T={iterations}")


@pytest.mark.skipif(not LIGHTLY_AVAILABLE, reason="lightly is not installed (see README, 'Checking against lightly')")
@pytest.mark.parametrize("world", sorted(SPLITS))
def test_each_rank_matches_lightly(world, tmp_path_factory):
    ranks = _launch(world, tmp_path_factory)
    for rank, by_iterations in enumerate(ranks):
        for iterations, results in by_iterations.items():
            for ours, theirs in (("swav fused", "swav lightly"), ("swav scores", "swav lightly"),
                                 ("msn fused", "msn lightly")):  # fmt: skip
                (loss, grads), (want, want_grads) = results[ours], results[theirs]
                _close(loss, want, f"{ours} loss, rank {rank} of {world}, T={iterations}")
                for a, b in zip(grads, want_grads):
                    _close(a, b, f"{ours} grad, rank {rank} of {world}, T={iterations}")


def test_even_split_rule_is_the_concatenated_batch():
    """The oracle's per-rank rule, on equal splits, is fastssl.reference's Sinkhorn-Knopp of the whole batch."""
    scores = torch.randn(8, 5, dtype=torch.float64)
    for iterations in (1, 3):
        blocks = [torch.exp(b / EPS) for b in scores.split([4, 4])]
        got = torch.cat(_lightly_sinkhorn(blocks, iterations, [8, 8]))
        torch.testing.assert_close(got, reference.swav_sinkhorn(scores, iterations, EPS), rtol=1e-10, atol=1e-12)
        probs = torch.softmax(scores, dim=1)
        got = torch.cat(_lightly_sinkhorn(list(probs.split([4, 4])), iterations, [4, 4]))
        torch.testing.assert_close(got, reference.msn_sinkhorn(probs, iterations), rtol=1e-10, atol=1e-12)
