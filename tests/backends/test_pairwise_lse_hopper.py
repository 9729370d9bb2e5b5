"""The opt-in Hopper variants of the Triton pairwise-LSE kernels (`HopperVariant`, FASTSSL_LSE_HOPPER),
under the interpreter: every variant against the torch backend and against today's Triton kernels.

Under the interpreter "tma" and "host_tma" are the variants that compute differently: their tiles
come through tensor descriptors (the interpreter runs descriptor loads: bounds give the zeros the
pointer path's masks give), built in the kernel ("tma") or on the host ("host_tma": Triton 3.6's
interpreter takes TensorDescriptor arguments, turning each into the descriptor the kernel would
build, so the host form runs here end to end, its TMA stores of dx and dy included, and is also
checked against the float64 oracle). "pipeline" and "wide" only reach the compiler (the loops'
num_stages, the config lists: the interpreter runs one tile config), so here they check the plumbing
of the Hopper entries; their compiled code is checked in tests/gpu/test_triton_hopper_aot.py. Where
the arithmetic is the same (resident D: one chunk, one product per tile), a variant must give
today's results bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from fastssl._common import triton_interpreting as interpreting  # noqa: E402
from fastssl.kernels.torch import pairwise_lse as torch_kernels  # noqa: E402
from fastssl.kernels.triton import pairwise_lse as T  # noqa: E402
from fastssl.ops.pairwise_lse import pairwise_lse  # noqa: E402
from tests.backends.test_pairwise_lse import MODES, make_case, run_both  # noqa: E402
from tests.utils import TOLERANCES, assert_close  # noqa: E402

if not interpreting():
    pytest.skip("runs the kernels under the interpreter (TRITON_INTERPRET=1, tests/conftest.py)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ["tma", "pipeline", "wide", "tma,pipeline,wide", "host_tma", "host_tma,pipeline,wide"]
MODE_NAMES = list(MODES)


@pytest.fixture
def variant(monkeypatch):
    def use(text):
        monkeypatch.setattr(T, "HOPPER_VARIANT", T.parse_hopper_variant(text))

    return use


def cotangents(m, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, generator=gen), torch.randn(m, generator=gen)


def run(x, y, bank, scale, flags, n_split=None):
    """Forward (lse, pos) and backward (dx, dy) of the Triton kernels under the current variant."""
    lse, pos = T.pairwise_lse_forward(x, y, bank, scale, flags, n_split=n_split)
    g_lse, g_pos = cotangents(x.shape[0])
    dx, dy = T.pairwise_lse_backward(x, y, bank, scale, lse, g_lse, g_pos, flags)
    return lse, pos, dx, dy


def torch_backend(x, y, bank, scale, flags):
    lse, pos = torch_kernels.pairwise_lse_forward(x, y, bank, scale, flags)
    g_lse, g_pos = cotangents(x.shape[0])
    dx, dy = torch_kernels.pairwise_lse_backward(x, y, bank, scale, lse, g_lse, g_pos, flags)
    return lse, pos, dx, dy


def assert_matches_torch(got, x, y, bank, scale, flags, what):
    """(lse, pos, dx, dy) against the torch backend, per-dtype tolerance; gradients as a whole (atol
    relative to their largest entry). Where x is y and both roles are asked for, the backends may
    split dx + dy differently (the op's contract), so their sum is compared."""
    want = torch_backend(x, y, bank, scale, flags)
    rtol, atol = TOLERANCES[x.dtype]
    got, want = [t.double() for t in got], [t.double() for t in want]
    if y is x and flags.needs_dx and flags.needs_dy and x.shape[0]:
        got = got[:2] + [got[2] + got[3]]
        want = want[:2] + [want[2] + want[3]]
    for name, a, b in zip(("lse", "pos", "dx", "dy"), got, want):
        scale_atol = 1.0 if name in ("lse", "pos") or b.numel() == 0 else float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol + rtol * scale_atol,
                                   msg=lambda m: f"{what} {name} vs torch ({x.dtype}): {m}")  # fmt: skip


def assert_same(got, want, what):
    for name, a, b in zip(("lse", "pos", "dx", "dy"), got, want):
        assert torch.equal(a, b), f"{what}: {name} differs from today's kernels"


# ------------------------------------------------------------------------------------------------
# the setting


