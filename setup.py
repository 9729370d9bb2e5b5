"""Install fastssl.

The pure-Python package (Triton kernels, torch fallback, reference) always installs. The optional
CUDA C++ extension `fastssl._C` (csrc/: the `cuda` backend) is compiled when a CUDA toolkit (nvcc)
and a CUDA build of torch are importable at build time; otherwise the install goes on without it and
says once why (the backend can then still be built on first use, fastssl/kernels/cuda/_ext.py).

Environment:
  FASTSSL_BUILD_CUDA=1     build the extension, and fail if it cannot be built
  FASTSSL_BUILD_CUDA=0     never build it
  (unset)                  build it when possible
  FASTSSL_CUDA_ARCH_LIST   GPU architectures, default "8.0;9.0" (sm_80 and sm_90)

torch must be importable by the build: with pip use ``pip install --no-build-isolation -e .``
(pip's isolated build environment has no torch, so the default install skips the extension).
"""

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "fastssl" / "__init__.py").read_text(), re.M).group(1)
CSRC_SOURCES = ["csrc/bindings.cpp", "csrc/pairwise_lse.cu", "csrc/frobenius.cu", "csrc/worst_pair.cu",
                "csrc/pairwise_sigmoid.cu", "csrc/pairwise_max.cu", "csrc/pairwise_lse_pipelined.cu"]


def _gencode_flags(arch_list: str) -> list:
    flags = []
    for arch in arch_list.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _skip(reason: str, forced: bool) -> tuple:
    if forced:
        sys.exit(f"fastssl: FASTSSL_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    # setup.py may run several times in one process (egg_info, build): say it once.
    if not os.environ.get("_FASTSSL_SKIP_SAID"):
        os.environ["_FASTSSL_SKIP_SAID"] = "1"
        print(f"fastssl: skipping the CUDA extension fastssl._C ({reason}); the pure-Python package installs.")
    return [], {}


def cuda_extension() -> tuple:
    """([CUDAExtension] or [], cmdclass), deciding from FASTSSL_BUILD_CUDA and what is installed."""
    mode = os.environ.get("FASTSSL_BUILD_CUDA", "").strip()
    forced = mode == "1"
    if mode == "0":
        return _skip("FASTSSL_BUILD_CUDA=0", False)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable by this build (pip's build isolation? use --no-build-isolation)", forced)
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build", forced)
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)", forced)
    missing = [s for s in CSRC_SOURCES if not (ROOT / s).is_file()]
    if missing:
        return _skip(f"csrc sources missing: {', '.join(missing)}", forced)
    arch_flags = _gencode_flags(os.environ.get("FASTSSL_CUDA_ARCH_LIST", "8.0;9.0"))
    ext = CUDAExtension(
        name="fastssl._C",
        sources=CSRC_SOURCES,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *arch_flags]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fastssl",
    version=VERSION,
    description="Fused Triton/CUDA kernels for self-supervised-learning losses, as autograd-aware torch ops",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["fastssl", "fastssl.*"]),
    package_data={"fastssl": ["py.typed", "auto_gpu_table.json", "train/assets/*.npz"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.2", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib"],
        "plot": ["matplotlib"],
        "images": ["pillow"],  # the trainer's --dataset folder
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
