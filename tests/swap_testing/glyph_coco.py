"""Composited sets of real MNIST / Fashion-MNIST glyphs pasted on blank canvases: COCO files (detection) and
label PNGs (semantic segmentation).

The objects are real handwritten digits and clothing photos (fetched by ``demo/prepare_data.py`` from npm and
Debian); the layout is synthetic. Boxes and masks come from the glyphs' pixels.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "demo"))
from prepare_data import FASHION_CLASSES, load_fashion, load_mnist  # noqa: E402

Composite = tuple[np.ndarray, list[tuple[str, np.ndarray]]]


def composite_glyphs(source: str, classes: list[str], n_images: int, split: str, seed: int, canvas: int,
                     glyph: int, per_image: tuple[int, int]) -> Iterator[Composite]:
    """Yield ``(canvas, objects)``: a uint8 image and, per pasted glyph, its class name and full-size mask."""
    images, labels = (load_mnist if source == "mnist" else load_fashion)("train" if split == "train" else "test")
    names = [str(d) for d in range(10)] if source == "mnist" else FASHION_CLASSES
    wanted = [names.index(c) for c in classes]
    rng = np.random.default_rng(seed)
    pools = {k: np.flatnonzero(labels == k) for k in wanted}
    for _ in range(n_images):
        pixels = np.zeros((canvas, canvas), np.uint8)
        objects = []
        for _ in range(rng.integers(per_image[0], per_image[1] + 1)):
            k = int(rng.choice(wanted))
            g = np.asarray(Image.fromarray(images[rng.choice(pools[k])]).resize((glyph, glyph), Image.BILINEAR))
            x, y = (int(v) for v in rng.integers(0, canvas - glyph, size=2))
            pixels[y:y + glyph, x:x + glyph] = np.maximum(pixels[y:y + glyph, x:x + glyph], g)
            mask = np.zeros((canvas, canvas), bool)
            mask[y:y + glyph, x:x + glyph] = g > 40
            objects.append((names[k], mask))
        yield pixels, objects


def write_glyph_coco(root: Path, source: str, classes: list[str], n_images: int, split: str, seed: int,
                     canvas: int = 96, glyph: int = 32, per_image: tuple[int, int] = (1, 2)) -> Path:
    """Write ``root/<source>_<split>/*.png`` and ``root/<source>_<split>.json``; returns the JSON path."""
    folder = root / f"{source}_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    glyphs = composite_glyphs(source, classes, n_images, split, seed, canvas, glyph, per_image)
    for img_id, (pixels, objects) in enumerate(glyphs, start=1):
        for name, mask in objects:
            ys, xs = np.nonzero(mask)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": img_id,
                                        "category_id": classes.index(name) + 1,
                                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                        "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})
        file_name = f"{img_id:05d}.png"
        Image.fromarray(pixels).convert("RGB").save(folder / file_name)
        coco["images"].append({"id": img_id, "file_name": file_name, "width": canvas, "height": canvas})
    path = root / f"{source}_{split}.json"
    path.write_text(json.dumps(coco))
    return path


def write_glyph_semseg(root: Path, source: str, classes: list[str], stuff_classes: list[str], n_images: int,
                       split: str, seed: int, canvas: int = 64, glyph: int = 28,
                       per_image: tuple[int, int] = (1, 2)) -> list[dict]:
    """Write images and label PNGs (``stuff_classes.index(name)`` per glyph pixel, 0 elsewhere: the background
    class) under ``root/<source>_<split>_<seed>/``; returns detectron2 records."""
    folder = root / f"{source}_{split}_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    glyphs = composite_glyphs(source, classes, n_images, split, seed, canvas, glyph, per_image)
    for i, (pixels, objects) in enumerate(glyphs):
        label = np.zeros((canvas, canvas), np.uint8)
        for name, mask in objects:
            label[mask] = stuff_classes.index(name)
        image, sem_seg = folder / f"{i:05d}.png", folder / f"{i:05d}_label.png"
        Image.fromarray(pixels).convert("RGB").save(image)
        Image.fromarray(label).save(sem_seg)
        records.append({"file_name": str(image), "sem_seg_file_name": str(sem_seg), "height": canvas,
                        "width": canvas, "image_id": i})
    return records