def test_parse_hopper_variant():
    assert T.parse_hopper_variant("") == T.HopperVariant() == T.parse_hopper_variant("default")
    assert T.parse_hopper_variant(" tma , wide") == T.HopperVariant(tma=True, wide=True)
    assert T.parse_hopper_variant("tma,pipeline,wide") == T.HopperVariant(True, True, True)
    assert T.parse_hopper_variant("host_tma,pipeline") == T.HopperVariant(pipeline=True, host_tma=True)
    with pytest.raises(ValueError, match="warp_specialize"):
        T.parse_hopper_variant("tma,warp_specialize")


def test_setting_is_read_from_the_environment():
    """FASTSSL_LSE_HOPPER, read when the module is imported; unset, the default (today's kernels)."""
    code = "from fastssl.kernels.triton import pairwise_lse as T; print(tuple(T.HOPPER_VARIANT))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for text, want in (("tma,pipeline", "(True, True, False, False)"), ("", "(False, False, False, False)"),
                       ("host_tma", "(False, False, False, True)")):  # fmt: skip
        env["FASTSSL_LSE_HOPPER"] = text
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                             check=True)  # fmt: skip
        assert out.stdout.strip() == want, (text, out.stdout, out.stderr[-2000:])


def test_default_launches_todays_kernels():
    assert T.HOPPER_VARIANT == T.HopperVariant() and not T.PINNED_CONFIGS, "the default must be no variant"
    x = torch.randn(8, 16)
    for kind in ("fwd", "rows", "sym", "dy"):
        kernel, extra = T.variant_kernel(kind, (x, x, None))
        assert kernel is T._DEFAULT_KERNELS[kind] and extra == {}


# ------------------------------------------------------------------------------------------------
# the rule for TMA: every input eligible, else the pointer path


def test_tma_eligible_rule():
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    assert T.tma_eligible(x, x, None)
    assert not T.tma_eligible(torch.randn(40, 70, dtype=torch.bfloat16)), "140-byte rows are not 16-byte aligned"
    assert T.tma_eligible(torch.randn(40, 72, dtype=torch.bfloat16)), "144-byte rows are"
    assert not T.tma_eligible(torch.randn(32, 40).T), "no unit stride along D"
    assert not T.tma_eligible(x[:, 1:9]), "a base 2 bytes past an aligned one"
    assert T.tma_eligible(x[:, 8:16]), "a base 16 bytes past an aligned one, 64-byte rows"
    assert not T.tma_eligible(x, torch.randn(40, 70, dtype=torch.bfloat16)), "one ineligible input decides"
    assert T.tma_eligible(x.half()) and not T.tma_eligible(x.float()), "half precision only"


def test_forward_configs_rule(monkeypatch):
    """Where today's forward configs spilled (fp32; half-precision rows loaded element by element),
    a GPU launch takes `forward_configs`' lists through the Hopper entry (TMA off); elsewhere today's
    kernel. (The interpreter itself keeps today's entry: it runs one tile config anyway.)"""
    bf16 = torch.bfloat16
    assert T.forward_configs(torch.randn(8, 64)) is T.FWD_FP32_CONFIGS
    assert T.forward_configs(torch.randn(8, 64, dtype=bf16), torch.randn(9, 64, dtype=bf16)) is None
    assert T.forward_configs(torch.randn(8, 70, dtype=bf16)) is T.FWD_UNALIGNED_CONFIGS
    assert T.forward_configs(torch.randn(8, 300, dtype=bf16)) is T.FWD_UNALIGNED_CONFIGS, "the D loop"
    assert T.forward_configs(torch.randn(8, 200, dtype=bf16)) is T.FWD_UNALIGNED_WIDE_K_CONFIGS
    transposed = torch.randn(64, 8, dtype=bf16).T
    assert T.forward_configs(transposed) is T.FWD_UNALIGNED_CONFIGS, "no unit stride along D"
    bank = torch.randn(5, 72, dtype=bf16)[:, :64]  # rows 72 elements apart
    assert T.forward_configs(torch.randn(8, 64, dtype=bf16), None, bank) is T.FWD_UNALIGNED_CONFIGS, "any input"
    x = torch.randn(8, 70, dtype=bf16)
    assert T.variant_kernel("fwd", (x, x, None)) == (T._DEFAULT_KERNELS["fwd"], {})
    monkeypatch.setattr(T, "interpreting", lambda: False)  # what a GPU launch decides
    shapes = tuple((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, None)
                   for c in T.FWD_UNALIGNED_CONFIGS)  # fmt: skip
    assert T.variant_kernel("fwd", (x, x, None)) == (T._tuned("fwd", shapes), {"TMA": False})
    aligned = torch.randn(8, 64, dtype=bf16)
    assert T.variant_kernel("fwd", (aligned, aligned, None)) == (T._DEFAULT_KERNELS["fwd"], {})


