"""The opt-in Hopper variants of the pairwise-LSE kernels (`HopperVariant`), compiled ahead of time
for sm_90 without a GPU (docs/design.md, check 3), as tests/gpu/test_triton_aot.py does for today's
kernels: this file, run as a script without TRITON_INTERPRET, prints the report the tests check (the
shared machinery: tests/gpu/_aot.py).

Matrix, bf16 with SimCLR's flags unless said, sm_90, through each kernel's Hopper entry:
  * "tma", "pipeline" and both, in the first config of today's list, for the forward and the fused
    backward's "rows", "sym" and "dy" at D = 128 and D = 256 (the widest resident D);
  * both, in every config of HOPPER_CONFIGS ("wide") that pruning keeps (`wide_candidates`), at
    D = 128 and 256;
  * the forward's D loop (D = 512, bank and y negatives) through descriptors; MoCo (bank, fp16) and
    "rows" without dy;
  * "host_tma" (descriptors built on the host: `host_descriptors`), alone and with "pipeline", for
    the four kernels at D = 128 and 256 in the first config of today's list, and in each kept wide
    config at D = 128; the D loop, MoCo, "rows" without dy, and "sym" with a bank, as above;
  * the fp32 forward in each config `forward_configs` gives it (FWD_FP32_CONFIGS) at D = 70 (an odd
    D), 128 and 300 (the D loop), and split at D = 70: the pointer path, as launched (TMA off, no
    LOOP_STAGES: `tma_eligible` takes half precision only);
  * the forward of half-precision rows that Triton loads element by element (D = 70, 100, 200, 300:
    no divisibility hints) in each FWD_UNALIGNED config `forward_configs` picks for them, split too;
  * each kernel's Hopper entry with both switches off next to today's kernel (same flags, config).
Asserted: TMA copies (cp.async.bulk.tensor) wherever TMA is on; with "host_tma", UTMALDG in the
SASS and a TMA store (cp.async.bulk.tensor from shared to global in the PTX, UTMASTG in the SASS)
per output block the kernel writes (dx for "rows", dx and dy for "sym", dy for "dy"; none for the
forward), and none without it; wgmma (mma.sync for a forward block below 64 rows), no stack frame
(no register spills), shared memory within sm_90's 227 KiB and within `smem_estimate` (the pruning's
figure), and the same PTX (debug information aside) for the Hopper entry with both switches off as
for today's kernel.
Also: Triton 3.6's warp specialisation leaves sm_90 code unchanged, the reason it is not a variant.
"""

from __future__ import annotations

import pytest

from tests.gpu import _aot
from tests.gpu.test_triton_aot import FLAGS

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # a compiler run: minutes on 2 cores

TIMEOUT_S = 1200
#: The variants are Hopper's: every job compiles for sm_90.
ARCH = 90

RESIDENT_KINDS = ("fwd", "rows", "sym", "dy")


# ------------------------------------------------------------------------------------------------
# The subprocess side (no TRITON_INTERPRET): the matrix, and how one job compiles.


