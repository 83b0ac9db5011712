"""Builds torch_spatialnorm._C: the CPU kernels always, the CUDA kernels where a toolkit is found."""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def wants_cuda() -> bool:
    forced = os.environ.get("TORCH_SPATIALNORM_CUDA")
    if forced is not None:
        return forced == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The kernels' loops vectorize only without math errno and FP trapping semantics; at::parallel_for
    # runs serially in code built without OpenMP.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # the C++ standard is torch's choice
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
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


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