@pytest.mark.parametrize("name", ["tma", "host_tma"])
@pytest.mark.parametrize("what", ["odd D", "transposed view"])
def test_ineligible_inputs_take_the_pointer_path(variant, what, name):
    """TMA asked for, an input it cannot take: the launch passes TMA=False and gives today's results."""
    strided = what == "transposed view"
    x, y, bank, scale, flags = make_case("clip", 37, 70 if what == "odd D" else 24, torch.bfloat16, strided=strided)
    want = run(x, y, bank, scale, flags)
    variant(name)
    kernel, extra = T.variant_kernel("fwd", (x, y, None))
    assert kernel is not T._DEFAULT_KERNELS["fwd"] and extra == {"TMA": False}
    if name == "tma":
        assert T.variant_kernel("fwd", (y.contiguous(), y, None))[1] == {"TMA": T.tma_eligible(y)}
    assert_same(run(x, y, bank, scale, flags), want, f"{name}, {what}")


def test_host_tma_needs_its_outputs_eligible(variant):
    """"host_tma" stores the backward's outputs through descriptors: an output TMA cannot take (here
    140-byte rows) sends the whole launch down the pointer path, by the same rule as the inputs."""
    variant("host_tma")
    x = torch.randn(37, 64, dtype=torch.bfloat16)
    assert T.variant_kernel("rows", (x, x, None), {"dx": torch.empty_like(x)})[1]["HOST_TMA"]
    odd = torch.empty(37, 70, dtype=torch.bfloat16)
    assert T.variant_kernel("rows", (x, x, None), {"dx": odd})[1] == {"TMA": False}
    assert T.variant_kernel("dy", (x, x), {"dy": torch.empty(0, 64, dtype=torch.bfloat16)})[1] == {"TMA": False}


def test_host_tma_needs_no_allocator(monkeypatch, variant):
    """What a GPU launch decides (interpreting off, inputs eligible): "tma" installs the global scratch
    allocator its device-side descriptors need, "host_tma" does not."""
    installs = []
    monkeypatch.setattr(T, "_ensure_tma_allocator", lambda: installs.append(1))
    monkeypatch.setattr(T, "interpreting", lambda: False)
    monkeypatch.setattr(T, "tma_eligible", lambda *tensors: True)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    variant("host_tma")
    assert T.variant_kernel("fwd", (x, x, None))[1]["HOST_TMA"] and installs == []
    variant("tma")
    assert T.variant_kernel("fwd", (x, x, None))[1] == {"TMA": True} and installs == [1]


def test_only_host_descriptors_take_a_pre_hook(variant):
    """The block-shape pre_hook rides on the "host_tma" autotuners only: every other launch of a
    Hopper entry (the other variants, and on a GPU `forward_configs`' lists) runs no hook."""
    x = torch.randn(37, 64, dtype=torch.bfloat16)
    for text, hooked in (("host_tma", True), ("tma,pipeline,wide", False)):
        variant(text)
        for kind in ("fwd", "rows", "sym", "dy"):
            kernel, extra = T.variant_kernel(kind, (x, x, None), {"dx": torch.empty_like(x), "dy": torch.empty_like(x)})
            assert all((c.pre_hook is not None) == hooked for c in kernel.configs), (text, kind)
            assert extra.get("HOST_TMA", False) == hooked


@pytest.mark.parametrize("kind,tensors,outputs", [
    ("fwd", ("x", "y", "bank"), {}), ("rows", ("x", "y", "bank"), {"dx"}), ("sym", ("x", "x", None), {"dx", "dy"}),
    ("dy", ("x", "y"), {"dy"})])  # fmt: skip