def _jobs():
    import torch

    from fastssl.kernels.triton import pairwise_lse as K

    smem_limit = _aot.SMEM_LIMIT[ARCH]

    def job(group, kind, dt, d, flags, cfg, tma, pipeline, needs_dy=True, entry="hopper", host=False):
        return dict(group=group, kind=kind, dtype=dt, D=d, flags=flags, arch=ARCH, BLOCK_M=cfg.kwargs["BLOCK_M"],
                    BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps, num_stages=cfg.num_stages, tma=tma,
                    pipeline=pipeline, needs_dy=needs_dy, entry=entry, host=host)  # fmt: skip

    def cands(kind, dt, d, needs_dy=True):
        block_k, single_k, block_dout = K.tile_dims(d, _aot.DTYPES[dt])
        return K.candidate_configs(kind, _aot.DTYPES[dt].itemsize, block_k, single_k, block_dout, smem_limit,
                                   needs_dy)  # fmt: skip

    def own(dt, d):
        """The forward's own configs that `forward_configs` gives contiguous (·, d) rows of `dt` on a GPU."""
        return K.forward_configs(torch.empty(1, d, dtype=_aot.DTYPES[dt]))

    jobs = []
    for d in (128, 256):
        for kind in RESIDENT_KINDS:
            first = cands(kind, "bf16", d)[0]
            for tma, pipeline in ((True, False), (False, True), (True, True)):
                jobs.append(job("variants", kind, "bf16", d, "simclr", first, tma, pipeline))
            block_k, single_k, _ = K.tile_dims(d, torch.bfloat16)
            jobs += [job("wide", kind, "bf16", d, "simclr", c, True, True)
                     for c in K.wide_candidates(kind, 2, block_k, single_k, smem_limit)]  # fmt: skip
    jobs.append(job("d-loop", "fwd", "bf16", 512, "all", cands("fwd", "bf16", 512)[0], True, True))
    jobs.append(job("flags", "fwd", "fp16", 128, "moco", cands("fwd", "fp16", 128)[0], True, True))
    jobs.append(job("flags", "rows", "fp16", 128, "moco", cands("rows", "fp16", 128, needs_dy=False)[0], True, True,
                    needs_dy=False))  # fmt: skip
    # "host_tma": descriptors from the host, TMA stores of the backward's outputs.
    for d in (128, 256):
        for kind in RESIDENT_KINDS:
            jobs += [job("host", kind, "bf16", d, "simclr", cands(kind, "bf16", d)[0], True, pipeline, host=True)
                     for pipeline in (False, True)]  # fmt: skip
    block_k, single_k, _ = K.tile_dims(128, torch.bfloat16)
    jobs += [job("host", kind, "bf16", 128, "simclr", c, True, True, host=True) for kind in RESIDENT_KINDS
             for c in K.wide_candidates(kind, 2, block_k, single_k, smem_limit)]  # fmt: skip
    jobs.append(job("host", "fwd", "bf16", 512, "all", cands("fwd", "bf16", 512)[0], True, True, host=True))
    jobs.append(job("host", "fwd", "fp16", 128, "moco", cands("fwd", "fp16", 128)[0], True, False, host=True))
    jobs.append(job("host", "rows", "fp16", 128, "moco", cands("rows", "fp16", 128, needs_dy=False)[0], True, False,
                    needs_dy=False, host=True))  # fmt: skip
    jobs.append(job("host", "rows", "bf16", 256, "all", cands("rows", "bf16", 256)[0], True, True, host=True))
    jobs.append(job("host", "sym", "bf16", 128, "all", cands("sym", "bf16", 128)[0], True, True, host=True))
    # fp32 (pointer path, today's code through the Hopper entry): every config it runs (FWD_FP32_CONFIGS)
    # at an odd resident D, a power of two and the D loop; an odd D split over grid axis 1.
    for d, flags in ((70, "clip"), (128, "simclr"), (300, "all")):
        jobs += [job("fp32", "fwd", "fp32", d, flags, c, False, False) for c in own("fp32", d)]
    jobs.append(dict(job("fp32", "fwd", "fp32", 70, "clip", own("fp32", 70)[-1], False, False), split=True))
    # Half-precision rows loaded element by element (D not a multiple of 16: no divisibility hints),
    # in the lists `forward_configs` gives them: D = 70 and 100 (BLOCK_K 128), 200 (256), 300 (the D loop).
    for dt, d in (("bf16", 70), ("fp16", 100), ("bf16", 200), ("bf16", 300)):
        jobs += [job("unaligned", "fwd", dt, d, "clip", c, False, False) for c in own(dt, d)]
    jobs += [dict(job("unaligned", "fwd", "bf16", d, "clip", own("bf16", d)[0], False, False), split=True)
             for d in (70, 200)]  # fmt: skip
    # The Hopper entry with both switches off against today's kernel: the same code (what ineligible
    # inputs and, on a GPU, the fp32 forward run).
    for kind, dt, d, flags, cfg in (("fwd", "bf16", 128, "all", cands("fwd", "bf16", 128)[0]),
                                    ("fwd", "fp32", 70, "clip", own("fp32", 70)[0]),
                                    ("rows", "bf16", 128, "all", cands("rows", "bf16", 128)[0]),
                                    ("sym", "bf16", 256, "simclr", cands("sym", "bf16", 256)[0]),
                                    ("dy", "fp16", 128, "clip", cands("dy", "fp16", 128)[0])):  # fmt: skip
        for entry in ("default", "hopper"):
            jobs.append(job("same-code", kind, dt, d, flags, cfg, False, False, entry=entry))
    return jobs


