"""The prototype cross-entropy Triton kernels, compiled ahead of time for sm_90 and sm_80 (no GPU needed).

docs/design.md, check 3, as tests/gpu/test_triton_aot.py does for the other families:
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole compiler, and
`ptxas -v` on the resulting PTX reports register spills (the shared machinery: tests/gpu/_aot.py).
The tests assert that every job compiles, uses tensor cores (wgmma on sm_90, mma on sm_80) for
bf16/fp16, stays within the device's shared memory and within the estimate the autotuner prunes
with, and spills no registers.

The session runs with TRITON_INTERPRET=1 (tests/conftest.py), whose @triton.jit cannot be compiled,
so the compiles run in one subprocess without it — this file run as a script — which prints a JSON
report. Matrix (45 compiles, ~2 min on 2 cores, ~30 s with a warm ~/.triton cache):
  * every config either kernel may pick, bf16, sm_90, at D = 256 (DINO's bottleneck, the largest
    resident D), D = 128 and D = 512 (the D loop), with every flag on (teacher forward: centre and a
    separate value matrix; backward: student and teacher phases with the centre);
  * the student's forward (values are the logit tile, V_IS_A; every config), its LSE-only form and
    a student-only backward; fp16 at D = 64;
  * fp32 (CUDA-core dots, FP32_DOT_PRECISION = "ieee": no tensor-core assertion), D = 300 (loop)
    forward and D = 128 backward;
  * sm_80 (mma.sync), bf16, D = 256.
"""

from __future__ import annotations

import pytest

from tests.gpu import _aot

pytest.importorskip("triton")

TIMEOUT_S = 900

#: The forward's flags as its launchers set them: the teacher's rows (centre, values W ≠ scores W_t),
#: the student's (values are the scores), the student's LSE alone, and the LSE pass with a centre of
#: fastssl.kernels.triton.prototype_codes (compiled by tests/gpu/test_prototype_codes_aot.py).
FWD_FLAGS = {
    "teacher": dict(HAS_CENTER=True, HAS_MEAN=True, V_IS_A=False),
    "student": dict(HAS_CENTER=False, HAS_MEAN=True, V_IS_A=True),
    "lse-only": dict(HAS_CENTER=False, HAS_MEAN=False, V_IS_A=True),
    "lse-center": dict(HAS_CENTER=True, HAS_MEAN=False, V_IS_A=False),
}
BWD_FLAGS = {
    "both": dict(HAS_CENTER=True, HAS_STUDENT=True, HAS_TEACHER=True),
    "student": dict(HAS_CENTER=False, HAS_STUDENT=True, HAS_TEACHER=False),
    "teacher": dict(HAS_CENTER=True, HAS_STUDENT=False, HAS_TEACHER=True),
}


# ------------------------------------------------------------------------------------------------
# The subprocess side (no TRITON_INTERPRET): the matrix, and how one job compiles.


def _jobs():
    from fastssl.kernels.triton import prototype_ce as P

    def cands(kind, dt, d, arch, flags):
        block_k, single_k, block_dout = P.tile_dims(d, _aot.DTYPES[dt])
        operand = P.out_operand(kind, dict(_flags(kind, flags), SINGLE_K=single_k))
        return P.candidate_configs(kind, _aot.DTYPES[dt].itemsize, block_k, single_k, block_dout,
                                   _aot.SMEM_LIMIT[arch], operand)  # fmt: skip

    def job(group, kind, dt, d, flags, arch, cfg):
        return dict(group=group, kind=kind, dtype=dt, D=d, flags=flags, arch=arch, BLOCK_M=cfg.kwargs["BLOCK_M"],
                    BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    cfg=_aot.cfg_key(cfg))  # fmt: skip

    def all_configs(group, kind, dt, d, flags, arch=90):
        return [job(group, kind, dt, d, flags, arch, c) for c in cands(kind, dt, d, arch, flags)]

    jobs = []
    # fp32 first: CUDA-core dots compile slowest, and the pool balances better with them up front.
    jobs.append(job("fp32", "fwd", "fp32", 300, "teacher", 90, cands("fwd", "fp32", 300, 90, "teacher")[0]))
    jobs.append(job("fp32", "bwd", "fp32", 128, "both", 90, cands("bwd", "fp32", 128, 90, "both")[0]))
    jobs += all_configs("all-configs", "fwd", "bf16", 256, "teacher")
    jobs += all_configs("all-configs", "bwd", "bf16", 256, "both")
    jobs += all_configs("flags", "fwd", "bf16", 256, "student")
    jobs.append(job("flags", "bwd", "bf16", 256, "student", 90, cands("bwd", "bf16", 256, 90, "student")[0]))
    jobs.append(job("flags", "fwd", "bf16", 256, "lse-only", 90, cands("fwd", "bf16", 256, 90, "lse-only")[-1]))
    jobs += all_configs("d=128", "fwd", "bf16", 128, "teacher") + all_configs("d=128", "bwd", "bf16", 128, "both")
    jobs.append(job("fp16", "fwd", "fp16", 64, "teacher", 90, cands("fwd", "fp16", 64, 90, "teacher")[-1]))
    jobs.append(job("fp16", "bwd", "fp16", 64, "both", 90, cands("bwd", "fp16", 64, 90, "both")[-1]))
    for kind, flags in (("fwd", "teacher"), ("bwd", "both")):
        jobs += all_configs("d-loop", kind, "bf16", 512, flags)
        jobs.append(job("sm80", kind, "bf16", 256, flags, 80, cands(kind, "bf16", 256, 80, flags)[0]))
    return jobs


