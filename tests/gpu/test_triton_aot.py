"""Every Triton kernel, in every block config autotuning may pick, compiled ahead of time for the GPU.

docs/design.md, check 3: no GPU is needed. `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
runs the whole compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin), which catches GPU-only compile
errors, and lets us assert tensor-core instructions (wgmma on sm_90, mma on sm_80, for bf16/fp16),
shared memory within the device limit (and within the estimate the autotuner prunes with), and,
from `cuobjdump` on the cubin, no register spills.

The test session runs with TRITON_INTERPRET=1 (tests/conftest.py), under which `@triton.jit` gives
interpreted functions that cannot be compiled; so the compilation runs in one subprocess without
it — this very file run as a script — which prints a JSON report that the tests below check (the
shared machinery: tests/gpu/_aot.py).
Matrix (pairwise-LSE compiles, 4 of its split-forward merge kernel, 50 squared-Frobenius ones, see `_frob_jobs`, + 5 of ArCL's
worst-pair kernel; a few minutes on 2 cores, seconds with a warm ~/.triton cache). Pairwise LSE, its
forward ("fwd") and backward kernels ("rows": dx with dy through atomics, or dx alone; "sym": x is y;
"dy": dy alone; "weights": the blocked route's G tiles, a D loop):
  * every config of every kernel: bf16, SimCLR flags, D = 128 (resident; "weights" loops), sm_90;
  * the config with the largest shared-memory estimate that survives pruning at D = 256, the
    largest resident D: bf16 on sm_90, fp16 on sm_80 (the pruning boundary), and for "rows" the
    dx-only variant too (its register pruning differs);
  * the D loop (D = 512) with every flag on (bank + y negatives), bf16: "fwd" and "weights";
  * every backward config left at D = 256, bf16, sm_90 (where their registers run out);
  * flag sets: MoCo (fp16, bank, no y negatives; dx only, and dy alone), DCL (no positive), CLIP with
    an odd D = 70 (no self mask, no divisibility by 16: unpipelined masked loads) for the forward and
    at its padded width 80 for the backward, which copies odd rows into aligned ones;
  * fp32 (CUDA-core dots, FP32_DOT_PRECISION = "ieee": no tensor-core assertion): the forward and
    the blocked backward's weights kernel (fp32 takes that route); the forward's tensor-core
    alternative "tf32x3" (wgmma asserted), in today's list;
  * the forward of fp32 and of unaligned rows (odd D) in the configs `forward_configs` gives them on
    a GPU (its own lists), the configs that run;
  * sm_80 (mma.sync), bf16, every kernel; the backward's positive-weight pre-pass;
  * the split-column forward (SPLIT): every config (bf16, D = 128, sm_90), the D loop with every
    flag, MoCo fp16, DCL fp32, the D = 256 shared-memory boundary, CLIP D = 70 on sm_80; and the
    merge kernel with 2 and MAX_SPLIT splits on sm_90 and sm_80.
Every compile's cubin is read back with cuobjdump (shipped with Triton) for its registers and stack
frame: the backward kernels and the forward (but fp16 D = 256 on sm_80) must have none, i.e. no
register spills, and the merge must not spill inside its loops (`test_backward_has_no_register_spills`,
`test_forward_has_no_loop_spills`).
"""

from __future__ import annotations

import pytest

from tests.gpu import _aot

pytest.importorskip("triton")

TIMEOUT_S = 600

#: The pairwise-LSE flag sets of the jobs, by the name a record carries (tests/gpu/test_triton_hopper_aot.py's too).
FLAGS = {
    "simclr": dict(HAS_BANK=False, EXCLUDE_SELF=True, INCLUDE_POS=True, Y_NEGATIVES=True),
    "all": dict(HAS_BANK=True, EXCLUDE_SELF=True, INCLUDE_POS=True, Y_NEGATIVES=True),
    "moco": dict(HAS_BANK=True, EXCLUDE_SELF=False, INCLUDE_POS=True, Y_NEGATIVES=False),
    "dcl": dict(HAS_BANK=False, EXCLUDE_SELF=True, INCLUDE_POS=False, Y_NEGATIVES=True),
    "clip": dict(HAS_BANK=False, EXCLUDE_SELF=False, INCLUDE_POS=True, Y_NEGATIVES=True),
}


