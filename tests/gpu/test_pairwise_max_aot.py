"""The pairwise-max Triton kernel (KoLeo's nearest neighbours) compiled ahead of time for sm_90 and sm_80.

docs/design.md, check 3, as tests/gpu/test_triton_aot.py does for the other families: no GPU is
needed. The test session runs under TRITON_INTERPRET=1, so the compiles run in one subprocess
without it — this file run as a script — which prints a JSON report. Jobs: the launch config of
every input dtype with D resident (bf16 and fp16 at the largest resident D = 256, fp32 at 128) and
in the D loop (odd D), the self mask on and off, sm_90 and sm_80. Checked: every compile succeeds,
half-precision dots run on tensor cores (wgmma on sm_90, mma.sync on sm_80), and shared memory
stays within each device's limit.
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
#: Max dynamic shared memory per block (bytes): 227 KiB on sm_90, 163 KiB on sm_80.
SMEM_LIMIT = {90: 232448, 80: 166912}
TIMEOUT_S = 600

#: (dtype, D, EXCLUDE_SELF, arch)
JOBS = [
    ("bf16", 256, True, 90),
    ("fp16", 256, True, 80),
    ("fp32", 128, True, 90),
    ("bf16", 1000, False, 90),
    ("fp32", 300, True, 80),
    ("bf16", 70, False, 80),
]


def _compile(dtype: str, d: int, exclude_self: bool, arch: int) -> dict:
    import traceback

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastssl.kernels.triton import pairwise_max as K

    rec = dict(dtype=dtype, D=d, exclude_self=exclude_self, arch=arch)
    try:
        meta = K.tile_config(d, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
        options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        consts = dict(meta, EXCLUDE_SELF=exclude_self, FP32_PRECISION=K.FP32_DOT_PRECISION, stride_xd=1, stride_yd=1)
        fn = K._pairwise_max_fwd_kernel
        pointee = {"X": dtype, "Y": dtype, "VALUE": "fp32", "INDEX": "i64"}
        sig = {name: "constexpr" if name in consts else ("*" + pointee[name] if name in pointee else "i32")
               for name in fn.arg_names}  # fmt: skip
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32), options=options)  # fmt: skip
        ptx = compiled.asm["ptx"]
        rec.update(shared=int(compiled.metadata.shared), wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx,
                   single_k=meta["SINGLE_K"])  # fmt: skip
    except Exception:
        rec["error"] = traceback.format_exc(limit=-6)
    return rec


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"AOT compilation did not finish in {TIMEOUT_S} s; stderr tail:\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"the compile subprocess failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_job_compiles(report):
    failed = [f"{r['dtype']} D={r['D']} sm_{r['arch']}:\n{r['error']}" for r in report if "error" in r]
    assert not failed, "\n\n".join(failed)
    assert len(report) == len(JOBS) and {r["single_k"] for r in report} == {True, False}  # both tilings


def test_half_precision_uses_tensor_cores(report):
    for r in report:
        if r["dtype"] != "fp32":
            assert r["wgmma"] if r["arch"] == 90 else r["mma"], f"no tensor-core dot: {r}"


def test_shared_memory_within_the_device(report):
    for r in report:
        assert 0 < r["shared"] <= SMEM_LIMIT[r["arch"]], r


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps([_compile(*job) for job in JOBS]))
