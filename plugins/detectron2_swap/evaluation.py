"""Per-set semantic segmentation mIoU, the measure of a swap.

A set's score is the mean IoU of the set's classes over every labelled pixel of the set's test images: their
ground truth is read into the joint label space (``SwapPlan.score_table``), so a pixel predicted as any joint
class it does not belong to is a false positive of that class and a miss of its own. Painting one class
everywhere therefore scores low, and the score is what detectron2's ``SemSegEvaluator`` gives per class on the
same images in the joint label space (``export.export_test_sets`` writes them for the stock tools).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from torch import nn

from .plan import SETS, SwapPlan, read_label_ids


class SetSemSegEvaluator(DatasetEvaluator):
    """Confusion counts over the joint classes for one test dataset.

    Args:
        dataset_name: a registered dataset with ``sem_seg_file_name`` records.
        class_names: the joint class names (the model's outputs, in order).
        table: maps the dataset's label ids to joint ids, ``len(class_names)`` for labelled pixels of no joint
            class and ``len(class_names) + 1`` for ignored ones (``SwapPlan.score_table``).
        distributed: gather the counts of every process (each scores its shard of the test loader).
    """

    def __init__(self, dataset_name: str, class_names: Sequence[str], table: np.ndarray,
                 distributed: bool = True) -> None:
        self.class_names = list(class_names)
        self.table = table
        self.distributed = distributed
        self.gt_files = {r["file_name"]: r["sem_seg_file_name"] for r in DatasetCatalog.get(dataset_name)}
        self.reset()

    def reset(self) -> None:
        n = len(self.class_names) + 2  # then the labelled pixels of no joint class, then the ignored ones
        self.confusion = np.zeros((n, n), dtype=np.int64)

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        n = len(self.confusion)
        for sample, output in zip(inputs, outputs, strict=True):
            pred = output["sem_seg"].argmax(dim=0).cpu().numpy().astype(np.int64)
            gt = read_label_ids(self.gt_files[sample["file_name"]], self.table)
            self.confusion += np.bincount(n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n).reshape(n, n)

    def evaluate(self) -> dict[str, dict[str, float]] | None:
        if self.distributed:
            comm.synchronize()
            matrices = comm.all_gather(self.confusion)
            if not comm.is_main_process():
                return None
            self.confusion = sum(matrices)
        return {"sem_seg": per_class_iou(self.confusion, self.class_names)}


def per_class_iou(confusion: np.ndarray, class_names: Sequence[str],
                  over: Iterable[int] | None = None) -> dict[str, float]:
    """``IoU-<name>`` (percent) of each class of ``over`` (default: all) with ground-truth pixels, and ``mIoU``,
    their mean (detectron2's per-class IoU; NaN when none has ground truth).

    ``confusion[pred, gt]``: its last row and column count ignored pixels, which are left out; columns between
    ``len(class_names)`` and the last count labelled pixels of no listed class (false positives of whatever is
    predicted there).
    """
    n = len(class_names)
    counts = confusion[:-1, :-1].astype(np.float64)
    tp, gt, pred = np.diag(counts)[:n], counts.sum(axis=0)[:n], counts.sum(axis=1)[:n]
    ids = np.arange(n) if over is None else np.fromiter(over, dtype=np.int64)
    present = ids[gt[ids] > 0]
    iou = tp[present] / (gt + pred - tp)[present]
    res = {"mIoU": float(100 * iou.mean()) if len(present) else float("nan")}
    res.update({f"IoU-{class_names[i]}": float(100 * v) for i, v in zip(present, iou, strict=True)})
    return res


def score_sets(model: nn.Module, plan: SwapPlan, build_test_loader: Callable[[str], Iterable],
               distributed: bool = True, sets: Sequence[str] = SETS) -> dict[str, float] | None:
    """Per set of ``sets``, the mean IoU of its classes over its test datasets (their confusion counts summed);
    ``None`` on non-main processes. A dataset that several sets are scored on is run once.

    Every process must call it: each runs its shard of the test loaders.
    """
    confusion = {}
    for dataset in dict.fromkeys(d for name in sets for d in plan.test[name]):
        evaluator = SetSemSegEvaluator(dataset, plan.space.names, plan.score_table(dataset), distributed)
        inference_on_dataset(model, build_test_loader(dataset), evaluator)
        confusion[dataset] = evaluator.confusion  # the gathered counts, on the main process
    if not comm.is_main_process():
        return None
    return {name: per_class_iou(sum(confusion[d] for d in plan.test[name]), plan.space.names,
                                plan.sets[name])["mIoU"] for name in sets}
