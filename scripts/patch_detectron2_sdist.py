"""Patch an unpacked pb1-detectron2 0.6 sdist so it builds and imports on current torch/NumPy/Pillow.

pb1-detectron2 is upstream detectron2 v0.6 without ``csrc/``. This makes it a pure-Python build:

* ``setup.py``: no C++ extension, model-zoo configs shipped from ``detectron2/model_zoo/configs``;
* ``detectron2/_C.py``: a stand-in that says the C++ ops were not built when one is used, and answers the build
  queries of ``collect_env_info`` (so ``default_setup`` works);
* NumPy and Pillow aliases removed since v0.6 (``np.bool`` ..., ``Image.LINEAR``) replaced;
* ``engine/launch.py`` as upstream since v0.6: processes without a GPU join a gloo group instead of asserting CUDA;
* ``create_ddp_model`` gives DDP ``device_ids`` only for GPU modules (torch rejects them for CPU modules);
* the version gets the local label ``+kswap.N``, so an install with an older patch is rebuilt.

Usage: ``python patch_detectron2_sdist.py SDIST_DIR``. Running it twice changes nothing.
"""

import re
import sys
from pathlib import Path

_C_STUB = '''"""Stand-in for detectron2's C++ ops, which this build does not compile (pure-Python install)."""

# What detectron2.utils.collect_env (called by default_setup in every train_net.py) asks of the build.
_NOT_BUILT = "not built (pure-Python detectron2 build)"


def get_compiler_version():
    return _NOT_BUILT


def get_cuda_version():
    return _NOT_BUILT


def has_cuda():
    return False


def __getattr__(name):
    raise ImportError(
        f"detectron2._C.{name} is not available: detectron2 was built without its C++ ops "
        "(rotated boxes, DeformConv, fast COCO eval). Use COCOEvaluator(use_fast_impl=False)."
    )
'''

# Bump when a patch changes; scripts/install.sh requires exactly this version.
VERSION = "0.6+kswap.2"

_NUMPY_ALIASES = {"bool": "bool", "int": "int64", "float": "float64", "str": "str_", "object": "object_"}


def patch_setup(setup_py: Path) -> None:
    text = setup_py.read_text()
    text = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
    text = re.sub(
        r'package_data=\{"detectron2.model_zoo": get_model_zoo_configs\(\)\}',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}',
        text,
    )
    setup_py.write_text(text)


def patch_aliases(package_dir: Path) -> None:
    alias = re.compile(r"\bnp\.(bool|int|float|str|object)\b(?!_|\d)")
    for source in package_dir.rglob("*.py"):
        text = source.read_text()
        new = alias.sub(lambda m: f"np.{_NUMPY_ALIASES[m.group(1)]}", text)
        new = new.replace("Image.LINEAR", "Image.BILINEAR")
        if new != text:
            source.write_text(new)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if new in text:
        return
    if old not in text:
        raise SystemExit(f"{path}: the text to patch was not found: {old!r}")
    path.write_text(text.replace(old, new))


def patch_cpu_distributed(package_dir: Path) -> None:
    launch = package_dir / "engine" / "launch.py"
    _replace(launch, '    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."\n',
             "    has_gpu = torch.cuda.is_available()\n")
    _replace(launch, 'backend="NCCL",', 'backend="NCCL" if has_gpu else "GLOO",')
    _replace(launch,
             "    assert num_gpus_per_machine <= torch.cuda.device_count()\n    torch.cuda.set_device(local_rank)\n",
             "    if has_gpu:\n        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
             "        torch.cuda.set_device(local_rank)\n")
    _replace(package_dir / "engine" / "defaults.py", '    if "device_ids" not in kwargs:\n',
             '    if "device_ids" not in kwargs and next(model.parameters()).is_cuda:\n')


def patch_version(package_dir: Path) -> None:
    init = package_dir / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{VERSION}"', init.read_text()))


def main(root: str) -> None:
    sdist = Path(root)
    patch_setup(sdist / "setup.py")
    patch_aliases(sdist / "detectron2")
    patch_cpu_distributed(sdist / "detectron2")
    patch_version(sdist / "detectron2")
    (sdist / "detectron2" / "_C.py").write_text(_C_STUB)


if __name__ == "__main__":
    main(sys.argv[1])
