"""Build of kdfast and its compiled extension ``kdfast._C``.

The extension is built against the PyTorch that is already installed, so install with
``pip install --no-build-isolation -e .`` (the Makefile does this inside ``.venv``).
The Triton kernels live in the top-level ``kernels/`` folder and are installed as the
subpackage ``kdfast.kernels``.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "kdfast compiles against the PyTorch you have installed: install torch first "
        "(pip install torch==2.13.0) and then kdfast with `pip install --no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_arch_flags():
    """Vector ISA flags for the C++ kernels: AVX2/FMA/F16C when the build machine has them.

    The extension is compiled on the machine that runs it (pip install from source), like
    -march=native but limited to x86-64-v3, which every recent x86 server has. Set
    KDFAST_CPU_FLAGS to override (e.g. KDFAST_CPU_FLAGS="" for a portable baseline build).
    """
    if "KDFAST_CPU_FLAGS" in os.environ:
        return os.environ["KDFAST_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


def cpu_extension():
    """The C++ operators (every csrc/*.cpp), parallel over rows through ATen's OpenMP pool."""
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    return CppExtension(
        name="kdfast._C",
        sources=sources,
        # -fno-trapping-math -fno-math-errno (as PyTorch itself is built) let the compiler
        # vectorize the kernels' branch-free exp and their selects.
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]
        + cpu_arch_flags(),
        extra_link_args=["-fopenmp"],
    )


setup(
    name="kdfast",
    version="0.1.0",
    description="Fused knowledge-distillation losses, soft ranks and res-students for PyTorch",
    python_requires=">=3.10",
    packages=["kdfast", "kdfast.kernels"],
    package_dir={"kdfast": "kdfast", "kdfast.kernels": "kernels"},
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # torch is deliberately not listed: the extension is compiled against the torch that
    # is installed at build time, and an unpinned requirement would let pip replace it.
)
