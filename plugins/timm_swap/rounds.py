"""The next round of a swap: ``--initial-checkpoint`` a swap's ``model_swapped.pth``, read for its classes and
rounds, checked against the folders that hold their images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kswap import SwapConfigError, SwapRound, rounds_of


@dataclass(frozen=True)
class PreviousRound:
    """What a swapped checkpoint says about itself.

    Args:
        classes: its classes, one per head row: the first round's pretrained classes, then each round's new ones.
        rounds: the rounds it went through, the last one its own.
    """

    classes: tuple[str, ...]
    rounds: list[SwapRound]


def previous_round(checkpoint: str | None, base: list[str], learn_classes: list[str],
                   learn_root: Path) -> PreviousRound | None:
    """The round a swapped ``checkpoint`` ended (``None`` for any other checkpoint).

    Args:
        base: the classes of ``--data-dir``, which must be the swapped model's first classes.
        learn_classes: the class folders of ``--swap-learn-dir`` (at ``learn_root``), which must hold the classes
            earlier rounds learned: the next round retains and scores them.
    """
    if not checkpoint:
        return None
    try:  # mmap: only the small metadata is read, not the weights.
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours (which load with weights_only): timm's train.py pickles its args, or safetensors
        return None
    if not isinstance(saved, dict) or "class_names" not in saved:
        return None
    classes = tuple(map(str, saved["class_names"]))
    rounds = rounds_of(saved)
    done = f"--initial-checkpoint {checkpoint} is round {len(rounds) or '?'} of a swap over {list(classes)}"
    if list(classes[: len(base)]) != base:
        raise SwapConfigError(f"{done}, but --data-dir has the classes {base}: give the --data-dir the first round "
                              f"swapped (its classes are {list(classes[: len(base)])} ...).")
    missing = [c for c in classes[len(base):] if c not in learn_classes]
    if missing:
        raise SwapConfigError(f"{done}; the classes it learned {missing} are not class folders of {learn_root}: put "
                              "their images there (--swap-learn-dir), the next round retains and scores them.")
    return PreviousRound(classes, rounds)
