"""Finding the CUDA extension `fastssl._C`: prebuilt by setup.py, else built on first use.

Order: (1) `import fastssl._C` (built by ``pip install`` when a CUDA toolkit and a CUDA build of
torch were present, or with ``FASTSSL_BUILD_CUDA=1``); (2) a just-in-time build of csrc/ with
``torch.utils.cpp_extension.load`` (ninja), cached by torch under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``) so only the first use compiles (about a minute or two).
When kernel objects for this GPU's arch were compiled ahead of time (``python -m
fastssl.kernels.cuda.prebuild``, on any machine with nvcc; ``FASTSSL_CSRC_OBJECTS`` or
``build/csrc`` of the checkout), the JIT build compiles only bindings.cpp and links them.
csrc/pairwise_lse_sm90.cu and csrc/frobenius_sm90.cu (wgmma, TMA) are compiled only for sm_90, as sm_90a:
by prebuild.py, or by a just-in-time build for a single arch 90; bindings.cpp exposes their launchers
only when they are linked.
The JIT build needs a CUDA GPU, a CUDA build of torch, nvcc and the csrc/ sources (a source
checkout or editable install); ``FASTSSL_CUDA_JIT=0`` turns it off. Whatever fails is remembered
and reported by :func:`unavailable_reason`, so ``backend="cuda"`` can say why it cannot run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch

#: The portable kernel sources (every arch), in the order setup.py compiles them.
SOURCES = ("bindings.cpp", "pairwise_lse.cu", "frobenius.cu", "worst_pair.cu", "pairwise_sigmoid.cu",
           "pairwise_max.cu", "pairwise_lse_pipelined.cu")
#: Sources built for one architecture only, as its arch-specific variant (wgmma and TMA need sm_90a):
#: prebuild.py and the JIT loader build them, setup.py's one multi-arch flag set cannot. Linking one
#: defines BINDINGS_DEFINES[source] in bindings.cpp, which then exposes its launchers.
ARCH_SPECIFIC_SOURCES = {"pairwise_lse_sm90.cu": "90", "frobenius_sm90.cu": "90"}
BINDINGS_DEFINES = {"pairwise_lse_sm90.cu": "-DFASTSSL_WITH_SM90", "frobenius_sm90.cu": "-DFASTSSL_WITH_SM90"}
#: The torch-free kernel sources, which nvcc can compile ahead of time (prebuild.py).
KERNEL_SOURCES = (*(s for s in SOURCES if s.endswith(".cu")), *ARCH_SPECIFIC_SOURCES)
CSRC = Path(__file__).resolve().parents[3] / "csrc"
#: Where prebuild.py puts kernel objects by default: <checkout>/build/csrc/sm_<arch>/<name>.o.
OBJECTS_DIR = CSRC.parent / "build" / "csrc"

_reason: Optional[str] = None


def _archs() -> list[str]:
    # The GPU we are on (a JIT build is for this machine only); FASTSSL_CUDA_ARCH_LIST overrides.
    archs = os.environ.get("FASTSSL_CUDA_ARCH_LIST")
    if archs is None:
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    return [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]


def kernel_sources_for(arch: str) -> tuple[str, ...]:
    """The kernel sources compiled for sm_<arch>: the portable ones and that arch's own."""
    return tuple(s for s in KERNEL_SOURCES if ARCH_SPECIFIC_SOURCES.get(s, arch) == arch)


def gencode_flag(arch: str, arch_specific: bool = False) -> str:
    """nvcc's -gencode for sm_<arch>, or for its arch-specific variant (sm_90a) when a source needs it."""
    target = f"{arch}a" if arch_specific else arch
    return f"-gencode=arch=compute_{target},code=sm_{target}"


def _jit_sources(archs: list[str]) -> tuple[str, ...]:
    # One set of nvcc flags covers every .cu of a JIT build, so an arch-specific source joins only a
    # single-arch build for its arch, which then compiles every file for that arch's variant.
    if len(archs) == 1:
        return kernel_sources_for(archs[0])
    return tuple(s for s in KERNEL_SOURCES if s not in ARCH_SPECIFIC_SOURCES)


def _arch_flags(sources: tuple[str, ...]) -> list[str]:
    arch_specific = any(s in ARCH_SPECIFIC_SOURCES for s in sources)
    return [gencode_flag(arch, arch_specific) for arch in _archs()]


def bindings_defines(sources: list[str]) -> list[str]:
    """The -D flags bindings.cpp needs for the arch-specific kernel sources (or objects) linked with it."""
    found = (BINDINGS_DEFINES.get(Path(s).stem + ".cu") for s in sources)
    return list(dict.fromkeys(d for d in found if d))  # each once, in order


