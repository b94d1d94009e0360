"""Per-set COCO bbox AP of a swap, in the joint label space, with pycocotools.

Each set is scored over the union of all sets' test images, not only its own: a detection of any class on any
of those images is a false positive of its class unless it finds an object of that class, so a model that
relabels forgotten objects as another class loses that class's AP instead of going unseen (each set scored
on its own images would drop the relabelled boxes as detections of a class it does not hold). The mean is over
the set's classes. ``forget_any`` is the class-agnostic AP of the forgotten objects on the forget images (any
label counts): forgotten objects still found under another label keep it high.
"""

from __future__ import annotations

import contextlib
import io
import os.path as osp
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from mmengine.dataset import pseudo_collate
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset

from kswap import SwapConfigError

# CocoMetric's proposal_nums: its bbox_mAP counts up to 1000 detections per image.
MAX_DETS = [100, 300, 1000]


def coco_json(dataset: Any) -> dict:
    """A COCO file of an mmdet dataset's parsed images and instances, in the dataset's label space.

    ``categories`` are all of ``dataset.metainfo['classes']`` in order with ``id = label + 1``, so mmdet's
    ``CocoDataset`` and ``CocoMetric`` given the same class list read the labels back unchanged.
    """
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    images = [{"id": info["img_id"], "file_name": info["file_name"], "width": info["width"],
               "height": info["height"]} for info in infos]
    return _coco(images, [(info["img_id"], inst) for info in infos for inst in info["instances"]],
                 dataset.metainfo["classes"])


