"""Builds roi_ops._C, the C++ (and, where available, CUDA) kernels.

torch is a build requirement of the extension: install with
``pip install --no-build-isolation .`` so the build uses the torch already
installed instead of downloading a fresh (multi-GB, CUDA) one.

Environment:
  ROI_OPS_WITH_CUDA=1/0  force / disable the CUDA kernels (default: build them
                         when torch has CUDA and nvcc is found).
  DEBUG=1                -O0 -g build.
  ROI_OPS_SANITIZE=1     build with AddressSanitizer + UBSan (see `make sanitize`).
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch):
    flag = os.environ.get("ROI_OPS_WITH_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "False")
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None
    )


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    sanitize = os.environ.get("ROI_OPS_SANITIZE", "0") == "1"
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))

    # -ffp-contract=off: IEEE operation order on every host arch (no FMA
    # contraction), so coordinates round exactly as roi_ops/reference.py does.
    cxx = ["-std=c++20", "-DROI_OPS_PYTHON_MODULE", "-ffp-contract=off"]
    link = []
    if debug or sanitize:
        cxx += ["-O0" if debug else "-O1", "-g", "-fno-omit-frame-pointer"]
    else:
        cxx += ["-O3"]
    if sanitize:
        cxx += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        link += ["-fsanitize=address,undefined"]
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    if _want_cuda(torch):
        # kernels (*.cu, nvcc) and their host side (*.cpp: checks, dispatch,
        # registration, compiled once by the host compiler)
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        # --fmad=false: coordinates rounded as on the CPU (docs/cuda.md)
        extra["nvcc"] = ["-std=c++20", "-O3", "--fmad=false", "-DROI_OPS_PYTHON_MODULE"] + (
            ["-g", "-lineinfo"] if debug else []
        )
        ext_cls = CUDAExtension
    return [
        ext_cls(
            "roi_ops._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