# ------------------------------------------------------------------------------------------------
# The subprocess side (no TRITON_INTERPRET): build the matrix, compile, print a JSON report.


def _jobs():
    import torch

    from fastssl.kernels.triton import pairwise_lse as K

    dtypes = _aot.DTYPES

    def cands(kind, dt, d, arch, needs_dy=True, configs=None):
        block_k, single_k, block_dout = _tiles(K, kind, d, dtypes[dt])
        if kind == "fwd" and configs is None:
            # On a GPU the forward of fp32 or unaligned rows autotunes over its own configs: those that
            # forward_configs gives contiguous (·, d) rows, the configs that run.
            configs = K.forward_configs(torch.empty(1, d, dtype=dtypes[dt]))
        return K.candidate_configs(kind, dtypes[dt].itemsize, block_k, single_k, block_dout, _aot.SMEM_LIMIT[arch],
                                   needs_dy, configs)  # fmt: skip

    def job(group, kind, dt, d, flags, arch, cfg, needs_dy=True):
        return dict(family="lse", group=group, kind=kind, dtype=dt, D=d, flags=flags, arch=arch,
                    BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, cfg=_aot.cfg_key(cfg), needs_dy=needs_dy)  # fmt: skip

    def estimate(kind, dt, d, cfg):
        block_k, single_k, block_dout = _tiles(K, kind, d, dtypes[dt])
        return K.smem_estimate(kind, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], block_k, single_k,
                               dtypes[dt].itemsize, cfg.num_stages, block_dout)  # fmt: skip

    def largest(kind, dt, d, arch, needs_dy=True):
        return max(cands(kind, dt, d, arch, needs_dy), key=lambda c: estimate(kind, dt, d, c))

    jobs = []
    kinds = ("fwd", "rows", "sym", "dy", "weights")
    resident = ("fwd", "rows", "sym", "dy")
    # fp32 first: CUDA-core dots compile slowest, and the pool balances better with them up front.
    # The fp32 backward takes the blocked route (backward_route): its weights kernel loops over D.
    for kind, d in (("fwd", 128), ("weights", 300)):
        jobs.append(job("fp32", kind, "fp32", d, "simclr", 90, cands(kind, "fp32", d, 90)[-1]))
    # The tensor-core alternative for fp32 (FP32_DOT_PRECISION = "tf32x3"): shared memory grows. It
    # does not run, and FWD_FP32_CONFIGS were chosen for "ieee" dots (with tf32x3, their 2-stage one
    # outgrows smem_estimate): today's list, as pruned for fp32.
    tf32x3 = cands("fwd", "fp32", 128, 90, configs=K.CONFIGS["fwd"])[0]
    jobs.append(dict(job("fp32-tf32x3", "fwd", "fp32", 128, "simclr", 90, tf32x3), precision="tf32x3"))
    for kind in kinds:
        jobs += [job("all-configs", kind, "bf16", 128, "simclr", 90, c) for c in cands(kind, "bf16", 128, 90)]
    for dt, arch in (("bf16", 90), ("fp16", 80)):
        for kind in resident:
            jobs.append(job("smem-boundary", kind, dt, 256, "simclr", arch, largest(kind, dt, 256, arch)))
    jobs.append(job("smem-boundary", "rows", "bf16", 256, "moco", 90, largest("rows", "bf16", 256, 90, False),
                    needs_dy=False))  # fmt: skip
    # D = 256, the widest resident D, is where the backward's registers run out: every config left.
    for kind in ("rows", "sym", "dy"):
        jobs += [job("d256-configs", kind, "bf16", 256, "simclr", 90, c) for c in cands(kind, "bf16", 256, 90)]
    for kind in ("fwd", "weights"):
        jobs.append(job("d-loop", kind, "bf16", 512, "all", 90, cands(kind, "bf16", 512, 90)[0]))
    # MoCo: the query's dx alone (the key is not trained), and a key tower trained on its own.
    jobs.append(job("flags", "fwd", "fp16", 128, "moco", 90, cands("fwd", "fp16", 128, 90)[1]))
    jobs.append(job("flags", "rows", "fp16", 128, "moco", 90, cands("rows", "fp16", 128, 90, False)[1], False))
    jobs.append(job("flags", "dy", "fp16", 128, "moco", 90, cands("dy", "fp16", 128, 90)[1]))
    for kind in ("fwd", "sym", "rows"):
        jobs.append(job("flags", kind, "bf16", 64, "dcl", 90, cands(kind, "bf16", 64, 90)[-1]))
    # The backward pads an odd D to a multiple of 16 (aligned_rows), so it is compiled at that width.
    for kind in ("fwd", "rows", "dy", "weights"):
        d = 70 if kind == "fwd" else K.padded_width(70)
        jobs.append(job("flags", kind, "bf16", d, "clip", 90, cands(kind, "bf16", d, 90)[-1]))
    for kind in kinds:
        jobs.append(job("sm80", kind, "bf16", 128, "simclr", 80, cands(kind, "bf16", 128, 80)[0]))
    # The split-column forward (SPLIT: grid axis 1 walks one run of the column tiles, partial LSEs to
    # a scratch): every config, then the D loop, the bank, fp32, the smem boundary and sm_80.
    split = [job("split", "fwd", "bf16", 128, "simclr", 90, c) for c in cands("fwd", "bf16", 128, 90)]
    split += [job("split", "fwd", "bf16", 512, "all", 90, cands("fwd", "bf16", 512, 90)[0]),
              job("split", "fwd", "fp16", 128, "moco", 90, cands("fwd", "fp16", 128, 90)[1]),
              job("split", "fwd", "fp32", 128, "dcl", 90, cands("fwd", "fp32", 128, 90)[-1]),
              job("split", "fwd", "bf16", 256, "simclr", 90,
                  max(cands("fwd", "bf16", 256, 90), key=lambda c: estimate("fwd", "bf16", 256, c))),
              job("split", "fwd", "bf16", 70, "clip", 80, cands("fwd", "bf16", 70, 80)[0])]  # fmt: skip
    jobs += [dict(j, split=True) for j in split]
    # The backward's positive-weight pre-pass: one tile shape, row dots (no tl.dot), a D loop past 128.
    for dt, d, arch in (("bf16", 128, 90), ("fp32", 300, 90), ("fp16", 512, 80)):
        jobs.append(dict(family="lse", group="pos", kind="pos", dtype=dt, D=d, flags="simclr", arch=arch,
                         BLOCK_M=K.POS_BLOCK_R, BLOCK_N=0, num_warps=4, num_stages=3, cfg=[], needs_dy=True))
    return _frob_jobs() + _worst_pair_jobs() + _merge_jobs() + jobs


