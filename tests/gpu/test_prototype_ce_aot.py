"""The prototype cross-entropy Triton kernels, compiled ahead of time for sm_90 and sm_80 (no GPU needed).

docs/design.md, check 3, as tests/gpu/test_triton_aot.py does for the other families:
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole compiler, and
`ptxas -v` on the resulting PTX reports register spills. The tests assert that every job compiles,
uses tensor cores (wgmma on sm_90, mma on sm_80) for bf16/fp16, stays within the device's shared
memory and within the estimate the autotuner prunes with, and spills no registers.

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

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
#: Max dynamic shared memory per block (bytes): 227 KiB on sm_90, 163 KiB on sm_80.
SMEM_LIMIT = {90: 232448, 80: 166912}
TIMEOUT_S = 900

_FWD_FLAGS = {
    "teacher": dict(HAS_CENTER=True, HAS_MEAN=True, V_IS_A=False),
    "student": dict(HAS_CENTER=False, HAS_MEAN=True, V_IS_A=True),
    "lse-only": dict(HAS_CENTER=False, HAS_MEAN=False, V_IS_A=True),
}
_BWD_FLAGS = {
    "both": dict(HAS_CENTER=True, HAS_STUDENT=True, HAS_TEACHER=True),
    "student": dict(HAS_CENTER=False, HAS_STUDENT=True, HAS_TEACHER=False),
    "teacher": dict(HAS_CENTER=True, HAS_STUDENT=False, HAS_TEACHER=True),
}


# ------------------------------------------------------------------------------------------------
# The subprocess side (no TRITON_INTERPRET): build the matrix, compile, print a JSON report.


def _jobs():
    import torch

    from fastssl.kernels.triton import prototype_ce as P

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def cands(kind, dt, d, arch, flags):
        block_k, single_k, block_dout = P.tile_dims(d, dtypes[dt])
        operand = P.out_operand(kind, dict(_flags(kind, flags), SINGLE_K=single_k))
        return P.candidate_configs(kind, dtypes[dt].itemsize, block_k, single_k, block_dout, SMEM_LIMIT[arch],
                                   operand)  # fmt: skip

    def job(group, kind, dt, d, flags, arch, cfg):
        return dict(group=group, kind=kind, dtype=dt, D=d, flags=flags, arch=arch, BLOCK_M=cfg.kwargs["BLOCK_M"],
                    BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    cfg=_cfg_key(cfg))  # fmt: skip

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
    return (_FWD_FLAGS if kind == "fwd" else _BWD_FLAGS)[name]


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) that `ptxas -v` reports for the PTX of one kernel."""
    ptxas = shutil.which("ptxas") or str(Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch={target}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}:\n{proc.stderr[-2000:]}")
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _compile(j):
    """Compile one job; return its record (with the error text instead of metrics on failure)."""
    import traceback

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastssl.kernels.triton import prototype_ce as P

    rec = dict(j)
    try:
        kernel = {"fwd": P._prototype_ce_fwd_kernel, "bwd": P._prototype_ce_bwd_kernel}[j["kind"]]
        fn = getattr(kernel, "fn", kernel)  # the JITFunction under the autotuner
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[j["dtype"]]
        d = j["D"]
        block_k, single_k, block_dout = P.tile_dims(d, dtype)
        if j["kind"] == "fwd" and not _FWD_FLAGS[j["flags"]]["HAS_MEAN"] and not single_k:
            block_dout = block_k  # as the launcher: an LSE-only forward has no output slices
        flags = _flags(j["kind"], j["flags"])
        consts = dict(
            flags, BLOCK_M=j["BLOCK_M"], BLOCK_N=j["BLOCK_N"], BLOCK_K=block_k, SINGLE_K=single_k,
            BLOCK_DOUT=block_dout, FP32_PRECISION=P.FP32_DOT_PRECISION,
            # Contiguous inputs: Triton specialises unit strides to constants at launch.
            stride_xd=1, stride_ad=1, stride_vd=1, stride_wd=1, stride_td=1, stride_wtd=1,
        )  # fmt: skip
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        inputs = ("X", "A", "V", "W", "T", "WT", "GRAD_MEAN", "DW")  # in the input dtype; the rest fp32
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name.isupper() and name not in ("M", "N", "NT", "K", "D", "ROW_BIN"):
                sig[name] = "*" + (j["dtype"] if name in inputs else "fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]  # as the runtime sees torch allocations
            else:
                sig[name] = "i32"
                # Row strides (= D when contiguous) and D itself carry the runtime's %16 hint.
                if d % 16 == 0 and (name == "D" or name.startswith("stride_") and name.endswith("m")):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", j["arch"], 32),
            options={"num_warps": j["num_warps"], "num_stages": j["num_stages"]},
        )
        ptx = compiled.asm["ptx"]
        stores, loads = _ptxas_spills(ptx, j["arch"])
        rec.update(
            seconds=round(time.time() - t0, 2),
            shared=int(compiled.metadata.shared),
            estimate=P.smem_estimate(j["kind"], j["BLOCK_M"], j["BLOCK_N"], block_k, single_k, dtype.itemsize,
                                     j["num_stages"], block_dout,
                                     P.out_operand(j["kind"], dict(flags, SINGLE_K=single_k))),  # fmt: skip
            wgmma="wgmma.mma_async" in ptx,
            mma="mma.sync" in ptx,
            spill_stores=stores,
            spill_loads=loads,
        )
    except Exception:  # reported, not raised: one bad config must not hide the others
        rec["error"] = traceback.format_exc(limit=-6)
    return rec


