"""Data plumbing shared by the hosts: a loader that never runs out."""

from __future__ import annotations

from typing import Any, Iterable, Iterator


class InfiniteLoader:
    """Cycle through ``loader``, starting a fresh pass (and a new sampler epoch) whenever one ends.

    The reference cycles the target loader this way while the retain-side loader sets the epoch length.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.epoch = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._it is None:
                sampler = getattr(self.loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise RuntimeError("InfiniteLoader: the loader yields no batch (empty dataset?).")