def _tiles(K, kind, d, dtype):
    """(BLOCK_K, SINGLE_K, BLOCK_DOUT) as the launchers pick them: "weights" always loops over D."""
    if kind == "weights":
        return K.blocked_block_k(d, dtype), False, 0
    if kind == "pos":
        return K.pos_block_k(d), False, 0
    return K.tile_dims(d, dtype)


def _worst_pair_jobs():
    """ArCL's worst-pair kernel: m ≤ 16 (M_PAD 16) and m = 64 (M_PAD 64), every input dtype."""
    cases = (("bf16", 90, 16), ("fp16", 80, 16), ("fp32", 90, 16), ("bf16", 90, 64), ("bf16", 80, 64))
    return [dict(family="worst", group="worst-pair", kind="fwd", dtype=dt, arch=arch, M_PAD=m_pad, BLOCK_D=128,
                 num_warps=4 if m_pad <= 16 else 8) for dt, arch, m_pad in cases]  # fmt: skip


def _measure_worst_pair(j):
    from fastssl.kernels.triton import worst_pair as W

    fn = W._worst_pair_fwd_kernel
    consts = dict(M_PAD=j["M_PAD"], BLOCK_D=j["BLOCK_D"], FP32_PRECISION="ieee", stride_d=1)
    pointers = {"v_ptr": j["dtype"], "sim_ptr": "fp32", "first_ptr": "i64", "second_ptr": "i64"}
    sig, attrs = _aot.signature(fn, consts, pointers, aligned=False)
    compiled, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"], {"num_warps": j["num_warps"]})
    return dict(measured, has_dot=True, **_aot.cubin_resources(compiled))


