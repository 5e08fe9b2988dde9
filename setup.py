"""Build script for polarprune_cuda.

The metadata, packages and dependencies are in ``pyproject.toml``; this file
adds the CUDA extension ``polarprune_cuda._C``, compiled from ``csrc/`` where
torch is a CUDA build and nvcc is found. A failed or impossible build never fails the install
(``POLARPRUNE_REQUIRE_EXT=1`` makes it an error; ``POLARPRUNE_NO_EXT=1`` skips it).

    pip install --no-build-isolation -e ".[dev]"
    pip install --no-index --no-build-isolation -e .     # a machine without a network (the GPU campaign)

Environment: ``CUDA_HOME`` (else found from nvcc's real path, wrapper scripts
included), ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``), ``MAX_JOBS``
(default: the machine's cores), ``POLARPRUNE_PTXAS_VERBOSE=1`` (print ptxas'
register and spill report).
"""
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0+PTX"
BUILD_INFO = ROOT / "polarprune_cuda" / "_build_info.json"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """CUDA_HOME or CUDA_PATH, else the toolkit behind nvcc (following links and wrapper scripts)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(8192)
            if head.startswith(b"#!"):
                candidates += [m.decode() for m in re.findall(rb"(/[^\s\"']+)/bin/nvcc", head)]
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if (os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))
                and os.path.isfile(os.path.join(c, "bin", "nvcc"))):
            return c
    return None


def extension_setup():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with the reason printed."""
    if _flag("POLARPRUNE_NO_EXT"):
        print("polarprune_cuda: POLARPRUNE_NO_EXT set, installing pure Python", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError:
        reason = "torch is not installed in the build environment (use --no-build-isolation)"
        torch = None
    else:
        cuda_home = find_cuda_home()
        reason = None if torch.version.cuda and cuda_home else (
            "torch is not a CUDA build" if not torch.version.cuda else "nvcc / the CUDA toolkit was not found")
    if reason:
        if _flag("POLARPRUNE_REQUIRE_EXT"):
            raise RuntimeError(f"POLARPRUNE_REQUIRE_EXT=1 but the CUDA extension cannot be built: {reason}")
        print(f"polarprune_cuda: not building the CUDA extension ({reason}); installing pure Python", file=sys.stderr)
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if _flag("POLARPRUNE_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    ext = CUDAExtension(
        "polarprune_cuda._C",
        # one .cu per op (distinct basenames: the objects share one build folder)
        sources=["csrc/registration.cpp", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors, missing headers, ...
                if _flag("POLARPRUNE_REQUIRE_EXT"):
                    raise
                warnings.warn(f"polarprune_cuda: building the CUDA extension failed ({exc}); installing pure "
                              "Python. Set POLARPRUNE_REQUIRE_EXT=1 to make this an error.")
                return
            BUILD_INFO.write_text(json.dumps({
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "cuda_home": cuda_home,
                "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
            }, indent=1))

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_setup()

# The metadata, the packages (kernels/ installed as polarprune_cuda.kernels) and the dependencies live in
# pyproject.toml; this file adds the optional extension only.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