def _measure(j):
    """Compile one job through its entry as the launcher would; its shared memory and the estimate
    the autotuner prunes with, TMA copies and tensor cores in its PTX, a hash of that PTX, its stack."""
    import re

    from fastssl.kernels.triton import pairwise_lse as K

    entries = {"default": K._DEFAULT_KERNELS, "hopper": K._HOPPER_KERNELS}[j["entry"]]
    kernel = entries[j["kind"]]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction, under an autotuner or not
    dtype = _aot.DTYPES[j["dtype"]]
    block_k, single_k, block_dout = K.tile_dims(j["D"], dtype)
    consts = dict(
        FLAGS[j["flags"]], BLOCK_M=j["BLOCK_M"], BLOCK_N=j["BLOCK_N"], BLOCK_K=block_k, SINGLE_K=single_k,
        FP32_PRECISION=K.FP32_DOT_PRECISION, NEEDS_DY=j["needs_dy"], SPLIT=j.get("split", False), TMA=j["tma"],
        LOOP_STAGES=j["num_stages"] if j["pipeline"] else None,
        stride_xd=1, stride_yd=1, stride_bd=1,  # contiguous rows: Triton specialises unit strides
    )  # fmt: skip
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    descriptors = {}  # "host_tma": the tensordesc arguments a launch passes (`host_descriptors`), else None
    if j["entry"] == "hopper":
        consts["HOST_TMA"] = j["host"]
        meta = dict(consts, BLOCK_K=block_k)
        present = dict(x=not single_k if j["kind"] == "fwd" else True, y=True, bank=consts.get("HAS_BANK", False),
                       dx=True, dy=True)  # fmt: skip
        for name, (role, rows) in K.DESCRIPTORS[j["kind"]].items():
            if j["host"] and present[role]:
                descriptors[name] = f"tensordesc<{j['dtype']}[{meta[rows]}, {block_k}]>"
            else:
                consts[name] = None
    pointers = _aot.upper_case_pointers(fn, consts, sizes=("M", "NY", "NB", "D", "ROW_BIN", "N_SPLIT"),
                                        inputs=("X", "Y", "B", "DX", "DY"), dtype=j["dtype"])  # fmt: skip
    pointers = {k: v for k, v in pointers.items() if k not in descriptors}
    sig, attrs = _aot.signature(fn, consts, pointers, scalars=descriptors, hinted=_aot.row_stride_hints(fn, j["D"]))
    compiled, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"],
                                             {"num_warps": j["num_warps"], "num_stages": j["num_stages"]})
    ptx = compiled.asm["ptx"]
    return dict(
        measured,
        estimate=K.smem_estimate(j["kind"], j["BLOCK_M"], j["BLOCK_N"], block_k, single_k, dtype.itemsize,
                                 j["num_stages"], block_dout, tma=j["tma"]),  # fmt: skip
        tma_copies="cp.async.bulk.tensor" in ptx,
        tma_stores=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
        code=_code_hash(ptx, fn.__name__),
        **_aot.cubin_resources(compiled, opcodes=("UTMALDG", "UTMASTG")),
    )


def _code_hash(ptx, name):
    """A hash of the PTX without its debug information (source lines, debug labels and sections) and
    with the kernel's name (`name`) replaced, so that two entries of one body can be compared."""
    import hashlib
    import re

    lines = [line for line in ptx.split(".section\t.debug")[0].splitlines()
             if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp\d+:)", line)]  # fmt: skip
    return hashlib.sha256("\n".join(lines).replace(name, "KERNEL").encode()).hexdigest()


def _warp_specialize_probe():
    """The forward's loop shape (a resident row block, descriptor loads, a dot and an online LSE per
    column tile) compiled for sm_90 with tl.range(warp_specialize=True) and without: their PTX."""
    import triton
    import triton.language as tl

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

    ptx = {}
    for ws in (False, True):
        consts = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, WARP_SPECIALIZE=ws)
        sig, attrs = _aot.signature(loop, consts, {"X": "bf16", "Y": "bf16", "OUT": "fp32"},
                                    hinted=("D", "stride_xm", "stride_ym"))  # fmt: skip
        compiled, _ = _aot.compile_kernel(loop, sig, consts, attrs, ARCH, {"num_warps": 8, "num_stages": 3})
        ptx[ws] = compiled.asm["ptx"]
    return dict(same_ptx=ptx[False] == ptx[True], tma_copies="cp.async.bulk.tensor" in ptx[True])


def _extras():
    """The wide configs, for the coverage test, and the warp-specialisation probe."""
    from fastssl.kernels.triton import pairwise_lse as K

    wide = {kind: [[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages] for c in cs]
            for kind, cs in K.HOPPER_CONFIGS.items() if kind in RESIDENT_KINDS}  # fmt: skip
    return dict(wide=wide, warp_specialize=_warp_specialize_probe())


# ------------------------------------------------------------------------------------------------
# The pytest side.