def _flags(kind, name):
    return (FWD_FLAGS if kind == "fwd" else BWD_FLAGS)[name]


def measure(j):
    """Compile one job (a kernel kind, its flags, dtype, D, arch and config) as its launcher would;
    its shared memory, the estimate the autotuner prunes with, tensor cores and ptxas spills."""
    from fastssl.kernels.triton import prototype_ce as P

    kernel = {"fwd": P._prototype_ce_fwd_kernel, "bwd": P._prototype_ce_bwd_kernel}[j["kind"]]
    fn = getattr(kernel, "fn", kernel)  # the JITFunction under the autotuner
    dtype = _aot.DTYPES[j["dtype"]]
    d = j["D"]
    block_k, single_k, block_dout = P.tile_dims(d, dtype)
    if j["kind"] == "fwd" and not FWD_FLAGS[j["flags"]]["HAS_MEAN"] and not single_k:
        block_dout = block_k  # as the launcher: an LSE-only forward has no output slices
    flags = _flags(j["kind"], j["flags"])
    consts = dict(
        flags, BLOCK_M=j["BLOCK_M"], BLOCK_N=j["BLOCK_N"], BLOCK_K=block_k, SINGLE_K=single_k,
        BLOCK_DOUT=block_dout, FP32_PRECISION=P.FP32_DOT_PRECISION,
        # Contiguous inputs: Triton specialises unit strides to constants at launch.
        stride_xd=1, stride_ad=1, stride_vd=1, stride_wd=1, stride_td=1, stride_wtd=1,
    )  # fmt: skip
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    # In the input dtype: X, A, V, W, T, WT, GRAD_MEAN and DW; the other pointers are fp32.
    pointers = _aot.upper_case_pointers(fn, consts, sizes=("M", "N", "NT", "K", "D", "ROW_BIN"),
                                        inputs=("X", "A", "V", "W", "T", "WT", "GRAD_MEAN", "DW"), dtype=j["dtype"])
    sig, attrs = _aot.signature(fn, consts, pointers, hinted=_aot.row_stride_hints(fn, d))
    compiled, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"],
                                             {"num_warps": j["num_warps"], "num_stages": j["num_stages"]})
    estimate = P.smem_estimate(j["kind"], j["BLOCK_M"], j["BLOCK_N"], block_k, single_k, dtype.itemsize,
                               j["num_stages"], block_dout, P.out_operand(j["kind"], dict(flags, SINGLE_K=single_k)))
    return dict(measured, estimate=estimate, **_aot.ptxas_spills(compiled.asm["ptx"]))


# ------------------------------------------------------------------------------------------------
# The pytest side.


@pytest.fixture(scope="module")
def report():
    return _aot.compile_report(__file__, TIMEOUT_S)


def _name(r):
    return (f"{r['kind']} {r['dtype']} D={r['D']} {r['flags']} sm_{r['arch']} BLOCK_M={r['BLOCK_M']} "
            f"BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']}")  # fmt: skip


def test_every_kernel_compiles(report):
    _aot.assert_all_compiled(report, _name)


def test_several_configs_survive_pruning_at_dino_size():
    """At D = 256 bf16 on sm_90 (DINO) the autotuner keeps several configs of each kernel."""
    import torch

    from fastssl.kernels.triton import prototype_ce as P

    block_k, single_k, block_dout = P.tile_dims(256, torch.bfloat16)
    for kind in ("fwd", "bwd"):
        flags = dict(_flags(kind, "teacher" if kind == "fwd" else "both"), SINGLE_K=single_k)
        kept = P.candidate_configs(kind, 2, block_k, single_k, block_dout, _aot.SMEM_LIMIT[90],
                                   P.out_operand(kind, flags))  # fmt: skip
        assert len(kept) >= 2, f"{kind}: only {len(kept)} config(s) left at D = 256: {kept}"


def test_every_config_is_compiled(report):
    """Each config of either kernel, half-precision and fp32 lists alike, is compiled by some job."""
    from fastssl.kernels.triton import prototype_ce as P

    seen = {(r["kind"], r["dtype"] == "fp32", *r["cfg"]) for r in report["records"]}
    missing = [(kind, fp32, *_aot.cfg_key(c)) for fp32, lists in ((False, P.CONFIGS), (True, P.FP32_CONFIGS))
               for kind, cs in lists.items() for c in cs if (kind, fp32, *_aot.cfg_key(c)) not in seen]  # fmt: skip
    assert not missing, f"configs never compiled: {missing}"


def test_tensor_cores(report):
    _aot.assert_tensor_cores([r for r in _aot.compiled(report) if r["dtype"] != "fp32"], _name)


def test_no_register_spills(report):
    _aot.assert_no_ptxas_spills(_aot.compiled(report), _name)


def test_shared_memory(report):
    _aot.assert_shared_memory(_aot.compiled(report), _name)


if __name__ == "__main__":
    _aot.main(_jobs, measure)
