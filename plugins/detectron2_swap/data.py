"""The swap's train loader: each step one batch per loss role of the current phase, from the user's own loaders.

Each role's loader is the user's ``build_train_loader`` (their mapper, augmentation and sampler) over the role's
datasets; the mapped samples' targets are then moved into the joint label space and restricted to the role's
target classes (``SwapPlan.target_sets``), so any mapper that returns ``sem_seg`` (and Mask2Former's per-class
``instances``) works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts

from kswap import ROLE_KEY, SwapSession, merge_role_batches

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


class RoleBatches:
    """A role's batches: the user's loader over the role's datasets, each sample's targets moved into the joint
    label space and restricted to the role's classes.

    Args:
        sources: the sets the role draws from (``("retain", "learn")``).
        loader: the user's train loader over the role's swap datasets (``swap_dataset_name``).
        tables: per source dataset, its label table (``SwapPlan.register_role_datasets``).
        ignore: the label of pixels outside the role's classes.
    """

    def __init__(self, sources: tuple[str, ...], loader: Iterable[list[dict]], tables: dict[str, np.ndarray],
                 ignore: int) -> None:
        self.sources = sources
        self.loader = loader
        self.tables = tables
        self.ignore = ignore

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.loader:
            yield [remap_sample(sample, self.tables[sample[SOURCE_KEY]], self.ignore) for sample in batch]


def tag_role(sample: dict, role: str) -> None:
    sample[ROLE_KEY] = role


class SwapDataLoader:
    """The trainer's data loader during a swap: each step one batch per loss role of the swap session's current
    phase, every sample tagged with its role.

    Args:
        plan: the swap plan (datasets, label tables, the ignore label of the targets).
        build_loader: builds the user's train loader over the given dataset names.

    ``role_loader`` builds a role's loader for the session; ``bind`` gives the session (a ``SwapHook`` binds its
    own) whose ``next_batches`` the trainer's steps draw.
    """

    def __init__(self, plan: SwapPlan, build_loader: BuildLoader) -> None:
        self.plan = plan
        self.build_loader = build_loader
        self.session: SwapSession | None = None

    def bind(self, session: SwapSession) -> None:
        self.session = session

    def role_loader(self, sources: tuple[str, ...]) -> RoleBatches:
        """The batches of a role that draws from ``sources`` (set names), from the user's loader."""
        tables = self.plan.register_role_datasets(sources)
        loader = self.build_loader(tuple(swap_dataset_name(d, sources) for d in tables))
        return RoleBatches(sources, loader, tables, self.plan.ignore_value)

    def __iter__(self) -> Iterator[list[dict]]:
        if self.session is None:
            raise RuntimeError("SwapDataLoader: a SwapHook binds it to its swap session before training.")
        while not self.session.done:
            yield merge_role_batches(self.session.next_batches(), tag_role)
