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

import pytest

from tests.gpu import _aot

pytest.importorskip("triton")

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


def _jobs():
    return [dict(dtype=dt, D=d, exclude_self=exclude_self, arch=arch) for dt, d, exclude_self, arch in JOBS]


def _measure(j):
    from fastssl.kernels.triton import pairwise_max as K

    meta = K.tile_config(j["D"], _aot.DTYPES[j["dtype"]])
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    consts = dict(meta, EXCLUDE_SELF=j["exclude_self"], FP32_PRECISION=K.FP32_DOT_PRECISION, stride_xd=1,
                  stride_yd=1)  # fmt: skip
    fn = K._pairwise_max_fwd_kernel
    sig, attrs = _aot.signature(fn, consts, {"X": j["dtype"], "Y": j["dtype"], "VALUE": "fp32", "INDEX": "i64"},
                                aligned=False)  # fmt: skip
    _, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"], options)
    return dict(measured, single_k=meta["SINGLE_K"])


@pytest.fixture(scope="module")
def report():
    return _aot.compile_report(__file__, TIMEOUT_S)


def _name(r):
    return f"{r['dtype']} D={r['D']} sm_{r['arch']}"


def test_every_job_compiles(report):
    _aot.assert_all_compiled(report, _name)
    records = report["records"]
    assert len(records) == len(JOBS) and {r["single_k"] for r in records} == {True, False}  # both tilings


def test_half_precision_uses_tensor_cores(report):
    _aot.assert_tensor_cores([r for r in report["records"] if r["dtype"] != "fp32"], _name)


def test_shared_memory_within_the_device(report):
    records = report["records"]
    assert all(r["shared"] > 0 for r in records), records
    _aot.assert_shared_memory(records, _name)


if __name__ == "__main__":
    _aot.main(_jobs, _measure)
