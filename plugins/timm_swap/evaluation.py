"""Top-1 accuracy over a loader, summed across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from kswap import AccuracyMeter


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``loader``; each rank scores its shard, counts are summed."""
    was_training = model.training
    model.eval()
    meter = AccuracyMeter()
    for images, labels in loader:
        meter.update(model(images.to(device)).cpu(), labels)
    counts = torch.tensor([meter.correct, meter.total], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    if counts[1] == 0:
        raise ValueError("evaluate_top1: the evaluation set is empty.")
    return float(100.0 * counts[0] / counts[1])