@pytest.mark.parametrize("d", [40, 272])
def test_host_descriptors(kind, tensors, outputs, d):
    """Each Hopper entry's host descriptors cover all of their tensor (shape, strides, base), the
    forward's x only in the D loop (its resident block is a pointer load), an absent bank none; the
    pre_hook sets every block shape from the config (rows per DESCRIPTORS, BLOCK_K columns)."""
    made = {name: torch.randn(n, d, dtype=torch.bfloat16) for name, n in (("x", 37), ("y", 29), ("bank", 11))}
    made.update(dx=torch.empty(37, d, dtype=torch.bfloat16), dy=torch.empty(29, d, dtype=torch.bfloat16))
    roles = dict(zip(("x", "y", "bank"), [made[t] if t else None for t in tensors]),
                 **{o: made[o] for o in outputs})  # fmt: skip
    descs = T.host_descriptors(kind, roles)
    assert set(descs) == set(T.DESCRIPTORS[kind])
    for name, desc in descs.items():
        role, rows = T.DESCRIPTORS[kind][name]
        t = roles.get(role)
        if t is None or (kind == "fwd" and role == "x" and d <= 256):
            assert desc is None, name
            continue
        assert desc.base is t and list(desc.shape) == [t.shape[0], d] and list(desc.strides) == [d, 1], name
    nargs = dict(descs, BLOCK_M=64, BLOCK_N=32, BLOCK_K=T.tile_dims(d, torch.bfloat16)[0])
    T._set_block_shapes(kind, nargs)
    for name, desc in descs.items():
        if desc is not None:
            assert desc.block_shape == [nargs[T.DESCRIPTORS[kind][name][1]], nargs["BLOCK_K"]], name


# ------------------------------------------------------------------------------------------------
# every variant, every mode


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_every_mode(monkeypatch, variant, name, mode, dtype):
    """Resident D (37 rows in 16-row tiles: ragged edges, bank tiles). fp32, whose rows TMA does not
    take (`tma_eligible`), runs the Hopper entry's pointer path, through the fused backward too
    (forced: fp32 takes the blocked route by default, which no variant touches)."""
    monkeypatch.setattr(T, "BACKWARD_ROUTE", "fused")
    x, y, bank, scale, flags = make_case(mode, 37, 24, dtype)
    want = run(x, y, bank, scale, flags)
    variant(name)
    got = run(x, y, bank, scale, flags)
    assert_same(got, want, f"{name}/{mode}")
    assert_matches_torch(got, x, y, bank, scale, flags, f"{name}/{mode}")


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("name", ["tma", "tma,pipeline,wide", "host_tma"])
def test_variant_one_gradient(variant, name, mode, needs):
    """dx alone ("rows" without dy) and dy alone (the "dy" pass), fp16."""
    x, y, bank, scale, flags = make_case(mode, 29, 40, torch.float16)
    flags = flags._replace(needs_dx=needs[0], needs_dy=needs[1])
    want = run(x, y, bank, scale, flags)
    variant(name)
    got = run(x, y, bank, scale, flags)
    assert_same(got, want, f"{name}/{mode} needs={needs}")
    assert_matches_torch(got, x, y, bank, scale, flags, f"{name}/{mode} needs={needs}")


@pytest.mark.parametrize("name", ["tma,pipeline", "host_tma"])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_tma_split_forward(variant, mode, name):
    """The split forward (3 runs of column tiles over grid axis 1) through descriptors."""
    x, y, bank, scale, flags = make_case(mode, 45, 16, torch.bfloat16)
    want = T.pairwise_lse_forward(x, y, bank, scale, flags, n_split=3)
    variant(name)
    got = T.pairwise_lse_forward(x, y, bank, scale, flags, n_split=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), mode


@pytest.mark.parametrize("name", ["tma", "host_tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["simclr", "moco", "bank+batch", "uniformity"])
def test_tma_forward_d_loop(variant, mode, dtype, name):
    """D = 304 and 264, past the resident width (256): the forward's D loop reads BLOCK_K chunks
    through descriptors (a ragged last chunk). The same products summed in the same order, but the
    interpreter's matmul of a transposed operand may round differently: the torch backend's
    tolerance, not bits."""
    x, y, bank, scale, flags = make_case(mode, 33, 304 if dtype == torch.bfloat16 else 264, dtype)
    variant(name)
    assert not T.tile_dims(x.shape[1], dtype)[1] and T.variant_kernel("fwd", (x, y, bank))[1]["TMA"]
    assert_matches_torch(run(x, y, bank, scale, flags), x, y, bank, scale, flags, f"{name} D-loop/{mode}")


def test_variant_through_the_op(variant):
    """The autograd op, backend="triton", with every switch on: values and gradients of x, y and the
    scale against the torch backend."""
    variant("tma,pipeline,wide")
    for mode in ("simclr", "clip"):
        x, y, bank, scale, flags = make_case(mode, 30, 32, torch.bfloat16)
        outs = {}
        for backend in ("triton", "torch"):
            xr = x.detach().clone().requires_grad_()
            yr = xr if y is x else y.detach().clone().requires_grad_()
            sr = scale.detach().clone().requires_grad_()
            lse, pos = pairwise_lse(xr, yr, bank, sr, flags, backend=backend)
            (lse.sum() + 0.5 * pos.sum()).backward()
            outs[backend] = [lse, pos, xr.grad, sr.grad] + ([] if y is x else [yr.grad])
        rtol, atol = TOLERANCES[torch.bfloat16]
        for a, b in zip(outs["triton"], outs["torch"]):
            atol_b = atol * max(1.0, float(b.detach().abs().max()))
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol_b)


# ------------------------------------------------------------------------------------------------
# "host_tma" against the float64 oracle


@pytest.fixture
def spy(monkeypatch):
    """The extra meta of every variant_kernel call of the launchers, by kind."""
    seen = {}
    real = T.variant_kernel

    def record(kind, tensors, outputs=None):
        kernel, extra = real(kind, tensors, outputs)
        seen[kind] = extra
        return kernel, extra

    monkeypatch.setattr(T, "variant_kernel", record)
    return seen


@pytest.mark.parametrize("dtype,m,d", [(torch.bfloat16, 37, 24), (torch.float16, 29, 40)])
@pytest.mark.parametrize("mode", MODE_NAMES)
def test_host_tma_against_the_oracle(variant, spy, mode, dtype, m, d):
    """Every mode through the autograd op (backend="triton") with "host_tma": loss values and the
    gradients of x, y and the scale against the float64 oracle. Ragged: M is no multiple of the
    16-row tiles and D no power of two (the descriptors' bounds cut the last tiles, and the TMA stores
    of the backward's outputs drop what lies past them). The launches took host descriptors."""
    variant("host_tma")
    x, y, bank, scale, flags = make_case(mode, m, d, dtype)
    got, want = run_both("triton", x, y, bank, scale, flags)
    for name, a, b in zip(("lse", "pos", "dx", "dy", "dscale"), got, want):
        if b is not None:
            assert_close(a, b, dtype, what=f"host_tma/{mode} {name}", scale=10)
    assert spy and all(extra["HOST_TMA"] for extra in spy.values()), spy.keys()
    bwd = "sym" if y is x and flags.y_negatives else "rows"
    stored = {"sym": ("DX_DESC", "DY_DESC"), "rows": ("DX_DESC",)}[bwd]
    assert all(spy[bwd][name] is not None for name in stored), "the backward's outputs take TMA stores"


@pytest.mark.parametrize("mode", ["simclr", "moco", "bank+batch"])
def test_host_tma_unequal_tiles(monkeypatch, variant, mode):
    """The interpreter's tiles with BLOCK_M = 32 ≠ BLOCK_N = 16, so that a descriptor whose block took
    the wrong one of the two (DESCRIPTORS, the pre_hook) cannot load or store its tile: every kernel
    of the host form (forward, "sym" or "rows", and "dy" for dy alone) against the torch backend."""
    monkeypatch.setattr(T, "INTERPRET_CONFIG", triton_config(32, 16))
    T._tuned.cache_clear()
    try:
        variant("host_tma")
        x, y, bank, scale, flags = make_case(mode, 45, 24, torch.bfloat16)
        assert_matches_torch(run(x, y, bank, scale, flags), x, y, bank, scale, flags, f"host_tma 32x16/{mode}")
        if y is not x:
            dy_only = flags._replace(needs_dx=False)
            assert_matches_torch(run(x, y, bank, scale, dy_only), x, y, bank, scale, dy_only, f"dy pass/{mode}")
    finally:
        T._tuned.cache_clear()


def triton_config(block_m, block_n):
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