def _cfg_key(cfg):
    """A config as a JSON-able list, e.g. ["BLOCK_M=128", "BLOCK_N=64", "warps=8", "stages=3"]."""
    return [f"{k}={v}" for k, v in sorted(cfg.kwargs.items())] + [f"warps={cfg.num_warps}", f"stages={cfg.num_stages}"]


def _main():
    sys.path.insert(0, str(REPO))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter's @triton.jit cannot be compiled")
    jobs = _jobs()
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        records = list(pool.map(_compile, jobs))
    json.dump(dict(records=records, workers=workers, seconds=round(time.time() - t0, 1)), sys.stdout)


# ------------------------------------------------------------------------------------------------
# The pytest side.


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
    return (f"{r['kind']} {r['dtype']} D={r['D']} {r['flags']} sm_{r['arch']} BLOCK_M={r['BLOCK_M']} "
            f"BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']}")  # fmt: skip


def _compiled(report):
    return [r for r in report["records"] if "error" not in r]


def test_every_kernel_compiles(report):
    failed = [f"{_name(r)}:\n{r['error']}" for r in report["records"] if "error" in r]
    assert not failed, f"{len(failed)} of {len(report['records'])} compiles failed:\n\n" + "\n\n".join(failed)


def test_several_configs_survive_pruning_at_dino_size():
    """At D = 256 bf16 on sm_90 (DINO) the autotuner keeps several configs of each kernel."""
    import torch

    from fastssl.kernels.triton import prototype_ce as P

    block_k, single_k, block_dout = P.tile_dims(256, torch.bfloat16)
    for kind in ("fwd", "bwd"):
        flags = dict(_flags(kind, "teacher" if kind == "fwd" else "both"), SINGLE_K=single_k)
        kept = P.candidate_configs(kind, 2, block_k, single_k, block_dout, SMEM_LIMIT[90], P.out_operand(kind, flags))
        assert len(kept) >= 2, f"{kind}: only {len(kept)} config(s) left at D = 256: {kept}"


def test_every_config_is_compiled(report):
    """Each config of either kernel, half-precision and fp32 lists alike, is compiled by some job."""
    from fastssl.kernels.triton import prototype_ce as P

    seen = {(r["kind"], r["dtype"] == "fp32", *r["cfg"]) for r in report["records"]}
    missing = [(kind, fp32, *_cfg_key(c)) for fp32, lists in ((False, P.CONFIGS), (True, P.FP32_CONFIGS))
               for kind, cs in lists.items() for c in cs if (kind, fp32, *_cfg_key(c)) not in seen]  # fmt: skip
    assert not missing, f"configs never compiled: {missing}"


def test_tensor_cores(report):
    bad = [
        _name(r)
        for r in _compiled(report)
        if r["dtype"] != "fp32" and not (r["wgmma"] if r["arch"] == 90 else r["mma"] or r["wgmma"])
    ]
    assert not bad, "no tensor-core instruction (wgmma on sm_90, mma.sync on sm_80) in:\n" + "\n".join(bad)


def test_no_register_spills(report):
    spilling = [f"{_name(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
                for r in _compiled(report) if r["spill_stores"] or r["spill_loads"]]  # fmt: skip
    assert not spilling, "register spills (ptxas -v):\n" + "\n".join(spilling)


def test_shared_memory(report):
    over = [f"{_name(r)}: {r['shared']} B > {SMEM_LIMIT[r['arch']]} B"
            for r in _compiled(report) if r["shared"] > SMEM_LIMIT[r["arch"]]]  # fmt: skip
    assert not over, "shared memory over the device limit:\n" + "\n".join(over)
    under = [f"{_name(r)}: uses {r['shared']} B, estimated {r['estimate']} B"
             for r in _compiled(report) if r["shared"] > r["estimate"]]  # fmt: skip
    assert not under, "smem_estimate below the compiled kernel's shared memory:\n" + "\n".join(under)


if __name__ == "__main__":
    _main()
