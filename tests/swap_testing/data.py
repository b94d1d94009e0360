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
