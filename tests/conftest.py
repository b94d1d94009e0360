"""Shared fixtures: real small data (sklearn digits) and tiny timm models built in the test (no download)."""

from __future__ import annotations

import pytest
import torch


def tiny_vit(num_classes: int = 10, depth: int = 2):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
        embed_dim=32, depth=depth, num_heads=2, num_classes=num_classes,
    )


def tiny_swin(num_classes: int = 10):
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, in_chans=1,
        window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=num_classes,
    )


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 real 8x8 handwritten digits (UCI optdigits), scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.tensor(y)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def digit_folders(tmp_path_factory, digits):
    """Real handwritten digits as timm ImageFolders: ``old`` holds digits 0-7 (folders "0".."7"), ``new`` holds
    8 and 9 as "eight" and "nine"."""
    root = tmp_path_factory.mktemp("digits")
    x, y = digits
    write_image_folder(root / "old", x, y, {d: str(d) for d in range(8)}, split_at=1400)
    write_image_folder(root / "new", x, y, {8: "eight", 9: "nine"}, split_at=1400)
    return root


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


@pytest.fixture(scope="session")
def glyph_spec(tmp_path_factory):
    """detectron2's registered glyph segmentation datasets (see ``d2_models.write_glyph_spec``)."""
    from d2_models import write_glyph_spec

    return write_glyph_spec(tmp_path_factory.mktemp("glyph_seg"))


@pytest.fixture(scope="session")
def d2_pretrained(glyph_spec, tmp_path_factory):
    """The pretrained detectron2 SemanticSegmentor on the glyph digits (``d2_models.pretrain_glyph_segmentor``)."""
    from d2_models import pretrain_glyph_segmentor

    return pretrain_glyph_segmentor(tmp_path_factory.mktemp("pretrain"))
