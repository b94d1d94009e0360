"""Real data written to disk for the hosts: digit ImageFolders and labelme's example photos."""

from __future__ import annotations


def write_image_folder(root, images, labels, names, split_at: int) -> None:
    """Write 8x8 digit images as PNGs: ``root/{train,val}/<name>/<i>.png`` (first ``split_at`` samples train)."""
    import numpy as np
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if int(label) not in names:
            continue
        split = "train" if i < split_at else "val"
        folder = root / split / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.reshape(8, 8).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")


def load_digits():
    """sklearn's 1,797 real 8x8 handwritten digits (UCI optdigits), scaled to [0, 1], shape (N, 1, 8, 8), and their
    labels."""
    import torch
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.tensor(y)


def write_digit_folders(root, images, labels) -> None:
    """The digits as timm ImageFolders: ``root/old`` holds 0-7 (folders "0".."7"), ``root/new`` holds 8 and 9 as
    "eight" and "nine"; the first 1,400 samples train."""
    write_image_folder(root / "old", images, labels, {d: str(d) for d in range(8)}, split_at=1400)
    write_image_folder(root / "new", images, labels, {8: "eight", 9: "nine"}, split_at=1400)


def labelme_example(subdir: str):
    """A folder of labelme's examples (real PASCAL VOC photos with annotations), fetched from PyPI at test time and
    cached under ~/.cache/kswap; labelme is GPL-3.0, so it is never copied into this repository."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    cache = Path(os.environ.get("KSWAP_CACHE", Path.home() / ".cache" / "kswap")) / "labelme"
    root = cache / "labelme-6.3.1" / "examples" / subdir
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / "labelme-6.3.1.tar.gz").exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "labelme==6.3.1", "-d", str(cache)], check=True)
        with tarfile.open(cache / "labelme-6.3.1.tar.gz") as tar:
            members = [m for m in tar.getmembers() if f"/examples/{subdir}/" in m.name]
            tar.extractall(cache, members=members, filter="data")
    return root
