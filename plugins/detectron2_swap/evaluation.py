"""Per-set semantic segmentation mIoU, the measure of a swap.

A set's score is the mean IoU of the set's classes over every labelled pixel of the set's test images: their
ground truth is read into the joint label space (``SwapPlan.score_table``), so a pixel predicted as any joint
class it does not belong to is a false positive of that class and a miss of its own. Painting one class
everywhere therefore scores low, and the score is what detectron2's ``SemSegEvaluator`` gives per class on the
same images in the joint label space (``export.export_test_sets`` writes them for the stock tools).

Periodic scores read a seeded subsample of each set (``SetScorer``, ``cfg.SWAP.EVAL_IMAGES``); the scores before
the swap and at phase ends read the whole sets. ``SetScoreEvaluator`` gives a set's score from the stock
evaluator's per-class IoU, when the user's trainer scores the swapped model's test sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from torch import nn

from kswap import SwapConfigError, score_key
from kswap.data import drawn_indices

from .config import PERIODIC_SCORE_IMAGES
from .plan import SETS, SwapPlan, read_label_ids, register_alias

# Under detectron2's logger, which default_setup (and so every train_net.py) gives its handlers.
logger = logging.getLogger(f"detectron2.{__name__}")


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


class SetScorer:
    """Per-set mIoU of a model over the whole test sets, or over a seeded subsample of each set.

    A set's subsample is at most ``subsample_images`` of its test datasets' images together, the same draw at every
    call, on every process and after a resume. Each dataset (or subsample of one) several sets are scored on is run
    once; its records, evaluator and test loader are built at its first scoring and reused (a loader that is a
    one-pass iterator is built again each time).

    Args:
        plan: the swap plan (test datasets per set, label tables).
        build_test_loader: the user's test loader of a dataset name (their mapper and batch size).
        distributed: gather the counts of every process; every process must call the scorer.
        subsample_images: the most images of a set a subsample scores (>= 1).
        seed: seed of the subsample draw.
    """

    def __init__(self, plan: SwapPlan, build_test_loader: Callable[[str], Iterable], distributed: bool = True,
                 subsample_images: int = PERIODIC_SCORE_IMAGES, seed: int = 0) -> None:
        if subsample_images < 1:
            raise SwapConfigError(f"cfg.SWAP.EVAL_IMAGES (the images of a set a periodic score reads) must be >= 1, "
                                  f"got {subsample_images!r}.")
        self.plan = plan
        self.build_test_loader = build_test_loader
        self.distributed = distributed
        self.subsample_images = subsample_images
        self.seed = seed
        self._records: dict[str, list[dict]] = {}
        self._subsamples: dict[tuple[str, tuple[int, ...]], str] = {}  # (dataset, its drawn records) -> alias
        self._source: dict[str, str] = {}  # alias -> dataset
        self._evaluators: dict[str, SetSemSegEvaluator] = {}
        self._loaders: dict[str, Iterable] = {}

    def __call__(self, model: nn.Module, sets: Sequence[str] = SETS,
                 subsample: bool = False) -> tuple[dict[str, float] | None, dict[str, int]]:
        """Per set of ``sets``, its mIoU (``None`` on non-main processes) and the number of images it read."""
        runs = {name: self._runs(name, subsample) for name in sets}
        confusion = {}
        for run in dict.fromkeys(r for by_set in runs.values() for r in by_set):
            evaluator = self._evaluator(run)
            inference_on_dataset(model, self._loader(run), evaluator)
            confusion[run] = evaluator.confusion  # the gathered counts, on the main process
        images = {name: sum(len(self.records(r)) for r in by_set) for name, by_set in runs.items()}
        if not comm.is_main_process():
            return None, images
        return {name: per_class_iou(sum(confusion[r] for r in by_set), self.plan.space.names,
                                    self.plan.sets[name])["mIoU"] for name, by_set in runs.items()}, images

    def records(self, dataset: str) -> list[dict]:
        """The registered records of ``dataset``, read once (a catalog function may list a directory)."""
        if dataset not in self._records:
            self._records[dataset] = DatasetCatalog.get(dataset)
        return self._records[dataset]

    def _runs(self, name: str, subsample: bool) -> list[str]:
        """The datasets set ``name`` is scored on: its test datasets, or registered subsamples of them."""
        datasets = self.plan.test[name]
        if not subsample:
            return list(datasets)
        sizes = [len(self.records(d)) for d in datasets]
        drawn = drawn_indices(sum(sizes), self.subsample_images, self.seed)
        runs, start = [], 0
        for dataset, size in zip(datasets, sizes, strict=True):
            picked = [i - start for i in drawn if start <= i < start + size]
            start += size
            if len(picked) == size:
                runs.append(dataset)
            elif picked:
                runs.append(self._register_subsample(dataset, picked))
        return runs

    def _register_subsample(self, dataset: str, picked: list[int]) -> str:
        """Register the records ``picked`` of ``dataset`` as a dataset (once), for the user's test loader."""
        key = (dataset, tuple(picked))
        if key not in self._subsamples:
            alias = self._subsamples[key] = f"{dataset}@swap:eval{len(self._subsamples)}"
            records = self._records[alias] = [self.records(dataset)[i] for i in picked]
            register_alias(dataset, alias, lambda: records)
            self._source[alias] = dataset
        return self._subsamples[key]

    def _evaluator(self, run: str) -> SetSemSegEvaluator:
        if run not in self._evaluators:
            table = self.plan.score_table(self._source.get(run, run))
            self._evaluators[run] = SetSemSegEvaluator(run, self.plan.space.names, table, self.distributed)
        return self._evaluators[run]

    def _loader(self, run: str) -> Iterable:
        if run in self._loaders:
            return self._loaders[run]
        loader = self.build_test_loader(run)
        if not isinstance(loader, Iterator):  # a DataLoader can be iterated again; a generator cannot
            self._loaders[run] = loader
        return loader