def _merge_jobs():
    """The split forward's merge kernel: the fewest and the most splits, sm_90 and sm_80."""
    from fastssl.kernels.triton import pairwise_lse as K

    return [dict(family="merge", group="merge", kind="merge", dtype="fp32", arch=arch, BLOCK_R=K.MERGE_BLOCK_R,
                 BLOCK_S=block_s, num_warps=4) for arch in (90, 80) for block_s in (2, K.MAX_SPLIT)]  # fmt: skip


def _measure_merge(j):
    from fastssl.kernels.triton import pairwise_lse as K

    fn = K._pairwise_lse_merge_kernel
    consts = dict(BLOCK_R=j["BLOCK_R"], BLOCK_S=j["BLOCK_S"])
    sig, attrs = _aot.signature(fn, consts, {"PART": "fp32", "LSE": "fp32"})
    compiled, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"], {"num_warps": j["num_warps"]})
    return dict(measured, has_dot=False, wgmma=False, mma=False, **_aot.cubin_resources(compiled))


def _measure(j):
    """Compile one job of any family as its launcher would; what the tests check of it."""
    from fastssl.kernels.triton import pairwise_lse as K

    if j["family"] == "frob":
        return _measure_frob(j)
    if j["family"] == "worst":
        return _measure_worst_pair(j)
    if j["family"] == "merge":
        return _measure_merge(j)
    kernel = {
        "fwd": K._pairwise_lse_fwd_kernel,
        "rows": K._pairwise_lse_bwd_rows_kernel,
        "sym": K._pairwise_lse_bwd_sym_kernel,
        "dy": K._pairwise_lse_bwd_dy_kernel,
        "weights": K._pairwise_lse_bwd_weights_kernel,
        "pos": K._pairwise_lse_bwd_pos_kernel,
    }[j["kind"]]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction, under an autotuner or not
    dtype = _aot.DTYPES[j["dtype"]]
    d = j["D"]
    precision = j.get("precision", K.FP32_DOT_PRECISION)
    block_k, single_k, block_dout = _tiles(K, j["kind"], d, dtype)
    flags = FLAGS[j["flags"]]
    consts = dict(
        flags, BLOCK_M=j["BLOCK_M"], BLOCK_N=j["BLOCK_N"], BLOCK_K=block_k, SINGLE_K=single_k,
        BLOCK_DOUT=block_dout, FP32_PRECISION=precision, NEEDS_DY=j.get("needs_dy", True), BLOCK_R=j["BLOCK_M"],
        # "weights" is launched on y's columns (Y_COLUMNS) when there are y negatives.
        Y_COLUMNS=flags["Y_NEGATIVES"], SPLIT=j.get("split", False),
        # Contiguous inputs: Triton specialises unit strides to constants at launch.
        stride_xd=1, stride_yd=1, stride_bd=1, stride_cd=1,
    )  # fmt: skip
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    pointers = _aot.upper_case_pointers(fn, consts, sizes=("M", "NY", "NB", "D", "ROW_BIN", "N_SPLIT", "R", "NC"),
                                        inputs=("X", "Y", "B", "C", "DX", "DY", "W"), dtype=j["dtype"])  # fmt: skip
    sig, attrs = _aot.signature(fn, consts, pointers, hinted=_aot.row_stride_hints(fn, d))
    compiled, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"],
                                             {"num_warps": j["num_warps"], "num_stages": j["num_stages"]})
    return dict(
        measured,
        estimate=None if j["kind"] == "pos" else K.smem_estimate(
            j["kind"], j["BLOCK_M"], j["BLOCK_N"], block_k, single_k, dtype.itemsize, j["num_stages"], block_dout,
            precision),  # fmt: skip
        # Without y negatives the dy kernel only gathers the positive rows: it has no tl.dot.
        has_dot=j["kind"] != "pos" and not (j["kind"] == "dy" and not flags["Y_NEGATIVES"]),
        **_aot.cubin_resources(compiled),
    )


