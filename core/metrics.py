"""Per-set scores (forget, retain, learn) and the H-mean summary."""

from __future__ import annotations

from collections.abc import Mapping

import torch

SETS = ("forget", "retain", "learn")
# Which way each set should move: the forget score should fall, the others rise.
GOALS = {"forget": "down", "retain": "up", "learn": "up"}


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent over the joint label space."""
    if labels.numel() == 0:
        raise ValueError("top1_accuracy got an empty batch.")
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


class AccuracyMeter:
    """Running top-1 accuracy (percent) over batches."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += int((logits.argmax(dim=-1) == labels).sum())
        self.total += int(labels.numel())

    @property
    def value(self) -> float:
        if self.total == 0:
            raise ValueError("AccuracyMeter saw no samples.")
        return 100.0 * self.correct / self.total


def swap_hmean(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Harmonic mean of the forget drop, the retain score and the learn score (all in percent).

    A library extra (the reference computes no combined score): it is 0 when any of the three is 0 or the
    forget score did not drop.
    """
    parts = [before["forget"] - after["forget"], after["retain"], after["learn"]]
    if min(parts) <= 0:
        return 0.0
    return len(parts) / sum(1.0 / p for p in parts)