def _coco(images: list[dict], instances: Iterable[tuple[int, dict]], classes: Sequence[str]) -> dict:
    annotations = []
    for image_id, inst in instances:
        x1, y1, x2, y2 = inst["bbox"]
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": inst["bbox_label"] + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                            "iscrowd": int(inst["ignore_flag"])})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def as_coco(data: dict) -> COCO:
    """A pycocotools ground truth of a COCO dict."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_from_dataset(dataset: Any) -> COCO:
    """``coco_json(dataset)`` as a pycocotools ground truth."""
    return as_coco(coco_json(dataset))


def coco_ap(gt: COCO, detections: list[dict], use_cats: bool = True) -> float:
    """AP@[.5:.95] in percent of ``detections`` on ``gt``'s images, as mmdet's ``CocoMetric`` computes its
    ``bbox_mAP`` (pycocotools leaves classes without ground truth out of the mean); ``use_cats=False``:
    class-agnostic (a detection of any label may find any object)."""
    images = set(gt.getImgIds())
    detections = [d for d in detections if d["image_id"] in images]
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.params.maxDets = MAX_DETS
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(0.0, 100.0 * float(ev.stats[0]))


@dataclass(frozen=True)
class TestImage:
    """One image of the union: where it comes from and every labelled object on it (joint label space)."""

    path: str
    width: int
    height: int
    instances: list[dict]


class SetScorer:
    """Scores a detector on the three sets over the union of their test images, inference once per image.

    Args:
        datasets: per set, its test dataset in the joint label space, every labelled object kept (a
            ``SwapCocoDataset`` without ``keep_classes``); a set's images are those showing one of its classes.
            Datasets of several sets may be the same object.
        sets: per set, its joint class ids.
        classes: the joint class names.
        batch_size: inference batch size.
    """

    def __init__(self, datasets: Mapping[str, Any], sets: Mapping[str, Sequence[int]], classes: Sequence[str],
                 batch_size: int) -> None:
        self.sets = {name: frozenset(ids) for name, ids in sets.items()}
        self.classes = list(classes)
        self.images: list[TestImage] = []
        ids: dict[str, int] = {}  # image path -> its id in the union (1-based)
        # per dataset object: the dataset, the indices of its images to infer and their ids in the union
        picked: dict[int, tuple[Any, list[int], list[int]]] = {}
        shown: dict[str, set[int]] = {name: set() for name in sets}
        for name, dataset in datasets.items():
            for i in range(len(dataset)):
                info = dataset.get_data_info(i)
                if not any(inst["bbox_label"] in self.sets[name] and not inst["ignore_flag"]
                           for inst in info["instances"]):
                    continue
                path = osp.abspath(info["img_path"])
                if path not in ids:
                    ids[path] = len(self.images) + 1
                    self.images.append(TestImage(path, info["width"], info["height"], info["instances"]))
                    _, indices, union_ids = picked.setdefault(id(dataset), (dataset, [], []))
                    indices.append(i)
                    union_ids.append(ids[path])
                shown[name].add(ids[path])
            if not shown[name]:
                raise SwapConfigError(f"SwapHook: the {name} set has no validation images with its classes.")
        self.loaders = [(DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                                    collate_fn=pseudo_collate), union_ids)
                        for dataset, indices, union_ids in picked.values()]
        self.gt = {name: as_coco(self.coco(name)) for name in sets}
        self.forget_images = len(shown["forget"])
        forget = self.sets["forget"]
        # Other objects on the forget images are ignored regions (iscrowd): finding them is neither a hit nor a
        # false positive of the class-agnostic forget score.
        self.forget_any_gt = as_coco(_coco(
            [self._image_entry(i) for i in sorted(shown["forget"])],
            [(i, {**inst, "ignore_flag": inst["ignore_flag"] or inst["bbox_label"] not in forget})
             for i in sorted(shown["forget"]) for inst in self.images[i - 1].instances],
            self.classes))

    def _image_entry(self, image_id: int) -> dict:
        image = self.images[image_id - 1]
        return {"id": image_id, "file_name": image.path, "width": image.width, "height": image.height}

    def coco(self, name: str) -> dict:
        """The COCO file of set ``name``: every image of the union (absolute file names), the set's objects,
        the joint class list as categories (``id`` = label + 1)."""
        keep = self.sets[name]
        return _coco([self._image_entry(i) for i in range(1, len(self.images) + 1)],
                     [(i, inst) for i, image in enumerate(self.images, start=1) for inst in image.instances
                      if inst["bbox_label"] in keep], self.classes)

    @torch.no_grad()
    def detections(self, model: Any) -> list[dict]:
        """``model``'s detections on every image of the union, as COCO results (union image ids)."""
        model.eval()
        out = []
        for loader, union_ids in self.loaders:
            image_id = iter(union_ids)
            for batch in loader:
                for sample in model.val_step(batch):
                    current = next(image_id)
                    pred = sample.pred_instances
                    for (x1, y1, x2, y2), score, label in zip(pred.bboxes.tolist(), pred.scores.tolist(),
                                                              pred.labels.tolist(), strict=True):
                        out.append({"image_id": current, "category_id": label + 1, "score": score,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1]})
        return out

    def __call__(self, model: Any) -> dict[str, float]:
        """Per set its bbox AP (percent), and ``forget_any``, the class-agnostic AP of the forgotten objects."""
        detections = self.detections(model)
        scores = {name: self.set_ap(detections, name) for name in self.sets}
        scores["forget_any"] = coco_ap(self.forget_any_gt, detections, use_cats=False)
        return scores

    def images_per_score(self) -> dict[str, int]:
        """The test images each score of ``__call__`` reads: every set's AP the whole union (a set is scored on
        all of its images, not only those showing its classes), ``forget_any`` the forget set's images."""
        return {**{name: len(self.images) for name in self.sets}, "forget_any": self.forget_images}

    def set_ap(self, detections: list[dict], name: str) -> float:
        """Set ``name``'s AP over the union: the mean over its classes (detections of other classes cannot
        change it, so they are left out before pycocotools)."""
        keep = {c + 1 for c in self.sets[name]}
        return coco_ap(self.gt[name], [d for d in detections if d["category_id"] in keep])
