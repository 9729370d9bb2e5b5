"""The opt-in Hopper variants of the pairwise-LSE kernels (`HopperVariant`), compiled ahead of time
for sm_90 without a GPU (docs/design.md, check 3), as tests/gpu/test_triton_aot.py does for today's
kernels; this file runs its own compiles in one subprocess without TRITON_INTERPRET.

Matrix, bf16 with SimCLR's flags unless said, sm_90, through each kernel's Hopper entry:
  * "tma", "pipeline" and both, in the first config of today's list, for the forward and the fused
    backward's "rows", "sym" and "dy" at D = 128 and D = 256 (the widest resident D);
  * both, in every config of HOPPER_CONFIGS ("wide") that pruning keeps (`wide_candidates`), at
    D = 128 and 256;
  * the forward's D loop (D = 512, bank and y negatives) through descriptors; MoCo (bank, fp16) and
    "rows" without dy;
  * the fp32 forward in each FWD_FP32_CONFIGS entry at D = 70 (an odd D), 128 and 300 (the D loop),
    and split at D = 70: the pointer path, as launched (TMA off, no LOOP_STAGES: `tma_eligible`
    takes half precision only);
  * the forward of half-precision rows that Triton loads element by element (D = 70, 100, 200, 300:
    no divisibility hints) in each FWD_UNALIGNED config `forward_configs` picks for them, split too;
  * each kernel's Hopper entry with both switches off next to today's kernel (same flags, config).
Asserted: TMA copies (cp.async.bulk.tensor) wherever TMA is on, wgmma (mma.sync for a forward block
below 64 rows), no stack frame (no register spills), shared memory within sm_90's 227 KiB and within
`smem_estimate` (the pruning's figure), and the same PTX (debug information aside) for the Hopper
entry with both switches off as for today's kernel.
Also: Triton 3.6's warp specialisation leaves sm_90 code unchanged, the reason it is not a variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # a compiler run: minutes on 2 cores

REPO = Path(__file__).resolve().parents[2]
#: Max dynamic shared memory per block on sm_90 (227 KiB).
SMEM_LIMIT_SM90 = 232448
TIMEOUT_S = 1200

FLAGS = {
    "simclr": dict(HAS_BANK=False, EXCLUDE_SELF=True, INCLUDE_POS=True, Y_NEGATIVES=True),
    "all": dict(HAS_BANK=True, EXCLUDE_SELF=True, INCLUDE_POS=True, Y_NEGATIVES=True),
    "moco": dict(HAS_BANK=True, EXCLUDE_SELF=False, INCLUDE_POS=True, Y_NEGATIVES=False),
    "clip": dict(HAS_BANK=False, EXCLUDE_SELF=False, INCLUDE_POS=True, Y_NEGATIVES=True),
}
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
RESIDENT_KINDS = ("fwd", "rows", "sym", "dy")


# ------------------------------------------------------------------------------------------------
# The subprocess side (no TRITON_INTERPRET): compile the matrix, print a JSON report.


def _jobs():
    import torch

    from fastssl.kernels.triton import pairwise_lse as K

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def job(group, kind, dt, d, flags, cfg, tma, pipeline, needs_dy=True, entry="hopper"):
        return dict(group=group, kind=kind, dtype=dt, D=d, flags=flags, BLOCK_M=cfg.kwargs["BLOCK_M"],
                    BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps, num_stages=cfg.num_stages, tma=tma,
                    pipeline=pipeline, needs_dy=needs_dy, entry=entry)  # fmt: skip

    def cands(kind, dt, d, configs=None, needs_dy=True):
        block_k, single_k, block_dout = K.tile_dims(d, torch_dtype[dt])
        return K.candidate_configs(kind, DTYPES[dt], block_k, single_k, block_dout, SMEM_LIMIT_SM90, needs_dy, configs)

    jobs = []
    for d in (128, 256):
        for kind in RESIDENT_KINDS:
            first = cands(kind, "bf16", d)[0]
            for tma, pipeline in ((True, False), (False, True), (True, True)):
                jobs.append(job("variants", kind, "bf16", d, "simclr", first, tma, pipeline))
            block_k, single_k, _ = K.tile_dims(d, torch.bfloat16)
            jobs += [job("wide", kind, "bf16", d, "simclr", c, True, True)
                     for c in K.wide_candidates(kind, 2, block_k, single_k, SMEM_LIMIT_SM90)]  # fmt: skip
    jobs.append(job("d-loop", "fwd", "bf16", 512, "all", cands("fwd", "bf16", 512)[0], True, True))
    jobs.append(job("flags", "fwd", "fp16", 128, "moco", cands("fwd", "fp16", 128)[0], True, True))
    jobs.append(job("flags", "rows", "fp16", 128, "moco", cands("rows", "fp16", 128, needs_dy=False)[0], True, True,
                    needs_dy=False))  # fmt: skip
    # fp32 (pointer path, today's code through the Hopper entry): every FWD_FP32_CONFIGS entry at an
    # odd resident D, a power of two and the D loop; an odd D split over grid axis 1.
    for d, flags in ((70, "clip"), (128, "simclr"), (300, "all")):
        jobs += [job("fp32", "fwd", "fp32", d, flags, c, False, False) for c in K.FWD_FP32_CONFIGS]
    jobs.append(dict(job("fp32", "fwd", "fp32", 70, "clip", K.FWD_FP32_CONFIGS[-1], False, False), split=True))
    # Half-precision rows loaded element by element (D not a multiple of 16: no divisibility hints),
    # in the lists `forward_configs` gives them: D = 70 and 100 (BLOCK_K 128), 200 (256), 300 (the D loop).
    for dt, d, configs in (("bf16", 70, K.FWD_UNALIGNED_CONFIGS), ("fp16", 100, K.FWD_UNALIGNED_CONFIGS),
                           ("bf16", 200, K.FWD_UNALIGNED_WIDE_K_CONFIGS), ("bf16", 300, K.FWD_UNALIGNED_CONFIGS)):
        jobs += [job("unaligned", "fwd", dt, d, "clip", c, False, False) for c in configs]
    jobs += [dict(job("unaligned", "fwd", "bf16", d, "clip", c[0], False, False), split=True)
             for d, c in ((70, K.FWD_UNALIGNED_CONFIGS), (200, K.FWD_UNALIGNED_WIDE_K_CONFIGS))]
    # The Hopper entry with both switches off against today's kernel: the same code (what ineligible
    # inputs and, on a GPU, the fp32 forward run).
    for kind, dt, d, flags, cfg in (("fwd", "bf16", 128, "all", cands("fwd", "bf16", 128)[0]),
                                    ("fwd", "fp32", 70, "clip", K.FWD_FP32_CONFIGS[0]),
                                    ("rows", "bf16", 128, "all", cands("rows", "bf16", 128)[0]),
                                    ("sym", "bf16", 256, "simclr", cands("sym", "bf16", 256)[0]),
                                    ("dy", "fp16", 128, "clip", cands("dy", "fp16", 128)[0])):  # fmt: skip
        for entry in ("default", "hopper"):
            jobs.append(job("same-code", kind, dt, d, flags, cfg, False, False, entry=entry))
    return jobs


def _compile(j):
    """Compile one job; its record, with the error text instead of metrics on failure."""
    import traceback

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastssl.kernels.triton import pairwise_lse as K

    rec = dict(j)
    try:
        entries = {"default": K._DEFAULT_KERNELS, "hopper": K._HOPPER_KERNELS}[j["entry"]]
        kernel = entries[j["kind"]]
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction, under an autotuner or not
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[j["dtype"]]
        d = j["D"]
        block_k, single_k, block_dout = K.tile_dims(d, dtype)
        consts = dict(
            FLAGS[j["flags"]], BLOCK_M=j["BLOCK_M"], BLOCK_N=j["BLOCK_N"], BLOCK_K=block_k, SINGLE_K=single_k,
            FP32_PRECISION=K.FP32_DOT_PRECISION, NEEDS_DY=j["needs_dy"], SPLIT=j.get("split", False), TMA=j["tma"],
            LOOP_STAGES=j["num_stages"] if j["pipeline"] else None,
            stride_xd=1, stride_yd=1, stride_bd=1,  # contiguous rows: Triton specialises unit strides
        )  # fmt: skip
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        pointee = {name: j["dtype"] for name in ("X", "Y", "B", "DX", "DY")}  # the rest: fp32
        sizes = ("M", "NY", "NB", "D", "ROW_BIN", "N_SPLIT")
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name.isupper() and name not in sizes:
                sig[name] = "*" + pointee.get(name, "fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]  # as the runtime sees torch allocations
            else:
                sig[name] = "i32"
                if d % 16 == 0 and (name == "D" or name.startswith("stride_") and name.endswith("m")):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": j["num_warps"], "num_stages": j["num_stages"]})  # fmt: skip
        ptx = compiled.asm["ptx"]
        rec.update(seconds=round(time.time() - t0, 2), shared=int(compiled.metadata.shared),
                   estimate=K.smem_estimate(j["kind"], j["BLOCK_M"], j["BLOCK_N"], block_k, single_k,
                                            DTYPES[j["dtype"]], j["num_stages"], block_dout, tma=j["tma"]),
                   tma_copies="cp.async.bulk.tensor" in ptx, wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx,
                   code=_code_hash(ptx, fn.__name__),
                   **_resources(compiled))  # fmt: skip
    except Exception:  # reported, not raised: one bad config must not hide the others
        rec["error"] = traceback.format_exc(limit=-6)
    return rec


def _code_hash(ptx, name):
    """A hash of the PTX without its debug information (source lines, debug labels and sections) and
    with the kernel's name (`name`) replaced, so that two entries of one body can be compared."""
    import hashlib
    import re

    lines = [line for line in ptx.split(".section\t.debug")[0].splitlines()
             if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp\d+:)", line)]  # fmt: skip
    return hashlib.sha256("\n".join(lines).replace(name, "KERNEL").encode()).hexdigest()