class SetScoreEvaluator(DatasetEvaluator):
    """The evaluator of a swapped test set (``export.export_test_sets``), e.g. the user's ``SemSegEvaluator``,
    with the set's score added to its results: the mean ``IoU-<class>`` over the set's classes, as the swap report
    scores it (``swap/<set>``: ``{"mIoU": ...}``, which detectron2's ``print_csv_format`` prints as a task).

    Args:
        evaluator: gives ``{"sem_seg": {"IoU-<class>": ...}}``.
        set_name: forget, retain or learn.
        classes: the set's class names.
    """

    def __init__(self, evaluator: DatasetEvaluator, set_name: str, classes: Sequence[str]) -> None:
        self.evaluator = evaluator
        self.set_name = set_name
        self.classes = list(classes)

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        self.evaluator.process(inputs, outputs)

    def evaluate(self) -> dict[str, dict[str, float]] | None:
        results = self.evaluator.evaluate()
        if results is None:  # not the main process
            return None
        iou = [results["sem_seg"][f"IoU-{name}"] for name in self.classes]
        present = [v for v in iou if not np.isnan(v)]
        score = float(np.mean(present)) if present else float("nan")
        logger.info(f"Swap: {self.set_name} mIoU {score:.2f}, the mean IoU of its classes {self.classes}")
        return {**results, score_key(self.set_name): {"mIoU": score}}


def score_sets(model: nn.Module, plan: SwapPlan, build_test_loader: Callable[[str], Iterable],
               distributed: bool = True, sets: Sequence[str] = SETS) -> dict[str, float] | None:
    """Per set of ``sets``, the mean IoU of its classes over its whole test datasets (their confusion counts
    summed); ``None`` on non-main processes. A dataset that several sets are scored on is run once.

    Every process must call it: each runs its shard of the test loaders.
    """
    return SetScorer(plan, build_test_loader, distributed)(model, sets)[0]