# Squared-Frobenius kernels (fastssl/kernels/triton/frobenius.py): per (kernel, variant), the constexpr
# flags and the strides that are 1 at runtime (Triton specialises them) for that call site.
# "inner" reads a, b (R, K) as X, Y (L=R, M=K); "outer" reads aᵀ, bᵀ (L=K, M=R): unit strides on the
# other axis, so the two routes give the two operand orders (MN-major / K-major) of the tensor-core
# dots. "strided" has no unit stride at all (e.g. z[:, ::2]). "*-tf": the per-column transform on
# (shift and scale of both operands; of the input operand in "grad"), whose K axis is M on the inner
# route and L on the outer one; without it the shift/scale pointers are None (constexpr), as at runtime.
_TF = dict(HAS_X_SHIFT=True, HAS_X_SCALE=True, HAS_Y_SHIFT=True, HAS_Y_SCALE=True)
_FROB_VARIANTS = {
    ("frob-fwd", "inner"): (dict(TRIANGLE=False, GRAM_PAIR=False), ("stride_xm", "stride_ym")),
    ("frob-fwd", "inner-same"): (dict(TRIANGLE=True, GRAM_PAIR=False), ("stride_xm", "stride_ym")),
    ("frob-fwd", "outer"): (dict(TRIANGLE=True, GRAM_PAIR=True), ("stride_xl", "stride_yl")),
    ("frob-fwd", "outer-same"): (dict(TRIANGLE=True, GRAM_PAIR=False), ("stride_xl", "stride_yl")),
    ("frob-fwd", "strided"): (dict(TRIANGLE=False, GRAM_PAIR=False), ()),
    ("frob-fwd", "inner-tf"): (dict(TRIANGLE=False, GRAM_PAIR=False, **_TF), ("stride_xm", "stride_ym")),
    ("frob-fwd", "outer-tf"): (dict(TRIANGLE=True, GRAM_PAIR=True, TRANSFORM_ON_L=True, **_TF),
                               ("stride_xl", "stride_yl")),  # fmt: skip
    ("frob-matrix", "inner"): (dict(TRIANGLE=False), ("stride_xm", "stride_ym")),
    ("frob-matrix", "inner-same"): (dict(TRIANGLE=True), ("stride_xm", "stride_ym")),
    ("frob-matrix", "outer"): (dict(TRIANGLE=True), ("stride_xl", "stride_yl")),
    ("frob-matrix", "inner-tf"): (dict(TRIANGLE=False, **_TF), ("stride_xm", "stride_ym")),
    ("frob-matrix", "outer-tf"): (dict(TRIANGLE=True, TRANSFORM_ON_L=True, **_TF), ("stride_xl", "stride_yl")),
    # da = b·Cᵀ (Cᵀ a transposed view of the fp32 matrix), db = a·C, and (outer) da = (bbᵀ)·a.
    ("frob-grad", "inner-da"): (dict(W_LEFT=False), ("stride_xl", "stride_yl")),
    ("frob-grad", "inner-db"): (dict(W_LEFT=False), ("stride_xl", "stride_yq")),
    ("frob-grad", "outer"): (dict(W_LEFT=True), ("stride_xl", "stride_yq")),
    ("frob-grad", "strided"): (dict(W_LEFT=True), ("stride_xl",)),
    ("frob-grad", "inner-tf"): (dict(W_LEFT=False, HAS_SHIFT=True, HAS_SCALE=True), ("stride_xl", "stride_yl")),
    ("frob-grad", "outer-tf"): (dict(W_LEFT=True, HAS_SHIFT=True, HAS_SCALE=True), ("stride_xl", "stride_yq")),
}
#: The transform's flags and pointers of each kernel, all off / None unless a variant sets them.
_FROB_TF_FLAGS = {
    "fwd": dict(HAS_X_SHIFT=False, HAS_X_SCALE=False, HAS_Y_SHIFT=False, HAS_Y_SCALE=False, TRANSFORM_ON_L=False),
    "grad": dict(HAS_SHIFT=False, HAS_SCALE=False),
}
_FROB_TF_FLAGS["matrix"] = _FROB_TF_FLAGS["fwd"]
_FROB_TF_POINTERS = {"XSH": "HAS_X_SHIFT", "XSC": "HAS_X_SCALE", "YSH": "HAS_Y_SHIFT", "YSC": "HAS_Y_SCALE",
                     "SHIFT": "HAS_SHIFT", "SCALE": "HAS_SCALE"}  # fmt: skip


def _frob_jobs():
    """Matrix (50 compiles) for the squared-Frobenius kernels:
    * every config of every kernel, bf16, sm_90: fwd (inner route and the Gram pair, whose second
      accumulator prunes the 128-wide tiles), matrix (symmetric, outer), grad (W on either side);
    * the other variants (b is a, inner matrix, db), bf16 sm_90; odd sizes and strides (unpipelined
      masked loads), also with no unit stride at all; fp16 (SCALE_W) and fp32 ("ieee", CUDA cores)
      samples; sm_80, bf16;
    * the per-column transform on, both routes (TRANSFORM_ON_L off and on) of every kernel, bf16
      sm_90 in the config with the largest shared-memory estimate; the Gram pair on sm_80.
    """
    from fastssl.kernels.triton import frobenius as F

    dtypes = _aot.DTYPES

    def cands(kind, variant, dt, arch):
        flags = _FROB_VARIANTS[(kind, variant)][0]
        return F.candidate_configs(kind[5:], dtypes[dt].itemsize, _aot.SMEM_LIMIT[arch], flags.get("GRAM_PAIR", False),
                                   flags.get("W_LEFT", False), F.transform_l_params(kind[5:], flags))  # fmt: skip

    def estimate(kind, variant, dt, cfg):
        m = cfg.kwargs
        shape = (m["BLOCK_P"], m["BLOCK_Q"], m["BLOCK_L"]) if kind == "frob-grad" else (m["BLOCK"], m["BLOCK"], m["BLOCK_L"])
        flags = _FROB_VARIANTS[(kind, variant)][0]
        return F.smem_estimate(kind[5:], *shape, dtypes[dt].itemsize, cfg.num_stages, flags.get("W_LEFT", False),
                               F.transform_l_params(kind[5:], flags))  # fmt: skip

    def job(group, kind, variant, dt, arch, cfg, div16=True):
        return dict(family="frob", group=group, kind=kind, variant=variant, dtype=dt, arch=arch, div16=div16,
                    meta=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages, cfg=_aot.cfg_key(cfg))

    jobs = []
    # fp32 first: CUDA-core dots compile slowest, and the pool balances better with them up front.
    for kind, variant in (("frob-fwd", "outer"), ("frob-matrix", "inner"), ("frob-grad", "inner-da")):
        jobs.append(job("fp32", kind, variant, "fp32", 90, cands(kind, variant, "fp32", 90)[0]))
    for kind, variant in (("frob-fwd", "inner"), ("frob-fwd", "outer"), ("frob-matrix", "outer"),
                          ("frob-grad", "outer"), ("frob-grad", "inner-da")):  # fmt: skip
        group = "all-configs" if variant != "outer" or kind != "frob-fwd" else "gram-pair"
        jobs += [job(group, kind, variant, "bf16", 90, c) for c in cands(kind, variant, "bf16", 90)]
    for kind, variant in (("frob-fwd", "inner-same"), ("frob-fwd", "outer-same"), ("frob-matrix", "inner"),
                          ("frob-matrix", "inner-same"), ("frob-grad", "inner-db")):  # fmt: skip
        jobs.append(job("variants", kind, variant, "bf16", 90, cands(kind, variant, "bf16", 90)[0]))
    # Sizes and strides not multiples of 16 (e.g. K = 70): unvectorised masked loads, no pipelining.
    for kind, variant in (("frob-fwd", "inner"), ("frob-fwd", "strided"), ("frob-matrix", "outer"),
                          ("frob-grad", "strided")):  # fmt: skip
        jobs.append(job("odd", kind, variant, "bf16", 90, cands(kind, variant, "bf16", 90)[-1], div16=False))
    for kind, variant in (("frob-fwd", "outer"), ("frob-matrix", "outer"), ("frob-grad", "inner-da")):
        jobs.append(job("fp16", kind, variant, "fp16", 90, cands(kind, variant, "fp16", 90)[-1]))
    for kind, variant in (("frob-fwd", "inner"), ("frob-matrix", "outer"), ("frob-grad", "outer")):
        jobs.append(job("sm80", kind, variant, "bf16", 80, cands(kind, variant, "bf16", 80)[0]))
    for kind in ("frob-fwd", "frob-matrix", "frob-grad"):
        for variant in ("inner-tf", "outer-tf"):
            c = max(cands(kind, variant, "bf16", 90), key=lambda c: estimate(kind, variant, "bf16", c))
            jobs.append(job("transform", kind, variant, "bf16", 90, c))
    jobs.append(job("transform", "frob-fwd", "outer-tf", "bf16", 80, cands("frob-fwd", "outer-tf", "bf16", 80)[0]))
    return jobs


