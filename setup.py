"""Build the compiled core ``cvsparse._C``.

The C++ CPU kernels are always built.  The CUDA kernels are added when a GPU is visible
or ``FORCE_CUDA=1`` is set (CI uses the latter to compile them on a machine without a GPU).
Set ``CVSPARSE_SKIP_EXT=1`` to install the pure-Python package only (the reference backend).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("CVSPARSE_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.cuda.is_available() and CUDA_HOME is not None
    )
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx_flags}
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension("cvsparse._C", sources, extra_compile_args=extra,
                            include_dirs=_cuda_include_dirs(), **kwargs)
    else:
        ext = CppExtension("cvsparse._C", sources, extra_compile_args=extra, **kwargs)
    return [ext], {"build_ext": BuildExtension}


def _cuda_include_dirs() -> list[str]:
    """Headers of the CUDA math libraries that ``ATen/cuda`` headers pull in.

    A bare toolkit may lack e.g. ``cusparse.h``; torch's pip wheels ship them under
    ``nvidia/*/include``.
    """
    import site

    dirs = []
    for base in site.getsitepackages():
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return [d for d in dirs if os.path.isdir(d)]


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["cvsparse", "cvsparse.*"]) + ["cvsparse.kernels"],
    package_dir={"cvsparse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