def _resources(compiled):
    """Registers and stack bytes per thread from `cuobjdump -res-usage` on the cubin (no GPU needed);
    Triton kernels have no local arrays, so a stack frame is register spills."""
    import re
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    reg, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return dict(registers=int(reg), stack=int(stack))


def _warp_specialize_probe():
    """The forward's loop shape (a resident row block, descriptor loads, a dot and an online LSE per
    column tile) compiled for sm_90 with tl.range(warp_specialize=True) and without: their PTX."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def loop(X, Y, OUT, M, N, D, stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):  # fmt: skip
        x_tiles = tl.make_tensor_descriptor(X, shape=[M, D], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        y_tiles = tl.make_tensor_descriptor(Y, shape=[N, D], strides=[stride_ym, 1], block_shape=[BLOCK_N, BLOCK_K])
        row0 = tl.program_id(0) * BLOCK_M
        x = x_tiles.load([row0, 0])
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        for start in tl.range(0, N, BLOCK_N, num_stages=3, warp_specialize=WARP_SPECIALIZE):
            s = tl.dot(x, tl.trans(y_tiles.load([start, 0])))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(OUT + row0 + tl.arange(0, BLOCK_M), m_i + tl.log2(l_i))

    sig = dict(X="*bf16", Y="*bf16", OUT="*fp32", M="i32", N="i32", D="i32", stride_xm="i32", stride_ym="i32",
               BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", WARP_SPECIALIZE="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 5, 6, 7)}
    ptx = {}
    for ws in (False, True):
        consts = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, WARP_SPECIALIZE=ws)
        compiled = triton.compile(ASTSource(fn=loop, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
        ptx[ws] = compiled.asm["ptx"]
    return dict(same_ptx=ptx[False] == ptx[True], tma_copies="cp.async.bulk.tensor" in ptx[True])


def _main():
    sys.path.insert(0, str(REPO))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter's @triton.jit cannot be compiled")
    from fastssl.kernels.triton import pairwise_lse as K

    jobs = _jobs()
    t0 = time.time()
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        records = list(pool.map(_compile, jobs))
    wide = {kind: [[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages] for c in cs]
            for kind, cs in K.HOPPER_CONFIGS.items() if kind in RESIDENT_KINDS}  # fmt: skip
    json.dump(dict(records=records, wide=wide, warp_specialize=_warp_specialize_probe(),
                   seconds=round(time.time() - t0, 1)), sys.stdout)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The pytest side.


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"AOT compilation did not finish in {TIMEOUT_S} s; stderr tail:\n{(e.stderr or '')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"AOT compile subprocess failed (rc={proc.returncode}); stderr tail:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout)


def _name(r):
    switches = "+".join(s for s in ("tma", "pipeline") if r[s]) or "pointers"
    kind = r["kind"] + ("" if r["needs_dy"] else " (dx only)") + (" split" if r.get("split") else "")
    return (f"{kind} [{switches}] {r['dtype']} D={r['D']} {r['flags']} BLOCK_M={r['BLOCK_M']} BLOCK_N={r['BLOCK_N']} "
            f"warps={r['num_warps']} stages={r['num_stages']}")  # fmt: skip


def _ok(report):
    return [r for r in report["records"] if "error" not in r]


def test_every_variant_compiles(report):
    failed = [f"{_name(r)}:\n{r['error']}" for r in report["records"] if "error" in r]
    assert not failed, f"{len(failed)} of {len(report['records'])} compiles failed:\n\n" + "\n\n".join(failed)


def test_every_wide_config_is_compiled(report):
    """Each HOPPER_CONFIGS entry is compiled at D = 128 at least (else it could never be picked)."""
    seen = {(r["kind"], r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])
            for r in report["records"] if r["group"] == "wide" and r["D"] == 128}  # fmt: skip
    missing = [(kind, *c) for kind, cs in report["wide"].items() for c in cs if (kind, *c) not in seen]
    assert not missing, f"wide configs pruned at D = 128 (drop them from HOPPER_CONFIGS): {missing}"


def test_tma_copies_and_tensor_cores(report):
    tma = [r for r in _ok(report) if r["tma"]]
    assert len(tma) >= 20, "the TMA records are missing"
    no_tma = [_name(r) for r in tma if not r["tma_copies"]]
    assert not no_tma, "TMA on, but no cp.async.bulk.tensor in the PTX:\n" + "\n".join(no_tma)
    # A forward block of fewer than 64 rows is below wgmma's minimum: mma.sync is sm_90's tensor-core path there.
    no_tensor_cores = [_name(r) for r in _ok(report) if r["dtype"] != "fp32"
                       and not (r["wgmma"] or r["kind"] == "fwd" and r["BLOCK_M"] < 64 and r["mma"])]  # fmt: skip
    assert not no_tensor_cores, "no wgmma (nor mma.sync for a block below 64 rows) in:\n" + "\n".join(no_tensor_cores)
    pointers = [_name(r) for r in _ok(report) if not r["tma"] and r["tma_copies"]]
    assert not pointers, "TMA off, yet TMA copies in:\n" + "\n".join(pointers)


def test_no_register_spills(report):
    spilled = [f"{_name(r)}: {r['stack']} B of stack, {r['registers']} registers" for r in _ok(report) if r["stack"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_shared_memory(report):
    over = [f"{_name(r)}: {r['shared']} B" for r in _ok(report) if r["shared"] > SMEM_LIMIT_SM90]
    assert not over, f"shared memory over sm_90's {SMEM_LIMIT_SM90} B:\n" + "\n".join(over)
    under = [f"{_name(r)}: uses {r['shared']} B, estimated {r['estimate']} B" for r in _ok(report)
             if r["shared"] > r["estimate"]]  # fmt: skip
    assert not under, "smem_estimate below the compiled kernel's shared memory:\n" + "\n".join(under)


def test_switches_off_compile_to_todays_kernels(report):
    """The Hopper entry without TMA and LOOP_STAGES gives today's kernel's very PTX: the pointer path
    of a variant is today's code, not a look-alike."""
    pairs = {}
    for r in _ok(report):
        if r["group"] == "same-code":
            pairs.setdefault(_name(r), {})[r["entry"]] = r["code"]
    assert len(pairs) == 5 and all(len(p) == 2 for p in pairs.values()), "the same-code records are missing"
    differ = [name for name, p in pairs.items() if p["default"] != p["hopper"]]
    assert not differ, "the Hopper entry, switches off, compiles to other code than today's:\n" + "\n".join(differ)


def test_warp_specialize_is_a_no_op_on_sm90(report):
    """Why HopperVariant has no warp-specialised loop: Triton 3.6 accepts the flag for sm_90 and
    emits the very same PTX. If this fails, a Triton upgrade made it real: time it as a variant."""
    probe = report["warp_specialize"]
    assert probe["tma_copies"], "the probe lost its TMA loads"
    assert probe["same_ptx"], "warp_specialize=True now changes sm_90 code: worth a variant"


if __name__ == "__main__":
    _main()
