"""Find the compiled ops: the ``kswap._C`` built with the package, else a build on first use, cached.

A plain ``pip install .`` builds in an isolated environment without torch, so ``setup.py`` cannot compile
``kswap._C`` there; the wheel ships the C++/CUDA sources instead (``kswap/csrc``) and the first use compiles
them with ``torch.utils.cpp_extension.load`` into ``$KSWAP_CACHE/torch_extensions`` (default
``~/.cache/kswap``), keyed by the torch version and the sources' hash, as many torch extensions do. Later
processes load the cached build in milliseconds.

``KSWAP_JIT=0`` turns the build on first use off; ``python -m kswap.ops`` says which kernel is active.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[1]
_CPU_SOURCES = ("bindings.cpp", "checks.cpp", "cpu/ms_deform_attn_cpu.cpp")
_CUDA_SOURCES = ("cuda/ms_deform_attn_cuda.cu",)


@dataclass(frozen=True)
class KernelInfo:
    """Which multi-scale deformable attention serves CPU tensors, and why."""

    module: ModuleType | None
    source: str  # "prebuilt", "built on first use" or "reference"
    detail: str

    @property
    def cpu_isa(self) -> str | None:
        """The instruction set the CPU kernels run with ("avx2+fma" or "baseline"); ``None`` without a kernel."""
        return self.module.cpu_isa() if self.module is not None else None

    def __str__(self) -> str:
        if self.module is None:
            return f"kswap ms_deform_attn: PyTorch reference (grid_sample) [{self.source}] {self.detail}"
        return f"kswap ms_deform_attn: compiled kernel [{self.source}] {self.detail}; CPU {self.cpu_isa}"


def sources_dir() -> Path | None:
    """The C++/CUDA sources: inside an installed wheel (``kswap/csrc``) or beside ``core/`` in a clone."""
    for candidate in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def _cache_root() -> Path:
    return Path(os.environ.get("KSWAP_CACHE", Path.home() / ".cache" / "kswap")) / "torch_extensions"


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.cuda.is_available() and torch.version.cuda and CUDA_HOME)


def _build(src: Path) -> tuple[ModuleType, Path]:
    from torch.utils.cpp_extension import load

    files = [src / f for f in _CPU_SOURCES] + ([src / f for f in _CUDA_SOURCES] if _with_cuda() else [])
    digest = hashlib.sha256()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            digest.update(f.relative_to(src).as_posix().encode() + f.read_bytes())
    tag = f"torch{torch.__version__}-{'cuda' if len(files) > len(_CPU_SOURCES) else 'cpu'}-{digest.hexdigest()[:12]}"
    build_dir = _cache_root() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    _put_ninja_on_path()
    # bindings.cpp dispatches to the CUDA kernels only when it too is compiled with KSWAP_WITH_CUDA
    defines = ["-DKSWAP_WITH_CUDA"] if len(files) > len(_CPU_SOURCES) else []
    module = load(name="kswap_C", sources=[str(f) for f in files], build_directory=str(build_dir),
                  extra_cflags=["-O3", "-fopenmp", *defines], extra_ldflags=["-fopenmp"],
                  extra_cuda_cflags=["-O3", *defines] if defines else None,
                  extra_include_paths=[str(src)], verbose=False)
    return module, build_dir


def _put_ninja_on_path() -> None:
    """torch's loader runs ``ninja`` from PATH; a venv used without activation has it only beside its python."""
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


@cache
def kernel_info() -> KernelInfo:
    """Load the compiled ops once per process (building them on first use when needed) and say which serve."""
    try:
        from kswap import _C

        return KernelInfo(_C, "prebuilt", f"({_C.__file__})")
    except ImportError as err:
        prebuilt_error = err
    src = sources_dir()
    if os.environ.get("KSWAP_JIT", "1") == "0" or src is None:
        why = "KSWAP_JIT=0" if src is not None else "no sources in this install"
        return KernelInfo(None, "reference", f"(kswap._C: {prebuilt_error}; no build on first use: {why})")
    try:
        module, build_dir = _build(src)
    except Exception as err:  # a missing compiler must not stop training: the reference is exact, only slower
        return KernelInfo(None, "reference", f"(kswap._C: {prebuilt_error}; build on first use failed: "
                                             f"{type(err).__name__}: {str(err).strip().splitlines()[-1]})")
    return KernelInfo(module, "built on first use", f"(cached in {build_dir})")


@cache
def extension() -> ModuleType | None:
    """The compiled ops module, or ``None`` (with one warning) when only the reference is available."""
    info = kernel_info()
    if info.module is None:
        logger.warning("%s", info)
    return info.module
