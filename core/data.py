"""Data plumbing shared by the hosts: a seeded, shardable, resumable sampler, a loader that never runs out, and
the role tags of a merged batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import Sampler

T = TypeVar("T")

# Where a host's sample of a merged batch carries its loss role (``retain``, ``learn``, ``forget``).
ROLE_KEY = "swap_role"


class ResumableSampler(Sampler[int]):
    """Shuffles with ``(seed, epoch)``, shards over ``world_size`` ranks and can start mid-epoch.

    The order depends only on the seed and the epoch, so a resumed run that skips the samples it already
    consumed sees exactly the batches the interrupted run would have seen.

    Args:
        length: the dataset size.
        shuffle: shuffle each epoch.
        seed: base seed of the shuffle.
        rank: this process's rank.
        world_size: the number of processes.
        pad: give every rank ``ceil(length / world_size)`` indices by repeating the first ones (training, as
            ``DistributedSampler``); without it the ranks split the indices exactly (evaluation).
    """

    def __init__(
        self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True
    ) -> None:
        if length < 1:
            raise ValueError("ResumableSampler over an empty dataset.")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.pad = pad
        self.per_rank = math.ceil(length / world_size) if pad else len(range(rank, length, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, n: int) -> None:
        """Start the current epoch after its first ``n`` samples (of this rank)."""
        self.start = n

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.pad:
            order += order[: self.per_rank * self.world_size - len(order)]
        mine = order[self.rank :: self.world_size]
        return iter(mine[self.start :])


class InfiniteLoader:
    """Cycle through ``loader``, starting a fresh pass (and a new sampler epoch) whenever one ends.

    The reference cycles the target loader this way while the retain-side loader sets the epoch length.
    With a ``ResumableSampler`` its position is part of ``state_dict`` and is restored exactly.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.epoch = 0
        self.consumed = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._it is None:
                sampler = getattr(self.loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(self.epoch)
                if self.consumed and hasattr(sampler, "skip"):
                    sampler.skip(self.consumed * self.loader.batch_size)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.consumed += 1
                return batch
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.consumed = 0
        raise RuntimeError("InfiniteLoader: the loader yields no batch (empty dataset?).")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None


def drawn_indices(n: int, limit: int, seed: int = 0) -> list[int]:
    """At most ``limit`` of ``range(n)`` in increasing order, a draw seeded with ``seed`` (all when ``n <= limit``):
    the images a probe or a periodic score sees when a set is larger than it needs."""
    if n <= limit:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def merge_role_batches(batches: Mapping[str, Sequence[T]], tag: Callable[[T, str], None]) -> list[T]:
    """The samples of one batch per loss role as one batch, in role order, each tagged by ``tag(sample, role)``
    (the host's way to put ``ROLE_KEY`` on a sample), so the model runs one step over them."""
    merged = []
    for role, samples in batches.items():
        for sample in samples:
            tag(sample, role)
            merged.append(sample)
    return merged


def role_rows(roles: Sequence[str | None]) -> dict[str, list[int]] | None:
    """Per loss role, in order of first appearance, the rows of a merged batch that carry it; ``None`` when a row
    carries none (a plain batch of the same model, which its own loss serves)."""
    if None in roles:
        return None
    rows: dict[str, list[int]] = {}
    for i, role in enumerate(roles):
        rows.setdefault(role, []).append(i)
    return rows
