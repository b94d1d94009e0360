"""COCO bbox mAP of one swap set: ground truth from the set's dataset, pycocotools for the numbers."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def coco_json(dataset: Any) -> dict:
    """A COCO file of an mmdet dataset's parsed images and instances, in the dataset's label space.

    ``categories`` are all of ``dataset.metainfo['classes']`` in order with ``id = label + 1``, so mmdet's
    ``CocoDataset`` and ``CocoMetric`` given the same class list read the labels back unchanged.
    """
    images, annotations = [], []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        images.append({"id": info["img_id"], "file_name": info["file_name"], "width": info["width"],
                       "height": info["height"]})
        for inst in info["instances"]:
            x1, y1, x2, y2 = inst["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": info["img_id"],
                                "category_id": inst["bbox_label"] + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": int(inst["ignore_flag"])})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(dataset.metainfo["classes"])]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_from_dataset(dataset: Any) -> COCO:
    """``coco_json(dataset)`` as a pycocotools ground truth."""
    coco = COCO()
    coco.dataset = coco_json(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.no_grad()
def bbox_map(model: Any, loader: Iterable, gt: COCO) -> float:
    """AP@[.5:.95] in percent over the classes present in ``gt``, as mmdet's ``CocoMetric`` computes its
    ``bbox_mAP`` on the same file (pycocotools leaves classes without ground truth out of the mean)."""
    model.eval()
    detections = []
    present = {a["category_id"] for a in gt.dataset["annotations"]}
    for batch in loader:
        for sample in model.val_step(batch):
            pred = sample.pred_instances
            boxes = zip(pred.bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), strict=True)
            for box, score, label in boxes:
                if label + 1 in present:
                    x1, y1, x2, y2 = box
                    detections.append({"image_id": sample.img_id, "category_id": label + 1,
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [100, 300, 1000]  # CocoMetric's proposal_nums: its bbox_mAP counts 1000 per image
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(0.0, 100.0 * float(ev.stats[0]))
