"""Builds r1mega._C: the CPU kernels always, the CUDA kernels where torch has CUDA and nvcc is found.

`DEBUG=1` builds without optimisation and with debug symbols.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def kernels_extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-march=native"] if os.environ.get("R1MEGA_NATIVE") == "1" else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("R1MEGA_CPU_ONLY") != "1"
    if not with_cuda:
        return CppExtension("r1mega._C", sources, extra_compile_args={"cxx": cxx + ["-fopenmp"]}, extra_link_args=["-fopenmp"])
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
    return CUDAExtension(
        "r1mega._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx + ["-fopenmp"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[kernels_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
