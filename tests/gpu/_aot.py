"""What the ahead-of-time compile tests (tests/gpu/test_*_aot.py) share: docs/design.md, check 3.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole compiler (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) without a GPU. The test session runs with TRITON_INTERPRET=1
(tests/conftest.py), under which `@triton.jit` gives interpreted functions that cannot be compiled,
so each test module is also a script: its `report` fixture runs the module without the interpreter
(:func:`compile_report`), the script compiles its jobs in a process pool (:func:`main`) and prints a
JSON report, and the tests assert on the report's records. A record is a job (a dict) plus what
its compile measured, or plus "error" with the traceback: one bad config must not hide the others.

Here: the two sides of that subprocess, the signature of a launch as `ASTSource` wants it, the
measurements (tensor-core instructions in the PTX, shared memory, register spills from `ptxas -v`
or from the cubin), and the checks every module makes of them. Each test module keeps its jobs,
how one of its kernels is compiled, and its own assertions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
#: Max dynamic shared memory per block (bytes): 227 KiB on sm_90, 163 KiB on sm_80.
SMEM_LIMIT = {90: 232448, 80: 166912}
#: The dtypes of the jobs, by the name a record carries.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The runtime's hint on a pointer to a torch allocation or on a size or stride that is a multiple of 16.
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]

Record = dict
Namer = Callable[[Record], str]


# ------------------------------------------------------------------------------------------------
# The pytest side: run the module as a script, read its report.


def compile_report(test_file: str, timeout_s: int) -> dict:
    """The JSON report that `test_file` prints when run as a script without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # A session of its own, so that a timeout ends the script's pool of compile workers too.
    with subprocess.Popen([sys.executable, str(Path(test_file).resolve())], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            pytest.fail(f"AOT compilation did not finish in {timeout_s} s; stderr tail:\n{stderr[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"AOT compile subprocess failed (rc={proc.returncode}); stderr tail:\n{stderr[-5000:]}")
    return json.loads(stdout)


# ------------------------------------------------------------------------------------------------
# The script side (no TRITON_INTERPRET): compile every job, print the report.


def main(jobs: Callable[[], list[dict]], measure: Callable[[dict], dict],
         extras: Optional[Callable[[], dict]] = None) -> None:  # fmt: skip
    """Print {"records", "workers", "seconds", **extras()} as JSON: each job of `jobs()` with what
    `measure(job)` returns, compiled in a process pool. `jobs` and `extras` are called only once the
    interpreter is known to be off (importing a kernel module under it would interpret its kernels)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter's @triton.jit cannot be compiled")
    todo = jobs()
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        records = list(pool.map(partial(record, measure=measure), todo))
    report = dict(records=records, workers=workers, seconds=round(time.time() - t0, 1))
    json.dump(dict(report, **(extras() if extras else {})), sys.stdout)


def record(job: dict, measure: Callable[[dict], dict]) -> Record:
    """`job` with what `measure(job)` returns, or with "error", the traceback, if it raised."""
    rec = dict(job)
    try:
        rec.update(measure(job))
    except Exception:  # reported, not raised: one bad config must not hide the others
        rec["error"] = traceback.format_exc(limit=-6)
    return rec


def cfg_key(cfg) -> list[str]:
    """A triton.Config as a JSON-able list, e.g. ["BLOCK_M=128", "BLOCK_N=64", "warps=8", "stages=3"]."""
    return [f"{k}={v}" for k, v in sorted(cfg.kwargs.items())] + [f"warps={cfg.num_warps}", f"stages={cfg.num_stages}"]


def signature(fn, consts: dict, pointers: dict[str, str], *, scalars: Optional[dict[str, str]] = None,
              hinted: Iterable[str] = (), aligned: bool = True) -> tuple[dict, dict]:  # fmt: skip
    """(signature, attrs) of the JITFunction `fn` for `ASTSource`, as a launch presents its arguments.

    Names in `consts` are "constexpr"; `pointers` maps a pointer argument to its element type
    ("*bf16"), with the divisibility hint of a torch allocation if `aligned`; `scalars` maps other
    arguments to their type, "i32" by default; the scalars named in `hinted` carry the runtime's
    hint that they are multiples of 16.
    """
    scalars, hinted = scalars or {}, set(hinted)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            if aligned:
                attrs[(i,)] = DIVISIBLE_BY_16
        else:
            sig[name] = scalars.get(name, "i32")
            if name in hinted:
                attrs[(i,)] = DIVISIBLE_BY_16
    return sig, attrs


def upper_case_pointers(fn, consts: dict, sizes: Iterable[str], inputs: Iterable[str], dtype: str) -> dict[str, str]:
    """The pointers of a kernel that names them in upper case: every upper-case argument that is not a
    constexpr or one of `sizes`; those in `inputs` point to `dtype`, the rest to fp32."""
    sizes, inputs = set(sizes), set(inputs)
    return {name: dtype if name in inputs else "fp32" for name in fn.arg_names
            if name.isupper() and name not in sizes and name not in consts}  # fmt: skip


def row_stride_hints(fn, d: int) -> set[str]:
    """D and the row strides (= D for contiguous rows), which the runtime sees as multiples of 16 when D is."""
    if d % 16:
        return set()
    return {name for name in fn.arg_names if name == "D" or name.startswith("stride_") and name.endswith("m")}


def compile_kernel(fn, sig: dict, consts: dict, attrs: dict, arch: int, options: dict):
    """(the compiled kernel, its measurements: "seconds", "shared" bytes, and whether its PTX has
    "wgmma" (wgmma.mma_async) and "mma" (mma.sync)) for sm_`arch`, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)  # fmt: skip
    ptx = compiled.asm["ptx"]
    return compiled, dict(seconds=round(time.time() - t0, 2), shared=int(compiled.metadata.shared),
                          wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx)  # fmt: skip


def ptxas_spills(ptx: str) -> dict:
    """{"spill_stores", "spill_loads"}: the bytes that `ptxas -v` (Triton's own ptxas, for the PTX's
    target) reports for a kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    arch = int(re.search(r"\d+", target).group(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={target}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {target}:\n{proc.stderr[-2000:]}")
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if not found:
        raise RuntimeError(f"no spill line in the ptxas -v log:\n{proc.stderr}")
    return dict(spill_stores=sum(int(s) for s, _ in found), spill_loads=sum(int(lo) for _, lo in found))


def cubin_resources(compiled, opcodes: Iterable[str] = ()) -> dict:
    """Registers and spills of a compiled kernel, from `cuobjdump` on its cubin (no GPU needed):
    "registers" per thread, "stack" bytes (Triton kernels have no local arrays: a stack frame is
    spills) and "loop_spills", the local-memory loads and stores inside a loop (between a backward
    branch and its target), where a spill costs once per iteration instead of once per program.
    With `opcodes` (e.g. "UTMALDG"), also "sass": {opcode: how many instructions of the SASS have it}."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    code = [(int(addr, 16), op) for addr, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target, 16), addr) for addr, op in code for target in re.findall(r"\bBRA 0x([0-9a-f]+)", op)
             if int(target, 16) < addr]  # fmt: skip
    local = [addr for addr, op in code if re.search(r"\b(STL|LDL)\b", op)]
    in_loops = sum(any(lo <= addr <= hi for lo, hi in loops) for addr in local)
    out = dict(registers=int(reg), stack=int(stack), loop_spills=in_loops)
    if opcodes:
        out["sass"] = {name: sum(bool(re.match(rf"(@!?U?P\w+\s+)?{name}\b", op.strip())) for _, op in code)
                       for name in opcodes}  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------
