"""Input checks shared by the public API: clear TypeError/ValueError messages that name the argument
and the shapes, raised before anything reaches a kernel.

Checks read only metadata (shape, dtype, device), so they cost no host sync and trace cleanly under
`torch.compile`. Checking values (non-finite inputs, a tensor temperature ≤ 0) needs a sync; it runs
for Python numbers always, and for tensors only when FASTSSL_CHECK_FINITE=1.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Iterable
from typing import Union

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Temperature = Union[float, Tensor]


def _check_values() -> bool:
    return os.environ.get("FASTSSL_CHECK_FINITE", "0") not in ("", "0")


def check_embeddings(name: str, t: object, *, ndim: int = 2, min_rows: int = 2) -> Tensor:
    """A floating (rows, D) tensor with at least `min_rows` rows and D ≥ 1."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype} (shape {tuple(t.shape)})"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got shape {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} needs an embedding dimension D ≥ 1, got shape {tuple(t.shape)}")
    if _check_values() and not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} (shape {tuple(t.shape)}) contains NaN or inf")
    return t


def check_same(name_a: str, a: Tensor, name_b: str, b: Tensor, *, dims: str = "shape") -> None:
    """`a` and `b` agree on device, dtype and (dims="shape") the whole shape or (dims="D") the last dim."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; pass both in one dtype")
    if dims == "shape" and a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if dims == "D" and a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same embedding dimension, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_positive(name: str, value: Temperature) -> None:
    """A positive, finite float or a positive 0-dim/1-element floating tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 1-element floating tensor, got {value.dtype} of shape {tuple(value.shape)}")
        if _check_values() and not torch.compiler.is_compiling() and not bool(value > 0):
            raise ValueError(f"{name} must be > 0, got {float(value)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def inverse_temperature(temperature: Temperature, like: Tensor) -> Tensor:
    """1/τ as a 0-dim tensor on `like`'s device (fp32, fp64 for fp64 inputs), differentiable in τ."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(temperature, Tensor):
        return 1.0 / temperature.reshape(()).to(device=like.device, dtype=dtype)
    # torch.full fills on the device: no host-to-device copy.
    return torch.full((), 1.0 / float(temperature), dtype=dtype, device=like.device)


def check_nonnegative(name: str, value: object) -> None:
    """A finite Python number ≥ 0 (a loss weight such as Barlow Twins' λ)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


# ---------------------------------------------------------------------------------------------------
# Constructor arguments of fastssl.nn: each returns the value to store, or raises naming the argument.
# ---------------------------------------------------------------------------------------------------

def _python_number(value: object) -> object:
    """A numpy real scalar (np.float32, np.int64, ...) as the Python float/int it holds; anything else as is.

    lightly's modules take numpy scalars; the checks above and the kernels take Python numbers. Bools
    stay bools, for the checks to refuse.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def positive_number(name: str, value: object) -> Temperature:
    """check_positive on `value` (a numpy scalar becomes a Python number); returns it."""
    value = _python_number(value)
    check_positive(name, value)
    return value


def nonnegative_number(name: str, value: object) -> float:
    """check_nonnegative on `value` (a numpy scalar becomes a Python number); returns it."""
    value = _python_number(value)
    check_nonnegative(name, value)
    return value


def check_flag(name: str, value: object) -> bool:
    """True or False, nothing else (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def check_optional_callable(name: str, value: object) -> object:
    """None or a callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")
    return value


def check_memory_bank_size(name: str, size: object) -> tuple:
    """lightly 1.6's memory-bank sizes, as a tuple of Python ints: 0 or (0,) (no bank), or (K, D) with
    integer entries K ≥ 0 (K = 0: no bank) and D ≥ 1 when K > 0 (lightly fails later, in the forward)."""
    expected = f"{name} must be 0 or a (K, D) pair of ints"
    if isinstance(size, bool):
        raise TypeError(f"{expected}, got bool")
    if isinstance(size, int):  # lightly's test; a numpy integer is not a size there either
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
        if size > 0:
            raise ValueError(f"{name}={size} does not give the embedding dimension: pass {name}=({size}, D), "
                             f"or 0 to disable the memory bank (as in lightly 1.6)")
        return (0,)
    if isinstance(size, (str, bytes)) or not isinstance(size, Iterable):
        raise TypeError(f"{expected}, got {type(size).__name__}")
    entries = tuple(size)
    for entry in entries:
        if isinstance(entry, bool) or not hasattr(type(entry), "__index__"):
            raise TypeError(f"{expected}, got {entries!r} (an entry of type {type(entry).__name__})")
    ints = tuple(operator.index(entry) for entry in entries)
    if any(v < 0 for v in ints):
        raise ValueError(f"{name} entries must be >= 0, got {ints}")
    if ints == (0,):
        return ints
    if len(ints) != 2:
        raise ValueError(f"{expected}, got {len(ints)} entries {ints}")
    if ints[0] > 0 and ints[1] < 1:
        raise ValueError(f"{name}={ints}: the embedding dimension D must be >= 1 for a bank of K = {ints[0]} rows")
    return ints
