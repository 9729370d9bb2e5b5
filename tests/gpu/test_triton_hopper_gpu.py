"""The opt-in Hopper variants (`HopperVariant`) on a GPU with TMA (sm_90 or later): values and
gradients against the float64 oracle, as tests/gpu/test_triton_gpu.py checks today's kernels, at
sizes the interpreter is too slow for; and the launch really takes the descriptors.

Each kernel runs in one pinned config (PINNED_CONFIGS: the first that pruning keeps) so that a short
GPU session compiles a few kernels per variant instead of autotuning every list. Marked `cuda`:
skipped, with the reason, without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastssl.kernels.triton import pairwise_lse as K
from tests.backends.test_pairwise_lse import make_case, run_both
from tests.utils import assert_close

pytestmark = pytest.mark.cuda

OUTPUTS = ("lse", "pos", "dx", "dy", "dscale")


def _has_tma() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def pinned(monkeypatch):
    """One config per kernel, the first that pruning keeps for these tiles on this GPU."""

    def pin(d, dtype):
        block_k, single_k, block_dout = K.tile_dims(d, dtype)
        limit = K.device_smem_limit(torch.cuda.current_device())
        configs = {kind: K.candidate_configs(kind, dtype.itemsize, block_k, single_k, block_dout, limit)[0]
                   for kind in ("fwd", "rows", "sym", "dy")}  # fmt: skip
        configs["weights"] = K.candidate_configs("weights", dtype.itemsize, K.blocked_block_k(d, dtype), False, 0,
                                                 limit)[0]  # fmt: skip
        monkeypatch.setattr(K, "PINNED_CONFIGS", configs)

    return pin


@pytest.mark.skipif(not _has_tma(), reason="TMA needs an sm_90 or later GPU")
@pytest.mark.parametrize("m,d", [(1000, 128), (300, 256), (300, 520)])
@pytest.mark.parametrize("mode", ["simclr", "clip", "moco"])
@pytest.mark.parametrize("variant", ["tma", "tma,pipeline", "host_tma", "host_tma,pipeline"])
def test_variant_against_the_oracle(monkeypatch, pinned, variant, mode, m, d):
    """bf16 NT-Xent-, CLIP- and MoCo-shaped calls: resident D (the fused backward), and D = 520 (the
    forward's D loop through descriptors, the blocked backward). "host_tma": descriptors built on the
    host, the fused backward's dx and dy written by TMA stores."""
    pinned(d, torch.bfloat16)
    monkeypatch.setattr(K, "HOPPER_VARIANT", K.parse_hopper_variant(variant))
    x, y, bank, scale, options = make_case(mode, m, d, torch.bfloat16, device="cuda")
    extra = K.variant_kernel("fwd", (x, y, bank))[1]
    assert extra["TMA"], "contiguous bf16 rows take the descriptors"
    assert extra.get("HOST_TMA", False) == ("host_tma" in variant), extra
    got, want = run_both("triton", x, y, bank, scale, options)
    for name, a, b in zip(OUTPUTS, got, want):
        if b is not None:
            assert_close(a, b, torch.bfloat16, what=f"{variant}/{mode} {name} at M={m}, D={d}", scale=10)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 70), (torch.float32, 128), (torch.bfloat16, 70),
                                     (torch.bfloat16, 200)])  # fmt: skip
def test_forward_configs_where_todays_spilled(dtype, d):
    """fp32 and element-wise-loaded half-precision rows run the forward in `forward_configs`' lists
    (autotuned, no variant set): values and gradients against the oracle."""
    x, y, bank, scale, options = make_case("clip", 300, d, dtype, device="cuda")
    assert K.forward_configs(x, y) is not None
    got, want = run_both("triton", x, y, bank, scale, options)
    for name, a, b in zip(OUTPUTS, got, want):
        if b is not None:
            assert_close(a, b, dtype, what=f"clip {name} at D={d}, {dtype}", scale=1 if dtype == torch.float32 else 10)


@pytest.mark.skipif(not _has_tma(), reason="TMA needs an sm_90 or later GPU")
@pytest.mark.parametrize("mode", ["simclr", "clip"])
def test_host_tma_without_an_allocator(monkeypatch, pinned, mode):
    """"host_tma" runs with Triton's default (null) global-scratch allocator in place, which a
    device-side descriptor could not: values and gradients against the oracle, ragged M and D."""
    import triton
    from triton.runtime import _allocation

    pinned(200, torch.bfloat16)
    monkeypatch.setattr(K, "HOPPER_VARIANT", K.parse_hopper_variant("host_tma"))
    monkeypatch.setattr(K, "_ensure_tma_allocator", lambda: pytest.fail("host_tma installed an allocator"))
    previous = _allocation._allocator.get()
    triton.set_allocator(_allocation.NullAllocator())
    try:
        x, y, bank, scale, options = make_case(mode, 777, 200, torch.bfloat16, device="cuda")
        got, want = run_both("triton", x, y, bank, scale, options)
    finally:
        triton.set_allocator(previous)
    for name, a, b in zip(OUTPUTS, got, want):
        if b is not None:
            assert_close(a, b, torch.bfloat16, what=f"host_tma/{mode} {name} without an allocator", scale=10)
