"""Backend name → kernel module, the one dispatch rule every op family uses."""

from __future__ import annotations

import importlib
from types import ModuleType


def kernel_module(op: str, modules: dict[str, str], backend: str) -> ModuleType:
    """The kernel module of `op` for `backend` (from `modules`: backend → module path).

    Imported on first use: `import fastssl` must not import triton (nor compile anything).
    """
    if backend not in modules:
        raise ValueError(f"{op} has no backend {backend!r}; choose one of {tuple(modules)}")
    return importlib.import_module(modules[backend])