def _measure_frob(j):
    """Compile one squared-Frobenius job as its launcher would; what the tests check of it."""
    from fastssl.kernels.triton import frobenius as F

    kind = j["kind"][5:]
    kernel = {"fwd": F._sq_frobenius_fwd_kernel, "matrix": F._sq_frobenius_bwd_matrix_kernel,
              "grad": F._sq_frobenius_bwd_grad_kernel}[kind]  # fmt: skip
    fn = getattr(kernel, "fn", kernel)  # the JITFunction under the autotuner
    flags, unit = _FROB_VARIANTS[(j["kind"], j["variant"])]
    dt = j["dtype"]
    w_left = flags.get("W_LEFT", False)
    flags = dict(flags, SCALE_W=dt == "fp16") if kind == "grad" else flags
    flags = dict(_FROB_TF_FLAGS[kind], **flags)
    absent = {p: None for p, flag in _FROB_TF_POINTERS.items() if flag in flags and not flags[flag]}
    consts = dict(flags, **absent, **j["meta"], FP32_PRECISION=F.FP32_DOT_PRECISION, **{name: 1 for name in unit})
    pointers = {"X": dt, "Y": dt, "PART": "fp32", "W": "fp32", "GRAD": "fp32", "WMAX": "fp32", "OUT": dt}
    pointers.update({p: "fp32" for p in _FROB_TF_POINTERS})  # shifts and scales: contiguous fp32 (K,)
    if kind == "grad":  # the fp32 matrix W is X or Y
        pointers.update(X="fp32" if w_left else dt, Y=dt if w_left else "fp32")
    # With R, K multiples of 16, sizes and non-unit strides carry the runtime's %16 hint.
    hinted = [name for name in fn.arg_names if name in ("M", "L", "P", "Q") or name.startswith("stride_")]
    sig, attrs = _aot.signature(fn, consts, pointers, scalars={"coef": "fp32"}, hinted=hinted if j["div16"] else ())
    compiled, measured = _aot.compile_kernel(fn, sig, consts, attrs, j["arch"],
                                             {"num_warps": j["num_warps"], "num_stages": j["num_stages"]})
    m = j["meta"]
    shape = (m["BLOCK_P"], m["BLOCK_Q"], m["BLOCK_L"]) if kind == "grad" else (m["BLOCK"], m["BLOCK"], m["BLOCK_L"])
    return dict(
        measured,
        estimate=F.smem_estimate(kind, *shape, _aot.DTYPES[dt].itemsize, j["num_stages"], w_left,
                                 F.transform_l_params(kind, flags)),  # fmt: skip
        has_dot=True,
        **_aot.cubin_resources(compiled),
    )


def _configs():
    """Every config of every kernel, for the coverage test."""
    from fastssl.kernels.triton import frobenius as F
    from fastssl.kernels.triton import pairwise_lse as K

    configs = {kind: [_aot.cfg_key(c) for c in cs] for kind, cs in K.CONFIGS.items()}
    configs.update({f"frob-{kind}": [_aot.cfg_key(c) for c in cs] for kind, cs in F.CONFIGS.items()})
    return dict(configs=configs)


