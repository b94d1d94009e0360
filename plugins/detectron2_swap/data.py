"""The swap's train loader: each step one batch per loss role of the current phase, from the user's own loaders.

Each role's loader is the user's ``build_train_loader`` (their mapper, augmentation and sampler) over the role's
datasets; the mapped samples' targets are then moved into the joint label space and restricted to the role's
target classes (``SwapPlan.target_sets``), so any mapper that returns ``sem_seg`` (and Mask2Former's per-class
``instances``) works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts

from kswap import PhaseScheduler

from .model import ROLE_KEY
from .plan import SOURCE_KEY, SwapPlan, swap_dataset_name

BuildLoader = Callable[[tuple[str, ...]], Iterable[list[dict]]]


def remap_sample(sample: dict, table: np.ndarray, ignore: int) -> dict:
    """Map a mapped sample's ``sem_seg`` and ``instances.gt_classes`` through ``table``, in place; instances whose
    class maps to ``ignore`` are dropped."""
    lookup = torch.as_tensor(table)
    if "sem_seg" in sample:
        sem_seg = sample["sem_seg"]
        sample["sem_seg"] = lookup[sem_seg.long().clamp(0, len(table) - 1)].to(sem_seg.dtype)
    instances = sample.get("instances")
    if instances is not None and instances.has("gt_classes"):
        classes = lookup[instances.gt_classes.long()]
        kept = instances[classes != ignore]
        kept.gt_classes = classes[classes != ignore]
        sample["instances"] = kept
    return sample


class DetectionRoleLoader:
    """Builds a role's loader with ``build_detection_train_loader`` and a given mapper: the ``build_loader`` of a
    ``SwapDataLoader`` in a LazyConfig, where there is no trainer class to ask.

    Example:
        dataloader.train = L(SwapDataLoader)(plan=swap_plan, build_loader=L(DetectionRoleLoader)(
            mapper=L(DatasetMapper)(is_train=True, augmentations=[...], image_format="BGR"), total_batch_size=16))
    """

    def __init__(self, mapper: Callable[[dict], dict], total_batch_size: int, num_workers: int = 0) -> None:
        self.mapper = mapper
        self.total_batch_size = total_batch_size
        self.num_workers = num_workers

    def __call__(self, datasets: tuple[str, ...]) -> Iterable[list[dict]]:
        return build_detection_train_loader(get_detection_dataset_dicts(list(datasets)), mapper=self.mapper,
                                            total_batch_size=self.total_batch_size, num_workers=self.num_workers)


class SwapDataLoader:
    """An endless iterable of training batches that follows the swap's phases.

    Args:
        plan: the swap plan (datasets, label tables, the ignore label of the targets).
        build_loader: builds the user's train loader over the given dataset names.

    ``bind`` gives it the scheduler whose current phase decides the roles of the next batch; role loaders are
    built the first time a phase needs them.
    """

    def __init__(self, plan: SwapPlan, build_loader: BuildLoader) -> None:
        self.plan = plan
        self.build_loader = build_loader
        self.scheduler: PhaseScheduler | None = None
        self._roles: dict[tuple[str, ...], Iterator[list[dict]]] = {}

    def bind(self, scheduler: PhaseScheduler) -> None:
        self.scheduler = scheduler

    def _role_batches(self, sources: tuple[str, ...]) -> Iterator[list[dict]]:
        tables = self.plan.register_role_datasets(sources)
        for batch in self.build_loader(tuple(swap_dataset_name(d, sources) for d in tables)):
            yield [remap_sample(sample, tables[sample[SOURCE_KEY]], self.plan.ignore_value) for sample in batch]

    def __iter__(self) -> Iterator[list[dict]]:
        if self.scheduler is None:
            raise RuntimeError("SwapDataLoader: bind(scheduler) before iterating.")
        while not self.scheduler.done:
            batch: list[dict[str, Any]] = []
            for role, sources in self.scheduler.phase.sources.items():
                if sources not in self._roles:
                    self._roles[sources] = self._role_batches(sources)
                for sample in next(self._roles[sources]):
                    sample[ROLE_KEY] = role
                    batch.append(sample)
            yield batch
