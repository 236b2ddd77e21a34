"""Builds roi_ops._C, the C++ (and, where available, CUDA) kernels.

torch is a build requirement of the extension: install with
``pip install --no-build-isolation .`` so the build uses the torch already
installed instead of downloading a fresh (multi-GB, CUDA) one.

Environment:
  ROI_OPS_WITH_CUDA=1/0  force / disable the CUDA kernels (default: build them
                         when torch has CUDA and nvcc is found).
  DEBUG=1                -O0 -g build.
  ROI_OPS_SANITIZE=1     build with AddressSanitizer + UBSan (see `make sanitize`).

Every build of the extension also writes roi_ops/_build_info.py (the torch it
was compiled against), which roi_ops/_ops.py checks before loading _C, and a
binary's metadata (wheel, `pip install .`, editable) pins that torch release;
only the sdist keeps the range TORCH_RANGE (docs/build.md, "Packaging").
"""
import glob
import os
import shutil
import sys

import setuptools
from setuptools import setup

# pyproject.toml's SPDX `license` needs setuptools>=77. With
# --no-build-isolation pip does not install [build-system] requires, and a
# fresh venv on Python <= 3.11 comes with an older setuptools: say so here
# instead of failing later on pyproject validation.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"roi-ops: building needs setuptools>=77, found {setuptools.__version__}: "
             "pip install 'setuptools>=77' ninja   (then rerun with --no-build-isolation)")

ROOT = os.path.dirname(os.path.abspath(__file__))
# The torch releases the sources build against (the sdist's requirement).
TORCH_RANGE = "torch>=2.4"
BUILD_INFO = ("roi_ops", "_build_info.py")


def _want_cuda(torch):
    flag = os.environ.get("ROI_OPS_WITH_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "False")
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None
    )


def _extensions(torch, with_cuda):
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
    if with_cuda:
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


def _public_version(version):
    return str(version).split("+", 1)[0]


def _torch_requirement(torch, commands):
    """The torch requirement written into the metadata by ``commands``.

    An sdist is built against whatever torch the installing user has, so it
    keeps the range; everything else here compiles roi_ops._C, which only
    loads into the torch release it was compiled against, so its metadata
    pins that release (`torch==2.13.0` also matches 2.13.0+cpu/+cu128).
    """
    if "sdist" not in commands:
        return f"torch=={_public_version(torch.__version__)}"
    if set(commands) - {"sdist", "egg_info"}:
        sys.exit("setup.py: build the sdist and other distributions in separate calls "
                 f"(`python -m build` does), not {' '.join(commands)}: their torch requirements differ")
    return TORCH_RANGE


def _distclass(torch):
    from setuptools.dist import Distribution

    class RoiOpsDistribution(Distribution):
        """Sets the torch requirement from the commands actually parsed
        (before any of them writes metadata)."""

        def run_commands(self):
            requirement = _torch_requirement(torch, self.commands)
            self.install_requires = [requirement]
            self.metadata.install_requires = [requirement]
            super().run_commands()

    return RoiOpsDistribution


def _build_info_source(torch, with_cuda):
    return (
        "# Written by setup.py when roi_ops._C was compiled: the torch it was\n"
        "# compiled against. roi_ops/_ops.py checks it before loading _C.\n"
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {bool(with_cuda)!r}\n"
    )


def _cmdclass(torch, with_cuda):
    from torch.utils.cpp_extension import BuildExtension

    class build_ext(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension, then roi_ops/_build_info.py beside the built _C
        (in build_lib, which goes into the wheel, and, for in-place and
        editable builds, in the source tree the package is imported from)."""

        def run(self):
            super().run()
            targets = [os.path.join(self.build_lib, *BUILD_INFO)]
            if self.inplace:
                targets.append(os.path.join(ROOT, *BUILD_INFO))
            for path in targets:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(_build_info_source(torch, with_cuda))

        def get_outputs(self):
            return super().get_outputs() + [os.path.join(self.build_lib, *BUILD_INFO)]

    return {"build_ext": build_ext}


def main():
    import torch

    with_cuda = _want_cuda(torch)
    setup(
        ext_modules=_extensions(torch, with_cuda),
        cmdclass=_cmdclass(torch, with_cuda),
        install_requires=[_torch_requirement(torch, [])],  # the pin; sdist: see _distclass
        distclass=_distclass(torch),
    )


if __name__ == "__main__":
    main()
