"""Builds the optional compiled ops ``kswap._C`` (everything else is in pyproject.toml).

The CPU kernels are built whenever torch is importable at build time (``--no-build-isolation``) and a C++
compiler is available; the CUDA kernels too when a CUDA toolkit matching torch is found (``CUDA_HOME``; set
``TORCH_CUDA_ARCH_LIST`` to choose the GPU architectures). ``KSWAP_BUILD_EXT=0`` skips the build. A failed or
skipped build never fails the install: the wheel always carries the sources (``kswap/csrc``), and kswap
builds them on first use (``kswap/ops/extension.py``), else uses its PyTorch reference and says so once.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copy ``csrc/`` into the built ``kswap`` package (an editable install finds it beside ``core/``)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "kswap" / "csrc", dirs_exist_ok=True)


def _extensions():
    if os.environ.get("KSWAP_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("kswap: torch is not importable at build time; skipping the compiled ops", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # a missing or broken compiler must not fail the install
                print(f"kswap: compiled ops not built ({type(err).__name__}: {err}); "
                      "the PyTorch reference will be used", file=sys.stderr)

    sources = ["csrc/bindings.cpp", "csrc/checks.cpp", "csrc/cpu/ms_deform_attn_cpu.cpp"]
    # at::parallel_for is OpenMP in torch's builds and only runs in parallel when the caller is compiled with
    # -fopenmp; the libgomp it links is the one torch has already loaded.
    cxx, link = ["-O3", "-fopenmp"], ["-fopenmp"]
    with_cuda = os.environ.get("KSWAP_BUILD_CUDA", "1") != "0" and CUDA_HOME is not None and torch.version.cuda
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # no GPU to detect at build time
        ext = CUDAExtension("kswap._C", sources + ["csrc/cuda/ms_deform_attn_cuda.cu"],
                            define_macros=[("KSWAP_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link)
    else:
        ext = CppExtension("kswap._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    ext.optional = True  # setuptools then skips copying a module that failed to build
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithSources})
