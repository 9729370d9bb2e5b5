"""The Triton launches of the prototype-codes ops (SwaV's and MSN's Sinkhorn-Knopp LSE passes), compiled
ahead of time for sm_90 (and sm_80) without a GPU.

fastssl.kernels.triton.prototype_codes adds no kernel: it launches the prototype-CE forward kernel
LSE-only with a centre (HAS_MEAN off, HAS_CENTER on), a flag combination that
tests/gpu/test_prototype_ce_aot.py does not compile. This file compiles it with that file's
machinery (same subprocess without TRITON_INTERPRET, same checks: every job compiles, bf16/fp16 use
tensor cores, no register spill, shared memory within the device and within the estimate the
autotuner prunes with), for every config the autotuner may keep:
  * bf16 at D = 128 (SwaV's projection), D = 256 (resident) and D = 512 (the D loop), sm_90;
  * fp16 at D = 128 and fp32 at D = 128 (CUDA-core dots), sm_90;
  * bf16 at D = 128 on sm_80.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900
FLAGS = "lse-center"


def _jobs():
    import torch

    from fastssl.kernels.triton import prototype_ce as P
    from tests.gpu import test_prototype_ce_aot as base

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    jobs = []
    for dt, d, arch in (("fp32", 128, 90), ("bf16", 128, 90), ("bf16", 256, 90), ("bf16", 512, 90),
                        ("fp16", 128, 90), ("bf16", 128, 80)):  # fmt: skip
        block_k, single_k, block_dout = P.tile_dims(d, dtypes[dt])
        if not single_k:
            block_dout = block_k  # as the launcher: an LSE-only forward has no output slices
        flags = dict(base._FWD_FLAGS[FLAGS], SINGLE_K=single_k)
        for cfg in P.candidate_configs("fwd", dtypes[dt].itemsize, block_k, single_k, block_dout,
                                       base.SMEM_LIMIT[arch], P.out_operand("fwd", flags)):  # fmt: skip
            jobs.append(dict(group=f"{dt} D={d} sm_{arch}", kind="fwd", dtype=dt, D=d, flags=FLAGS, arch=arch,
                             BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, cfg=base._cfg_key(cfg)))  # fmt: skip
    return jobs


def _main():
    sys.path.insert(0, str(REPO))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tests.gpu import test_prototype_ce_aot as base

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter's @triton.jit cannot be compiled")
    # The LSE pass with a centre: the flags the launcher of fastssl.kernels.triton.prototype_codes sets.
    base._FWD_FLAGS[FLAGS] = dict(HAS_CENTER=True, HAS_MEAN=False, V_IS_A=False)
    jobs = _jobs()
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        records = list(pool.map(base._compile, jobs))
    json.dump(dict(records=records), sys.stdout)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"AOT compilation did not finish in {TIMEOUT_S} s; stderr tail:\n{(e.stderr or '')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"AOT compile subprocess failed (rc={proc.returncode}); stderr tail:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout)


def _name(r):
    return f"{r['group']} BLOCK_M={r['BLOCK_M']} BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']}"


def _compiled(report):
    return [r for r in report["records"] if "error" not in r]


def test_the_launch_flags_are_compiled():
    """The flags compiled here are the ones prototype_codes' launcher passes (an LSE pass with a centre)."""
    import inspect

    from fastssl.kernels.triton import prototype_ce as P
    from fastssl.kernels.triton import prototype_codes

    assert "_row_stats(x, a, None, center" in inspect.getsource(prototype_codes.prototype_lse)
    source = inspect.getsource(P._row_stats)
    assert "HAS_CENTER=center is not None, HAS_MEAN=v is not None" in source


def test_every_job_compiles(report):
    failed = [f"{_name(r)}:\n{r['error']}" for r in report["records"] if "error" in r]
    assert not failed, f"{len(failed)} of {len(report['records'])} compiles failed:\n\n" + "\n\n".join(failed)
    assert {r["group"] for r in report["records"]} >= {"bf16 D=128 sm_90", "bf16 D=512 sm_90", "fp32 D=128 sm_90"}


def test_tensor_cores(report):
    bad = [_name(r) for r in _compiled(report)
           if r["dtype"] != "fp32" and not (r["wgmma"] if r["arch"] == 90 else r["mma"] or r["wgmma"])]  # fmt: skip
    assert not bad, "no tensor-core instruction (wgmma on sm_90, mma.sync on sm_80) in:\n" + "\n".join(bad)


def test_no_register_spills(report):
    spilling = [f"{_name(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
                for r in _compiled(report) if r["spill_stores"] or r["spill_loads"]]  # fmt: skip
    assert not spilling, "register spills (ptxas -v):\n" + "\n".join(spilling)


def test_shared_memory(report):
    from tests.gpu.test_prototype_ce_aot import SMEM_LIMIT

    over = [f"{_name(r)}: {r['shared']} B > {SMEM_LIMIT[r['arch']]} B"
            for r in _compiled(report) if r["shared"] > SMEM_LIMIT[r["arch"]]]  # fmt: skip
    assert not over, "shared memory over the device limit:\n" + "\n".join(over)
    under = [f"{_name(r)}: uses {r['shared']} B, estimated {r['estimate']} B"
             for r in _compiled(report) if r["shared"] > r["estimate"]]  # fmt: skip
    assert not under, "smem_estimate below the compiled kernel's shared memory:\n" + "\n".join(under)


if __name__ == "__main__":
    _main()
