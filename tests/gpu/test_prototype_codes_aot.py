"""The Triton launches of the prototype-codes ops (SwaV's and MSN's Sinkhorn-Knopp LSE passes), compiled
ahead of time for sm_90 (and sm_80) without a GPU.

fastssl.kernels.triton.prototype_codes adds no kernel: it launches the prototype-CE forward kernel
LSE-only with a centre (HAS_MEAN off, HAS_CENTER on), a flag combination that
tests/gpu/test_prototype_ce_aot.py does not compile. This file compiles it with that file's
compile of a job and the shared machinery of tests/gpu/_aot.py (same subprocess without
TRITON_INTERPRET, same checks: every job compiles, bf16/fp16 use tensor cores, no register spill,
shared memory within the device and within the estimate the autotuner prunes with), for every
config the autotuner may keep:
  * bf16 at D = 128 (SwaV's projection), D = 256 (resident) and D = 512 (the D loop), sm_90;
  * fp16 at D = 128 and fp32 at D = 128 (CUDA-core dots), sm_90;
  * bf16 at D = 128 on sm_80.
"""

from __future__ import annotations

import pytest

from tests.gpu import _aot

pytest.importorskip("triton")

TIMEOUT_S = 900
#: The LSE pass with a centre: the flags the launcher of fastssl.kernels.triton.prototype_codes sets.
FLAGS = "lse-center"


def _jobs():
    from fastssl.kernels.triton import prototype_ce as P
    from tests.gpu.test_prototype_ce_aot import FWD_FLAGS

    jobs = []
    for dt, d, arch in (("fp32", 128, 90), ("bf16", 128, 90), ("bf16", 256, 90), ("bf16", 512, 90),
                        ("fp16", 128, 90), ("bf16", 128, 80)):  # fmt: skip
        block_k, single_k, block_dout = P.tile_dims(d, _aot.DTYPES[dt])
        if not single_k:
            block_dout = block_k  # as the launcher: an LSE-only forward has no output slices
        flags = dict(FWD_FLAGS[FLAGS], SINGLE_K=single_k)
        for cfg in P.candidate_configs("fwd", _aot.DTYPES[dt].itemsize, block_k, single_k, block_dout,
                                       _aot.SMEM_LIMIT[arch], P.out_operand("fwd", flags)):  # fmt: skip
            jobs.append(dict(group=f"{dt} D={d} sm_{arch}", kind="fwd", dtype=dt, D=d, flags=FLAGS, arch=arch,
                             BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, cfg=_aot.cfg_key(cfg)))  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def report():
    return _aot.compile_report(__file__, TIMEOUT_S)


def _name(r):
    return f"{r['group']} BLOCK_M={r['BLOCK_M']} BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']}"


def test_the_launch_flags_are_compiled():
    """The flags compiled here are the ones prototype_codes' launcher passes (an LSE pass with a centre)."""
    import inspect

    from fastssl.kernels.triton import prototype_ce as P
    from fastssl.kernels.triton import prototype_codes
    from tests.gpu.test_prototype_ce_aot import FWD_FLAGS

    assert "_row_stats(x, a, None, center" in inspect.getsource(prototype_codes.prototype_lse)
    source = inspect.getsource(P._row_stats)
    assert "HAS_CENTER=center is not None, HAS_MEAN=v is not None" in source
    assert FWD_FLAGS[FLAGS] == dict(HAS_CENTER=True, HAS_MEAN=False, V_IS_A=False)


def test_every_job_compiles(report):
    _aot.assert_all_compiled(report, _name)
    assert {r["group"] for r in report["records"]} >= {"bf16 D=128 sm_90", "bf16 D=512 sm_90", "fp32 D=128 sm_90"}


def test_tensor_cores(report):
    _aot.assert_tensor_cores([r for r in _aot.compiled(report) if r["dtype"] != "fp32"], _name)


def test_no_register_spills(report):
    _aot.assert_no_ptxas_spills(_aot.compiled(report), _name)


def test_shared_memory(report):
    _aot.assert_shared_memory(_aot.compiled(report), _name)


if __name__ == "__main__":
    from tests.gpu.test_prototype_ce_aot import measure

    _aot.main(_jobs, measure)