# ------------------------------------------------------------------------------------------------
# The pytest side.


@pytest.fixture(scope="module")
def report():
    return _aot.compile_report(__file__, TIMEOUT_S)


def _name(r):
    if r["family"] == "worst":
        return f"worst_pair {r['dtype']} M_PAD={r['M_PAD']} sm_{r['arch']} warps={r['num_warps']}"
    if r["family"] == "merge":
        return f"merge BLOCK_S={r['BLOCK_S']} sm_{r['arch']}"
    if r["family"] == "frob":
        return f"{r['kind']} {r['dtype']} {r['variant']} sm_{r['arch']} {' '.join(r['cfg'])}"
    dtype = r["dtype"] + (f"/{r['precision']}" if "precision" in r else "")
    kind = r["kind"] + (" (dx only)" if r["kind"] == "rows" and not r["needs_dy"] else "")
    return (
        f"{kind}{' split' if r.get('split') else ''} {dtype} D={r['D']} {r['flags']} sm_{r['arch']} "
        f"BLOCK_M={r['BLOCK_M']} BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']}"
    )


def test_every_kernel_compiles(report):
    _aot.assert_all_compiled(report, _name)


def test_every_config_is_covered(report):
    _aot.assert_every_config_compiled(report)


def test_tensor_cores(report):
    with_dots = [r for r in _aot.compiled(report)
                 if r["has_dot"] and (r["dtype"] != "fp32" or r.get("precision", "ieee") != "ieee")]  # fmt: skip
    _aot.assert_tensor_cores([r for r in with_dots if r["family"] != "worst"], _name)
    # ArCL's 16 x 16 Gram tile is below wgmma's 64-row minimum: mma.sync is the tensor-core path there.
    _aot.assert_tensor_cores([r for r in with_dots if r["family"] == "worst"], _name, below_wgmma_size=True)


def test_shared_memory(report):
    # The autotuner prunes with smem_estimate: it must never underestimate ("pos" has no estimate).
    _aot.assert_shared_memory(_aot.compiled(report), _name)


#: (family, kind) of the kernels whose loops must not touch local memory. The backward kernels and
#: some Frobenius configs (odd sizes, the transform along L) still spill inside their loops; they
#: join this set once they do not.
NO_LOOP_SPILLS = {("lse", "fwd"), ("merge", "merge")}


def test_forward_has_no_loop_spills(report):
    """The forward (split and unsplit) and the merge never spill inside a loop, and the forward has no
    stack frame at all, in the configs that run for fp32 and odd D (`forward_configs`) too. (fp16
    D = 256 on sm_80 spills a little before the column loop.)"""
    checked = [r for r in _aot.compiled(report) if (r["family"], r["kind"]) in NO_LOOP_SPILLS]
    assert len(checked) >= 20, "the forward's records are missing"
    in_loops = [f"{_name(r)}: {r['loop_spills']} local loads/stores in loops, {r['registers']} registers"
                for r in checked if r["loop_spills"]]  # fmt: skip
    assert not in_loops, "register spills inside loops:\n" + "\n".join(in_loops)
    forward = [r for r in checked if r["kind"] == "fwd" and not (r["arch"] == 80 and r["D"] == 256)]
    assert sum(r["dtype"] == "fp32" or r["D"] % 16 != 0 for r in forward) >= 5, "fp32 / odd-D records missing"
    _aot.assert_no_stack_frame(forward, _name)


#: Kernels whose cubins must have no stack frame: the pairwise-LSE backward (the forward's:
#: `test_forward_has_no_loop_spills`). A few Frobenius configs still spill and are not asserted yet.
SPILL_FREE_KINDS = ("rows", "sym", "dy", "weights", "pos")


def test_backward_has_no_register_spills(report):
    """No stack frame in the backward's cubins, at any D and arch: ptxas spilled no register."""
    checked = [r for r in _aot.compiled(report) if r["family"] == "lse" and r["kind"] in SPILL_FREE_KINDS]
    assert len(checked) >= 50, "the backward's records are missing"
    _aot.assert_no_stack_frame(checked, _name)


if __name__ == "__main__":
    _aot.main(_jobs, _measure, _configs)
