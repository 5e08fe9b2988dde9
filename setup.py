"""Build script for polarprune_cuda.

Installs the pure-Python package (``polarprune_cuda`` plus the Triton kernels
in ``kernels/`` as ``polarprune_cuda.kernels``). The CUDA extension
(``polarprune_cuda._C`` from ``csrc/``) is optional and never makes a plain
install fail.

    pip install --no-build-isolation -e ".[dev]"
"""
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "polarprune_cuda" / "__init__.py").read_text(), re.M)[1]

setup(
    name="polarprune_cuda",
    version=VERSION,
    description="One-pass structured pruning for PyTorch CNNs with learned binary channel gates",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["polarprune_cuda", "polarprune_cuda.kernels"],
    package_dir={"polarprune_cuda": "polarprune_cuda", "polarprune_cuda.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "torch-pruning>=1.5,<2",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tqdm>=4.66",
    ],
    entry_points={"console_scripts": ["polarprune = polarprune_cuda.cli:main"]},
    extras_require={
        "triton": ["triton>=3.1"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "ninja>=1.11",
            "pybind11>=2.12",
            "torchvision>=0.21",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