def prebuilt_objects(archs: list[str], root: Optional[Path] = None) -> Optional[list[Path]]:
    """Up-to-date kernel objects for exactly one arch under `root` (FASTSSL_CSRC_OBJECTS, else
    build/csrc), or None: then the JIT build compiles the .cu files itself."""
    root = Path(os.environ.get("FASTSSL_CSRC_OBJECTS", OBJECTS_DIR)) if root is None else root
    if len(archs) != 1:
        return None
    sources = kernel_sources_for(archs[0])
    objects = [root / f"sm_{archs[0]}" / (Path(s).stem + ".o") for s in sources]
    newest_source = max(p.stat().st_mtime for p in [*(CSRC / s for s in sources), *CSRC.glob("*.h"),
                                                      *CSRC.glob("*.cuh")])  # fmt: skip
    if not all(o.is_file() and o.stat().st_mtime >= newest_source for o in objects):
        return None
    return objects


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    missing = [s for s in (*SOURCES, *ARCH_SPECIFIC_SOURCES) if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(f"the csrc/ sources are not installed ({', '.join(missing)} missing under {CSRC})")
    if shutil.which("nvcc") is None and cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    print(
        "fastssl: building the CUDA extension from csrc/ (first use only; about a minute or two, "
        "cached by torch.utils.cpp_extension) ...",
        file=sys.stderr,
        flush=True,
    )
    objects = prebuilt_objects(_archs())
    if objects is not None:
        # Only the torch glue is compiled here; the name carries the objects' identity, so a rebuilt
        # object is never shadowed by torch's cache of an older link.
        stamp = hashlib.sha1("".join(f"{o}:{o.stat().st_mtime_ns}" for o in objects).encode()).hexdigest()[:10]
        return cpp_extension.load(
            name=f"fastssl_C_{stamp}",
            sources=[str(CSRC / "bindings.cpp")],
            extra_cflags=["-O3", *bindings_defines([o.name for o in objects])],
            extra_ldflags=[str(o) for o in objects],
            extra_include_paths=[str(CSRC)],
            with_cuda=True,
            verbose=os.environ.get("FASTSSL_CUDA_VERBOSE", "0") not in ("", "0"),
        )
    sources = _jit_sources(_archs())
    return cpp_extension.load(
        name="fastssl_C",
        sources=[str(CSRC / s) for s in ("bindings.cpp", *sources)],
        extra_cflags=["-O3", *bindings_defines(list(sources))],
        extra_cuda_cflags=["-O3", "-lineinfo", *_arch_flags(sources)],
        extra_include_paths=[str(CSRC)],
        verbose=os.environ.get("FASTSSL_CUDA_VERBOSE", "0") not in ("", "0"),
    )


@functools.lru_cache(maxsize=None)
def load() -> Optional[ModuleType]:
    """The extension module, or None (then :func:`unavailable_reason` says why). Cached."""
    global _reason
    if torch.version.cuda is None:
        _reason = f"torch {torch.__version__} is a CPU-only build"
        return None
    try:
        from fastssl import _C  # type: ignore[attr-defined]

        return _C
    except ImportError as exc:
        prebuilt_error = str(exc)
    if not torch.cuda.is_available():
        _reason = "no CUDA GPU is visible and fastssl._C was not prebuilt"
        return None
    if os.environ.get("FASTSSL_CUDA_JIT", "1") in ("", "0"):
        _reason = f"fastssl._C is not built ({prebuilt_error}) and FASTSSL_CUDA_JIT=0 forbids building it now"
        return None
    try:
        return _jit_build()
    except Exception as exc:  # noqa: BLE001 -- any build failure means "no cuda backend", with its reason
        _reason = f"fastssl._C is not built and the just-in-time build failed: {exc}"
        return None


def available() -> bool:
    """Whether the `cuda` backend can run (loads or builds the extension on first call)."""
    return load() is not None


def unavailable_reason() -> str:
    """Why :func:`load` returned None ("" when the extension is loaded)."""
    return "" if load() is not None else (_reason or "unknown")


def extension() -> ModuleType:
    """The loaded extension, or a RuntimeError saying why there is none."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"the fastssl CUDA extension is unavailable: {_reason}")
    return mod


#: Set to 1 to run the sm_90a kernels (csrc/*_sm90.cu) on sm_90 devices (csrc/README.md).
SM90_ENV = "FASTSSL_CUDA_SM90"
#: Set to 1 to run csrc/pairwise_lse_pipelined.cu on sm_80+ devices (csrc/README.md).
PIPELINE_ENV = "FASTSSL_CUDA_PIPELINE"


def launcher(ext: ModuleType, capability: tuple[int, int], name: str) -> Optional[Callable[..., Any]]:
    """The launcher the extension's op `name` (e.g. "pairwise_lse_forward") runs on a device of compute
    `capability`, read from the opt-in variables on every call: `name`_sm90 on sm_90 with
    FASTSSL_CUDA_SM90=1 (it falls back to the sm_80 kernels itself, per gradient, for inputs TMA
    cannot read); else `name`_pipelined on sm_80+ with FASTSSL_CUDA_PIPELINE=1 where the extension
    has one (it falls back to the default kernels itself for inputs it cannot take); else `name`.
    None when none of these exists (an op whose default route is not in csrc, e.g. the Frobenius GEMMs
    in cuBLAS)."""
    if os.environ.get(SM90_ENV, "0") == "1" and capability == (9, 0):
        if not hasattr(ext, f"{name}_sm90"):
            raise RuntimeError(
                f"{SM90_ENV}=1 but this fastssl._C was built without the sm_90a kernels (csrc/*_sm90.cu: compiled "
                "for a single-arch 9.0 build: the just-in-time build on the GPU, or python -m "
                f"fastssl.kernels.cuda.prebuild --arch 90); unset {SM90_ENV} to use the default kernels"
            )
        return getattr(ext, f"{name}_sm90")
    if os.environ.get(PIPELINE_ENV, "0") == "1" and capability >= (8, 0) and hasattr(ext, f"{name}_pipelined"):
        return getattr(ext, f"{name}_pipelined")
    return getattr(ext, name, None)
