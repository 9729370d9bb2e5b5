"""TiCoLoss(gather_distributed=True) with 2 real gloo ranks on the CPU, against one process.

lightly's semantics: z_a and z_b are gathered from every rank, every rank computes the loss of the
global batch and updates its running C with the global batch. So, on an uneven split (4 + 7 rows)
over three training steps: every rank's loss equals the single-process loss of the concatenated
batch; every rank's C equals the single-process C; and each rank's input gradient, divided by the
world size (DDP's averaging of a loss that every rank computes whole), equals the single-process
gradient of that rank's rows.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastssl.nn as fnn
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)

SIZES = [4, 7]
D, STEPS = 6, 3
LAUNCH_TIMEOUT_S = 180


def _worker(rank: int, init_file: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SIZES))
    try:
        data = torch.load(data_path)
        start = sum(SIZES[:rank])
        module = fnn.TiCoLoss(beta=0.7, gather_distributed=True, backend="torch")
        results = []
        for z_a_all, z_b_all in data:
            z_a = z_a_all[start : start + SIZES[rank]].clone().requires_grad_()
            z_b = z_b_all[start : start + SIZES[rank]].clone().requires_grad_()
            loss = module(z_a, z_b)
            loss.backward()
            results.append(dict(loss=loss.detach(), grad_a=z_a.grad, grad_b=z_b.grad, C=module.C.clone()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed/test_distributed.py: skip gloo's teardown at exit


def test_tico_gather_matches_single_process(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(sum(SIZES), D, generator=gen), torch.randn(sum(SIZES), D, generator=gen)) for _ in range(STEPS)]
    torch.save(data, tmp_path / "data.pt")
    context = mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "data.pt"), str(tmp_path)),
                                 nprocs=len(SIZES), join=False)  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{len(SIZES)} gloo ranks did not finish within {LAUNCH_TIMEOUT_S} s (a hang, killed)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(SIZES))]

    single = fnn.TiCoLoss(beta=0.7, backend="torch")
    for step, (z_a_all, z_b_all) in enumerate(data):
        z_a, z_b = z_a_all.clone().requires_grad_(), z_b_all.clone().requires_grad_()
        loss = single(z_a, z_b)
        loss.backward()
        for r, results in enumerate(ranks):
            got, rows = results[step], slice(sum(SIZES[:r]), sum(SIZES[: r + 1]))
            what = f"step {step} rank {r}"
            assert_close(got["loss"], loss, torch.float32, what=f"loss {what}")
            assert_close(got["C"], single.C, torch.float32, what=f"C {what}")
            for name, grad in (("grad_a", z_a.grad), ("grad_b", z_b.grad)):
                assert_close(got[name] / len(SIZES), grad[rows], torch.float32, what=f"{name} {what}",
                             scale=float(grad.abs().max()))  # fmt: skip
