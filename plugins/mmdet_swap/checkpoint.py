"""Local checkpoints of mmengine load under torch >= 2.6, where ``torch.load`` defaults to ``weights_only=True``;
the global random states a resumed swap restores.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, and its own checkpoints hold a message hub
(``HistoryBuffer`` objects and NumPy arrays), so ``load_from`` and ``resume`` fail on them. Rather than turning
the safety off, the local loader allows exactly those types: anything else in a file is still refused.
"""

from __future__ import annotations

import contextlib
import os.path as osp
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

# What mmengine's own checkpoints pickle besides tensors: its log buffers and the NumPy values in them
# (NumPy 2 pickles dtypes through getattr on its dtype classes).
MMENGINE_CHECKPOINT_GLOBALS: list[Any] = [
    HistoryBuffer, np.ndarray, np.dtype, np._core.multiarray._reconstruct, np._core.multiarray.scalar, getattr,
    *[getattr(np.dtypes, name) for name in np.dtypes.__all__],
]


def load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    """mmengine's local-file loader with ``weights_only=True`` and mmengine's own types allowed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(MMENGINE_CHECKPOINT_GLOBALS):
        return torch.load(filename, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def local_checkpoint_loader() -> Iterator[None]:
    """Local paths (``load_from``, ``resume``) served by ``load_local_checkpoint`` inside the block (a
    ``SwapHook`` run); mmengine's loader as it was after it."""
    previous = CheckpointLoader._schemes[""]  # mmengine's load_from_local, unless someone replaced it
    CheckpointLoader.register_scheme(prefixes="", force=True)(load_local_checkpoint)
    try:
        yield
    finally:
        CheckpointLoader.register_scheme(prefixes="", force=True)(previous)


def rng_states() -> dict[str, Any]:
    """The global random states a swap step draws from, as tensors and Python values (``weights_only`` loads them):
    torch's (DINO's denoising queries), NumPy's and Python's (the pipeline's random transforms, e.g. mmdet's
    ``RandomFlip`` and ``RandomChoice``, in the main process)."""
    numpy = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "numpy": {**numpy, "state": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                                         "pos": numpy["state"]["pos"]}},
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any] | torch.Tensor) -> None:
    """Restore ``rng_states()``; a bare tensor (a checkpoint of an earlier kswap) is torch's state alone."""
    if isinstance(states, torch.Tensor):
        torch.set_rng_state(states)
        return
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state({**numpy, "state": {"key": numpy["state"]["key"].numpy().astype(np.uint32),
                                            "pos": numpy["state"]["pos"]}})
    random.setstate(states["python"])
