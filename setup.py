"""Only for the optional ahead-of-time CUDA build (IVG_BUILD_CUDA=1); metadata lives in pyproject.toml.

Without IVG_BUILD_CUDA=1 this is a plain pure-Python install: the CUDA sources in csrc/ are
compiled on first use instead (their own issue).
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("IVG_BUILD_CUDA") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        raise SystemExit("IVG_BUILD_CUDA=1 but csrc/ holds no CUDA sources yet")
    ext_modules = [CUDAExtension("ivg_kernels._C", sources, extra_compile_args={"nvcc": ["-O3"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
