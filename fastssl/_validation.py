"""Input checks shared by the public API: clear TypeError/ValueError messages that name the argument
and the shapes, raised before anything reaches a kernel.

Checks read only metadata (shape, dtype, device), so they cost no host sync and trace cleanly under
`torch.compile`. Values are checked where that is free: Python numbers always, and a tensor
hyper-parameter (a temperature) when it lives on the CPU. A value on a GPU would need a host sync on
every call (a learnable temperature is such a tensor), so it is checked only when
FASTSSL_CHECK_FINITE=1; without that, :func:`inverse_temperature` turns a non-positive or non-finite
device temperature into a NaN scale, so the loss is NaN — never a plausible number from a bad τ.
Embedding values (NaN/inf inputs) are checked only when FASTSSL_CHECK_FINITE=1.
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

from fastssl._common import ROUTES, compute_dtype

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


def check_pair(a: object, b: object, names: tuple[str, str] = ("z1", "z2")) -> None:
    """Two (N, D) embedding tensors of one shape, dtype and device (the two views of a batch)."""
    check_embeddings(names[0], a)
    check_embeddings(names[1], b)
    check_same(names[0], a, names[1], b)


def check_positive(name: str, value: Temperature) -> None:
    """A positive, finite float or a positive, finite 0-dim/1-element floating tensor.

    A tensor's value is read when that costs no device sync (it is on the CPU) or when
    FASTSSL_CHECK_FINITE=1; a GPU tensor is otherwise guarded by :func:`inverse_temperature`.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 1-element floating tensor, got {value.dtype} of shape {tuple(value.shape)}")
        readable = value.device.type == "cpu" or _check_values()
        if readable and not torch.compiler.is_compiling():
            number = float(value.detach().reshape(()))
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"{name} must be a finite number > 0, got a tensor holding {number}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def inverse_temperature(temperature: Temperature, like: Tensor) -> Tensor:
    """1/τ as a 0-dim tensor on `like`'s device (fp32, fp64 for fp64 inputs), differentiable in τ.

    A tensor τ that is not finite and > 0 gives NaN (without a host sync): see the module docstring.
    """
    dtype = compute_dtype(like)
    if isinstance(temperature, Tensor):
        tau = temperature.reshape(()).to(device=like.device, dtype=dtype)
        valid = torch.isfinite(tau) & (tau > 0)
        return torch.where(valid, 1.0 / tau, torch.full_like(tau, float("nan")))
    # torch.full fills on the device: no host-to-device copy.
    return torch.full((), 1.0 / float(temperature), dtype=dtype, device=like.device)


def check_nonnegative(name: str, value: object) -> None:
    """A finite Python number ≥ 0 (a loss weight such as Barlow Twins' λ)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_route(route: object) -> str:
    """`route` if it is one of the public ROUTES ("auto", "covariance", "gram"), else a ValueError."""
    if not isinstance(route, str) or route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    return route


def check_unit_interval(name: str, value: object) -> None:
    """A Python number in [0, 1] (MACL's alpha and A_0, TiCo's beta), else a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in the range [0, 1], got {value}")


def check_loss_dim(loss_dim: object) -> int:
    """DirectCLR's loss_dim: an int ≥ 1 (a loss_dim past D keeps all D, as lightly's slice does)."""
    if isinstance(loss_dim, bool) or not isinstance(loss_dim, int):
        raise TypeError(f"loss_dim must be an int, got {type(loss_dim).__name__}")
    if loss_dim < 1:
        raise ValueError(f"loss_dim must be >= 1, got {loss_dim}")
    return loss_dim


def check_norm_degree(p: object) -> None:
    """KoLeo's p: a number > 0 (inf allowed, as torch.pairwise_distance's)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"p must be a number > 0 (the norm degree of the distance), got {p!r}")


def check_finite_scalar(name: str, value: object) -> None:
    """A finite float or a 1-element floating tensor (SigLIP's bias, which may be any sign)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 1-element floating tensor, got {value.dtype} of shape {tuple(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def scalar_tensor(value: Union[float, Tensor], like: Tensor) -> Tensor:
    """`value` as a 0-dim tensor on `like`'s device (fp32, fp64 for fp64 inputs), differentiable."""
    dtype = compute_dtype(like)
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=like.device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=like.device)


def check_labels(labels: object, z: Tensor) -> Tensor:
    """labels: an integer (N,) tensor on z's device, N = z's rows."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class ids, −1 for unlabeled), got {labels.dtype} "
                        f"of shape {tuple(labels.shape)}")  # fmt: skip
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"labels must have shape (N,) = ({z.shape[0]},) for z1 of shape {tuple(z.shape)}, "
                         f"got {tuple(labels.shape)}")  # fmt: skip
    if labels.device != z.device:
        raise ValueError(f"labels is on {labels.device} but z1 is on {z.device}")
    return labels


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