@pytest.fixture(scope="module")
def report():
    return _aot.compile_report(__file__, TIMEOUT_S)


def _name(r):
    switches = "+".join(s for s in ("tma", "pipeline") if r[s]) or "pointers"
    switches = switches.replace("tma", "host_tma") if r.get("host") else switches
    kind = r["kind"] + ("" if r["needs_dy"] else " (dx only)") + (" split" if r.get("split") else "")
    return (f"{kind} [{switches}] {r['dtype']} D={r['D']} {r['flags']} BLOCK_M={r['BLOCK_M']} BLOCK_N={r['BLOCK_N']} "
            f"warps={r['num_warps']} stages={r['num_stages']}")  # fmt: skip


def test_every_variant_compiles(report):
    _aot.assert_all_compiled(report, _name)


def test_every_wide_config_is_compiled(report):
    """Each HOPPER_CONFIGS entry is compiled at D = 128 at least (else it could never be picked)."""
    seen = {(r["kind"], r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])
            for r in report["records"] if r["group"] == "wide" and r["D"] == 128}  # fmt: skip
    missing = [(kind, *c) for kind, cs in report["wide"].items() for c in cs if (kind, *c) not in seen]
    assert not missing, f"wide configs pruned at D = 128 (drop them from HOPPER_CONFIGS): {missing}"


def test_tma_copies_and_tensor_cores(report):
    tma = [r for r in _aot.compiled(report) if r["tma"]]
    assert len(tma) >= 20, "the TMA records are missing"
    no_tma = [_name(r) for r in tma if not r["tma_copies"]]
    assert not no_tma, "TMA on, but no cp.async.bulk.tensor in the PTX:\n" + "\n".join(no_tma)
    pointers = [_name(r) for r in _aot.compiled(report) if not r["tma"] and r["tma_copies"]]
    assert not pointers, "TMA off, yet TMA copies in:\n" + "\n".join(pointers)
    # A forward block of fewer than 64 rows is below wgmma's minimum: mma.sync is sm_90's tensor-core path there.
    half = [r for r in _aot.compiled(report) if r["dtype"] != "fp32"]
    below = [r["kind"] == "fwd" and r["BLOCK_M"] < 64 for r in half]
    _aot.assert_tensor_cores([r for r, b in zip(half, below) if not b], _name)
    _aot.assert_tensor_cores([r for r, b in zip(half, below) if b], _name, below_wgmma_size=True)


#: The output blocks each backward kernel writes, by TMA store under "host_tma" (the forward's lse and
#: pos are (M,) vectors: pointer stores).
TMA_STORES = {"fwd": 0, "rows": 1, "sym": 2, "dy": 1}


def test_host_descriptors_load_and_store_by_tma(report):
    """"host_tma": TMA loads (UTMALDG) and one TMA store per output block (UTMASTG in the SASS, the
    shared-to-global cp.async.bulk.tensor in the PTX); the device-side "tma" stores by pointer."""
    host = [r for r in _aot.compiled(report) if r["host"]]
    assert len(host) >= 20, "the host_tma records are missing"
    bad = [f"{_name(r)}: {r['sass']}, {r['tma_stores']} TMA stores in the PTX" for r in host
           if not r["sass"]["UTMALDG"] or r["sass"]["UTMASTG"] != TMA_STORES[r["kind"]]
           or r["tma_stores"] != TMA_STORES[r["kind"]]]  # fmt: skip
    assert not bad, "host_tma without its TMA loads or with another count of TMA stores:\n" + "\n".join(bad)
    others = [_name(r) for r in _aot.compiled(report) if not r["host"] and (r["sass"]["UTMASTG"] or r["tma_stores"])]
    assert not others, "TMA stores without host_tma:\n" + "\n".join(others)
    device = [r for r in _aot.compiled(report) if r["tma"] and not r["host"]]
    assert device and all(r["sass"]["UTMALDG"] for r in device), "device-side descriptors lost their UTMALDG"


def test_no_register_spills(report):
    _aot.assert_no_stack_frame(_aot.compiled(report), _name)


def test_shared_memory(report):
    # Within sm_90's 227 KiB, and within smem_estimate (every record has one): pruning relies on it.
    _aot.assert_shared_memory(_aot.compiled(report), _name)


def test_switches_off_compile_to_todays_kernels(report):
    """The Hopper entry without TMA and LOOP_STAGES gives today's kernel's very PTX: the pointer path
    of a variant is today's code, not a look-alike."""
    pairs = {}
    for r in _aot.compiled(report):
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
    _aot.main(_jobs, _measure, _extras)
