"""Shared test helpers: the tolerance table (the one place tolerances live), inputs, comparisons."""

from __future__ import annotations

import importlib.util

import torch

from fastssl.backends import available_backends

#: (rtol, atol) of a backend's value or gradient against the float64 spec, per input dtype.
#: fp32: accumulation-order noise only. bf16/fp16: the inputs are exact in the spec (it upcasts), so
#: the error is the kernel's rounding of normalised rows and of gradients to the input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-4, 1e-6),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}

#: Backends that run on CPU tensors here ("triton" only under TRITON_INTERPRET=1).
CPU_BACKENDS = [b for b in ("torch", "triton") if b in available_backends()]

LIGHTLY_AVAILABLE = importlib.util.find_spec("lightly") is not None


def assert_close(actual, expected, dtype, what="value", scale=1.0):
    """torch.testing.assert_close with the table's tolerance for `dtype`, a readable message.

    `scale` multiplies atol, for quantities whose magnitude is known to be large (e.g. 1/τ).
    """
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol * scale,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )
