"""Per-set semantic segmentation mIoU, the reference's measure of a swap.

``SetSemSegEvaluator`` is detectron2's ``SemSegEvaluator`` for one swap set: the ground truth is read through the
set's label table into the joint label space (other classes ignored), and mIoU is the mean IoU over the classes
present in that ground truth (the reference's rule; detectron2 v0.6 also divided by classes only predicted).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from torch import nn

from .plan import SETS, SwapPlan, read_label_ids


class SetSemSegEvaluator(DatasetEvaluator):
    """Confusion matrix over the joint classes for one dataset of one swap set.

    Args:
        dataset_name: a registered dataset with ``sem_seg_file_name`` records.
        class_names: the joint class names (the model's outputs, in order).
        table: the set's label table, mapping the dataset's label ids to joint ids (``len(class_names)``: ignore).
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
        n = len(self.class_names) + 1  # the last row and column count ignored pixels
        self.confusion = np.zeros((n, n), dtype=np.int64)

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        n = len(self.class_names) + 1
        for sample, output in zip(inputs, outputs):
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


def per_class_iou(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """mIoU (percent) over the classes with ground-truth pixels, and ``IoU-<name>`` for each of them.

    ``confusion[pred, gt]`` with a last row and column for ignored pixels, which are left out.
    """
    counts = confusion[:-1, :-1].astype(np.float64)
    tp = np.diag(counts)
    gt, pred = counts.sum(axis=0), counts.sum(axis=1)
    present = gt > 0
    iou = tp[present] / (gt + pred - tp)[present]
    res = {"mIoU": float(100 * iou.mean()) if present.any() else float("nan")}
    res.update({f"IoU-{class_names[i]}": float(100 * v) for i, v in zip(np.flatnonzero(present), iou)})
    return res


def score_sets(model: nn.Module, plan: SwapPlan, build_test_loader: Callable[[str], Iterable],
               distributed: bool = True) -> dict[str, float] | None:
    """Per set, the mIoU over its test datasets (their confusion counts summed); ``None`` on non-main processes.

    Every process must call it: each runs its shard of the test loaders.
    """
    scores: dict[str, Any] = {}
    ignore = plan.space.num_classes
    for name in SETS:
        evaluators = [SetSemSegEvaluator(d, plan.space.names, plan.label_table(d, [name], ignore), distributed)
                      for d in plan.test[name]]
        total = np.zeros_like(evaluators[0].confusion)
        for dataset, evaluator in zip(plan.test[name], evaluators):
            inference_on_dataset(model, build_test_loader(dataset), evaluator)
            total = total + evaluator.confusion  # the gathered counts, on the main process
        scores[name] = per_class_iou(total, plan.space.names)["mIoU"]
    return scores if comm.is_main_process() else None