# The checks on a report's records; `name` says which job a record is, in the messages.


def compiled(report: dict) -> list[Record]:
    """The records whose compile succeeded."""
    return [r for r in report["records"] if "error" not in r]


def assert_all_compiled(report: dict, name: Namer) -> None:
    failed = [f"{name(r)}:\n{r['error']}" for r in report["records"] if "error" in r]
    assert not failed, f"{len(failed)} of {len(report['records'])} compiles failed:\n\n" + "\n\n".join(failed)


def assert_every_config_compiled(report: dict) -> None:
    """Each config of each kernel kind in the report's "configs" is compiled by an "all-configs" job."""
    seen = {(r["kind"], *r["cfg"]) for r in report["records"] if r["group"] == "all-configs"}
    missing = [(kind, *c) for kind, cs in report["configs"].items() for c in cs if (kind, *c) not in seen]
    assert not missing, f"configs never compiled (pruned at bf16/sm_90?): {missing}"


def assert_tensor_cores(records: Iterable[Record], name: Namer, *, below_wgmma_size: bool = False) -> None:
    """Each record's PTX has a tensor-core instruction: wgmma on sm_90 (or mma.sync, if the dots are
    `below_wgmma_size`, under its 64 rows), mma.sync on sm_80."""

    def has_one(r):
        return r["wgmma"] or (below_wgmma_size and r["mma"]) if r["arch"] == 90 else r["mma"]

    bad = [name(r) for r in records if not has_one(r)]
    assert not bad, "no tensor-core instruction (wgmma on sm_90, mma.sync on sm_80) in:\n" + "\n".join(bad)


def assert_shared_memory(records: Iterable[Record], name: Namer) -> None:
    """Shared memory within the device limit, and, where a record has an "estimate" (what the
    autotuner prunes with), within the estimate: it must never underestimate."""
    records = list(records)
    over = [f"{name(r)}: {r['shared']} B > {SMEM_LIMIT[r['arch']]} B" for r in records
            if r["shared"] > SMEM_LIMIT[r["arch"]]]  # fmt: skip
    assert not over, "shared memory over the device limit:\n" + "\n".join(over)
    under = [f"{name(r)}: uses {r['shared']} B, estimated {r['estimate']} B" for r in records
             if r.get("estimate") is not None and r["shared"] > r["estimate"]]  # fmt: skip
    assert not under, "smem_estimate below the compiled kernel's shared memory:\n" + "\n".join(under)


def assert_no_stack_frame(records: Iterable[Record], name: Namer) -> None:
    """No stack frame in any record's cubin (:func:`cubin_resources`), nor local memory in its loops:
    Triton kernels have no local arrays, so a stack frame means ptxas spilled registers."""
    spilled = [f"{name(r)}: {r['stack']} B of stack ({r['loop_spills']} local loads/stores in loops), "
               f"{r['registers']} registers" for r in records if r["stack"] or r["loop_spills"]]  # fmt: skip
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def assert_no_ptxas_spills(records: Iterable[Record], name: Namer) -> None:
    """No spill bytes in the `ptxas -v` report of any record (:func:`ptxas_spills`)."""
    spilling = [f"{name(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
                for r in records if r["spill_stores"] or r["spill_loads"]]  # fmt: skip
    assert not spilling, "register spills (ptxas -v):\n" + "\n".join(spilling)
