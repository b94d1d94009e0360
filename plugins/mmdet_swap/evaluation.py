"""COCO bbox mAP of one swap set: ground truth from the set's dataset, pycocotools for the numbers."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def coco_from_dataset(dataset: Any) -> COCO:
    """A pycocotools ground truth built from an mmdet dataset's parsed instances (labels as category ids)."""
    images, annotations, labels = [], [], set()
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        images.append({"id": info["img_id"], "width": info["width"], "height": info["height"]})
        for inst in info["instances"]:
            x1, y1, x2, y2 = inst["bbox"]
            labels.add(inst["bbox_label"])
            annotations.append({"id": len(annotations) + 1, "image_id": info["img_id"],
                                "category_id": inst["bbox_label"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": int(inst["ignore_flag"])})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": str(c)} for c in sorted(labels)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.no_grad()
def bbox_map(model: Any, loader: Iterable, gt: COCO) -> float:
    """AP@[.5:.95] in percent over the classes present in ``gt`` (pycocotools skips the others)."""
    model.eval()
    detections = []
    present = set(gt.getCatIds())
    for batch in loader:
        for sample in model.val_step(batch):
            pred = sample.pred_instances
            for box, score, label in zip(pred.bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist()):
                if label in present:
                    x1, y1, x2, y2 = box
                    detections.append({"image_id": sample.img_id, "category_id": label,
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(0.0, 100.0 * float(ev.stats[0]))
