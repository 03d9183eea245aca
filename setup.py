"""Build of kdfast and its compiled extensions.

* ``kdfast._C``: the C++ operators (csrc/*.cpp), registered as ``torch.ops.kdfast.*``.
  Built against the PyTorch that is already installed, so install with
  ``pip install --no-build-isolation -e .`` (the Makefile does this inside ``.venv``).
* ``kdfast._C_cuda``: the CUDA kernels (csrc/cuda/*.cu), compiled by ``nvcc`` whenever it
  is found, also on a machine whose PyTorch is CPU-only (so a CUDA compile error fails
  the build there too). They are plain CUDA C++ behind launchers that take device
  pointers, sizes and a stream, bound with pybind11: no PyTorch CUDA header is needed.
  ``KDFAST_CUDA=0`` skips them, ``KDFAST_CUDA=1`` makes a missing nvcc an error;
  ``KDFAST_CUDA_ARCHS`` (default "80;90") lists the GPU architectures.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the
subpackage ``kdfast.kernels``.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

try:
    import pybind11
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:
    sys.exit(
        f"kdfast compiles against the PyTorch and pybind11 you have installed ({error}): install them first "
        "(pip install torch==2.13.0 pybind11) and then kdfast with `pip install --no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cpu_arch_flags():
    """Vector ISA flags for the C++ kernels, from what the build machine offers.

    The extension is compiled on the machine that runs it (pip install from source), like
    -march=native but limited to the x86-64 levels v4 (AVX-512) and v3 (AVX2/FMA), which
    recent x86 servers have. Set KDFAST_CPU_FLAGS to override (e.g. KDFAST_CPU_FLAGS=""
    for a portable baseline build).
    """
    if "KDFAST_CPU_FLAGS" in os.environ:
        return os.environ["KDFAST_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    except OSError:
        return []
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"} <= flags:
        return ["-march=x86-64-v4"]
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return ["-march=x86-64-v3"]
    return []


def cpu_extension():
    """The C++ operators (every csrc/*.cpp), parallel over rows through ATen's OpenMP pool."""
    return CppExtension(
        name="kdfast._C",
        sources=sources("csrc/*.cpp"),
        # -fno-trapping-math -fno-math-errno (as PyTorch itself is built) let the compiler
        # vectorize the kernels' branch-free exp and their selects.
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]
        + cpu_arch_flags(),
        extra_link_args=["-fopenmp"],
    )


def find_nvcc():
    """nvcc from $CUDA_HOME, $CUDA_PATH or PATH; None when it is absent or KDFAST_CUDA=0."""
    mode = os.environ.get("KDFAST_CUDA", "auto")
    if mode not in ("0", "1", "auto"):
        sys.exit(f"KDFAST_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc is None and mode == "1":
        sys.exit("KDFAST_CUDA=1 but nvcc was found neither in $CUDA_HOME, $CUDA_PATH nor on PATH")
    return nvcc


def cuda_home(nvcc):
    """The toolkit holding nvcc (resolving wrapper scripts such as /usr/local/bin/nvcc)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    if "release" not in out.stdout:
        sys.exit(f"{nvcc} --version did not report a CUDA release")
    for candidate in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.exists(os.path.join(candidate, "lib64", "libcudart_static.a")):
            return candidate
    sys.exit(f"found {nvcc} but no lib64/libcudart_static.a beside it; set CUDA_HOME to the toolkit")


def cuda_extension(nvcc):
    home = cuda_home(nvcc)
    extension = Extension(
        name="kdfast._C_cuda",
        sources=sources("csrc/cuda/*.cpp"),
        include_dirs=[pybind11.get_include(), os.path.join(HERE, "csrc")],
        extra_compile_args=["-O3", "-std=c++17"],
        # The runtime is linked statically: the module does not depend on which libcudart
        # (if any) the installed PyTorch ships.
        extra_link_args=[f"-L{os.path.join(home, 'lib64')}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"],
        language="c++",
    )
    extension.cuda_sources = sources("csrc/cuda/*.cu")
    extension.nvcc = nvcc
    return extension


class BuildWithNvcc(BuildExtension):
    """PyTorch's build_ext, plus: compile an extension's `cuda_sources` with nvcc first."""

    def build_extension(self, ext):
        for source in getattr(ext, "cuda_sources", []):
            obj = os.path.join(self.build_temp, "nvcc", os.path.splitext(source)[0] + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            archs = os.environ.get("KDFAST_CUDA_ARCHS", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
            # --threads 0: the architectures compile in parallel, one per CPU.
            command = [ext.nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "--threads", "0", "-Xcompiler", "-fPIC",
                       f"-I{os.path.join(HERE, 'csrc')}", *gencode]
            print(" ".join(command))
            subprocess.run(command, check=True, cwd=HERE)
            ext.extra_objects = [*getattr(ext, "extra_objects", []), obj]
        super().build_extension(ext)


extensions = [cpu_extension()]
NVCC = find_nvcc()
if NVCC is not None:
    extensions.append(cuda_extension(NVCC))

setup(
    name="kdfast",
    version="0.1.0",
    description="Fused knowledge-distillation losses, soft ranks and res-students for PyTorch",
    python_requires=">=3.10",
    packages=["kdfast", "kdfast.cache", "kdfast.data", "kdfast.kernels"],
    package_dir={"kdfast": "kdfast", "kdfast.kernels": "kernels"},
    package_data={"kdfast": ["backend_choice.json"]},
    entry_points={"console_scripts": ["kdfast=kdfast.cli:main"]},
    ext_modules=extensions,
    cmdclass={"build_ext": BuildWithNvcc.with_options(use_ninja=True)},
    # torch is deliberately not listed: the extension is compiled against the torch that
    # is installed at build time, and an unpinned requirement would let pip replace it.
)
