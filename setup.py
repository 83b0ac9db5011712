"""Builds torch_spatialnorm._C: the CPU kernels always, the CUDA kernels where a toolkit is found."""

import glob
import os
import shutil
import subprocess
import sys
import warnings

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def wants_cuda() -> bool:
    forced = os.environ.get("TORCH_SPATIALNORM_CUDA")
    if forced is not None:
        return forced == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None


def openmp_prefix():
    """Where omp.h is on macOS, as PyTorch's own C++ builder looks for it: $OMP_PREFIX, a conda
    environment's llvm-openmp, Homebrew's libomp; None where none has it."""
    candidates = [os.environ.get("OMP_PREFIX"), os.environ.get("CONDA_PREFIX")]
    if shutil.which("brew"):
        brew = subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True)
        candidates.append(brew.stdout.strip() if brew.returncode == 0 else None)
    return next((c for c in candidates if c and os.path.exists(os.path.join(c, "include", "omp.h"))), None)


def openmp_flags(platform=sys.platform):
    """Compile and link flags that make at::parallel_for run in parallel in this extension.

    PyTorch's CPU builds run at::parallel_for through OpenMP, and its parallel version is a template
    compiled into the extension itself (ATen/ParallelOpenMP.h): without OpenMP the loop runs on one
    thread. Linux: GCC's -fopenmp (libgomp, which torch ships). macOS: Apple clang takes OpenMP
    through -Xclang -fopenmp with omp.h from libomp, linked against the libomp.dylib that torch's
    wheels carry in torch/lib, so that one OpenMP runtime serves both.
    """
    if platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    if platform == "darwin":
        prefix = openmp_prefix()
        if prefix is None:
            warnings.warn(
                "omp.h not found (brew install libomp, or set OMP_PREFIX): the CPU kernels are built "
                "without OpenMP and run on one thread"
            )
            return [], []
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        lib = torch_lib if os.path.exists(os.path.join(torch_lib, "libomp.dylib")) else os.path.join(prefix, "lib")
        return ["-Xclang", "-fopenmp", f"-I{os.path.join(prefix, 'include')}"], [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]
    return [], []


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The kernels' loops vectorize only without math errno and FP trapping semantics (x86-64 builds
    # add AVX2 and AVX-512 clones in the source; arm64's NEON is its baseline).
    compile_flags, link_flags = openmp_flags()
    # -g0: Python's build flags ask for debug information, which costs a third of the kernels'
    # compile time and most of the library's size.
    cxx_flags = ["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math", *compile_flags]  # the C++ standard is torch's choice
    if wants_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "-lineinfo"]
        return CUDAExtension(
            "torch_spatialnorm._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return CppExtension(
        "torch_spatialnorm._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


if __name__ == "__main__":  # as setuptools runs it; tests import the flags above
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
