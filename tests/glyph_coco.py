"""A composited detection set: real MNIST / Fashion-MNIST glyphs pasted on blank canvases, as COCO files.

The objects are real handwritten digits and clothing photos (fetched by ``demo/prepare_data.py`` from npm and
Debian); the layout is synthetic. Boxes come from the glyphs' non-zero pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from prepare_data import FASHION_CLASSES, load_fashion, load_mnist  # noqa: E402


def write_glyph_coco(root: Path, source: str, classes: list[str], n_images: int, split: str, seed: int,
                     canvas: int = 96, glyph: int = 32, per_image: tuple[int, int] = (1, 2)) -> Path:
    """Write ``root/<source>_<split>/*.png`` and ``root/<source>_<split>.json``; returns the JSON path."""
    images, labels = (load_mnist if source == "mnist" else load_fashion)("train" if split == "train" else "test")
    names = [str(d) for d in range(10)] if source == "mnist" else FASHION_CLASSES
    wanted = [names.index(c) for c in classes]
    rng = np.random.default_rng(seed)
    pools = {k: np.flatnonzero(labels == k) for k in wanted}
    folder = root / f"{source}_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    for img_id in range(1, n_images + 1):
        canvas_px = np.zeros((canvas, canvas), np.uint8)
        for _ in range(rng.integers(per_image[0], per_image[1] + 1)):
            k = int(rng.choice(wanted))
            g = np.asarray(Image.fromarray(images[rng.choice(pools[k])]).resize((glyph, glyph), Image.BILINEAR))
            x, y = (int(v) for v in rng.integers(0, canvas - glyph, size=2))
            ys, xs = np.nonzero(g > 40)
            canvas_px[y:y + glyph, x:x + glyph] = np.maximum(canvas_px[y:y + glyph, x:x + glyph], g)
            x1, y1, x2, y2 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": img_id,
                                        "category_id": classes.index(names[k]) + 1,
                                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                        "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})
        name = f"{img_id:05d}.png"
        Image.fromarray(canvas_px).convert("RGB").save(folder / name)
        coco["images"].append({"id": img_id, "file_name": name, "width": canvas, "height": canvas})
    path = root / f"{source}_{split}.json"
    path.write_text(json.dumps(coco))
    return path
