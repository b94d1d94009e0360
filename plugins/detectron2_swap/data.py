"""The swap's train loader: each step one batch per loss role of the current phase, from the user's own loaders.

Each role's loader is the user's ``build_train_loader`` (their mapper, augmentation and sampler) over the role's
datasets; the mapped samples' targets are then moved into the joint label space and restricted to the role's
target classes (``SwapPlan.target_sets``), so any mapper that returns ``sem_seg`` (and Mask2Former's per-class
``instances``) works unchanged.

Each role's batches are a ``SeededStream``: drawn with random generators of their own and replayed on resume, so
an interrupted and resumed swap trains on the batches an uninterrupted one does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.utils import comm

from kswap import ROLE_KEY, SwapConfigError, SwapSession, merge_role_batches

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


RngState = tuple[Any, Any, torch.Tensor]


def global_rng_state() -> RngState:
    """The global generators a data pipeline draws from: Python's, NumPy's and torch's CPU one."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_global_rng_state(state: RngState) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


class SeededStream:
    """The batches of a loader built by ``build``, drawn with random generators of their own; resumable.

    The loader is built, iterated and drawn from with the global generators set to the stream's:
    detectron2's ``TrainingSampler`` takes its order's seed from NumPy's (``comm.shared_random_seed``), a
    ``DataLoader`` its workers' seeds from torch's, and a mapper run in the main process draws its augmentations
    from all three. The batches therefore depend on ``seed`` and their count alone, not on the model's draws in
    between. A loaded stream draws and drops the batches the saved one had drawn (as mmengine's loops skip the
    iterations done), then goes on as it would have.

    Args:
        build: builds the loader (an infinite iterable of batches, as detectron2's train loaders are).
        seed: the seed of the stream's generators (below 2**32).
    """

    def __init__(self, build: Callable[[], Iterable[list[dict]]], seed: int) -> None:
        outer = global_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds the GPUs' generators too
        try:
            self.loader = build()
        finally:
            self._start = self._rng = global_rng_state()
            set_global_rng_state(outer)
        self.drawn = 0
        self._skip = 0
        self._it: Iterator[list[dict]] | None = None

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        outer = global_rng_state()
        set_global_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = global_rng_state()
            set_global_rng_state(outer)

    def __iter__(self) -> SeededStream:
        return self

    def __next__(self) -> list[dict]:
        with self._own_rng():
            if self._it is None:
                self._it = iter(self.loader)
            for _ in range(self._skip):
                next(self._it)
            self._skip = 0
            batch = next(self._it)
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Go on after the ``state["drawn"]`` batches of the saved stream (load it before drawing from it: a
        loader that groups images by aspect ratio keeps the ones it drew but did not batch)."""
        self.drawn = self._skip = int(state["drawn"])
        self._rng, self._it = self._start, None


def stream_seed(seed: int, index: int) -> int:
    """The seed of a swap's ``index``-th stream on this process, from the swap's ``seed``."""
    return int(np.random.SeedSequence([seed, index, comm.get_rank()]).generate_state(1)[0])


class RoleBatches:
    """A role's batches: the user's loader over the role's datasets, each sample's targets moved into the joint
    label space and restricted to the role's classes.

    Args:
        sources: the sets the role draws from (``("retain", "learn")``).
        loader: the batches of the user's train loader over the role's swap datasets (``swap_dataset_name``).
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
        seed: the seed of the role loaders' order and augmentations (each a ``SeededStream``).

    ``role_loader`` builds a role's loader for the session; ``bind`` gives the session (a ``SwapHook`` binds its
    own) whose ``next_batches`` the trainer's steps draw. ``state_dict`` holds the role loaders' positions.
    """

    def __init__(self, plan: SwapPlan, build_loader: BuildLoader, seed: int = 0) -> None:
        self.plan = plan
        self.build_loader = build_loader
        self.seed = seed
        self.streams: list[SeededStream] = []
        self.session: SwapSession | None = None

    def bind(self, session: SwapSession) -> None:
        self.session = session

    def role_loader(self, sources: tuple[str, ...]) -> RoleBatches:
        """The batches of a role that draws from ``sources`` (set names), from the user's loader."""
        tables = self.plan.register_role_datasets(sources)
        names = tuple(swap_dataset_name(d, sources) for d in tables)
        stream = SeededStream(lambda: self.build_loader(names), stream_seed(self.seed, len(self.streams)))
        self.streams.append(stream)
        return RoleBatches(sources, stream, tables, self.plan.ignore_value)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise SwapConfigError(f"The checkpoint's swap drew its batches with seed {state['seed']}, this run with "
                                  f"{self.seed}: set SEED to {state['seed']} to resume it.")
        for stream, saved in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(saved)

    def __iter__(self) -> Iterator[list[dict]]:
        if self.session is None:
            raise RuntimeError("SwapDataLoader: a SwapHook binds it to its swap session before training.")
        while not self.session.done:
            yield merge_role_batches(self.session.next_batches(), tag_role)
