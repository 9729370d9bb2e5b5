"""Install fastssl.

The pure-Python package (Triton kernels, torch fallback, reference) always installs. The optional
CUDA C++ extension in csrc/ arrives with the `cuda` backend issue; until then nothing is compiled.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "fastssl" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="fastssl",
    version=VERSION,
    description="Fused Triton/CUDA kernels for self-supervised-learning losses, as autograd-aware torch ops",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["fastssl", "fastssl.*"]),
    package_data={"fastssl": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib"],
        "plot": ["matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
