"""What the training loop shares with plugins: the run's context and the description of one step."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Step:
    """One optimizer step and where it sits in the run.

    A run is a sequence of periods (the single "train" period of plain training, or the phases of a swap),
    each of ``epochs`` epochs of ``steps_per_epoch`` steps.

    Args:
        batch: what ``compute_loss`` gets; any structure the step source chooses.
        period: the period's name.
        period_index: its index.
        epoch: the epoch within the period.
        epochs: the number of epochs in the period.
        step_in_epoch: the step within the epoch.
        steps_per_epoch: the steps in one epoch of the period.
        global_step: the number of steps before this one in the whole run.
        lr_epoch: the epoch the LR scheduler is stepped to at an epoch start (schedules stepped per epoch).
        lr_update: the updates done in the current LR schedule before this step: its position when the schedule
            is stepped per update (it restarts at 0 with each new schedule).
        new_lr_schedule: at a period start, ``(num_epochs, updates_per_epoch)`` of a scheduler to (re)build.
        reset_optimizer: at a period start, build a fresh optimizer (the current schedule moves onto it).
    """

    batch: Any
    period: str
    period_index: int
    epoch: int
    epochs: int
    step_in_epoch: int
    steps_per_epoch: int
    global_step: int
    lr_epoch: int
    lr_update: int
    new_lr_schedule: tuple[int, int] | None = None
    reset_optimizer: bool = False

    @property
    def starts_epoch(self) -> bool:
        return self.step_in_epoch == 0

    @property
    def starts_period(self) -> bool:
        return self.epoch == 0 and self.step_in_epoch == 0

    @property
    def ends_epoch(self) -> bool:
        return self.step_in_epoch == self.steps_per_epoch - 1

    @property
    def ends_period(self) -> bool:
        return self.ends_epoch and self.epoch == self.epochs - 1

    def position_after(self) -> dict[str, int]:
        """The position of the next step, as stored in a checkpoint written after this one."""
        period, epoch, step = self.period_index, self.epoch, self.step_in_epoch + 1
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
            if epoch == self.epochs:
                period, epoch = period + 1, 0
        return {"period_index": period, "epoch": epoch, "step_in_epoch": step, "global_step": self.global_step + 1}


@dataclass
class TrainContext:
    """The run as plugins see it. ``model`` is the unwrapped module; ``train_model`` may be its DDP wrapper."""

    args: argparse.Namespace
    device: torch.device
    rank: int = 0
    world_size: int = 1
    model: nn.Module | None = None
    train_model: nn.Module | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    loaders: dict[str, Any] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    output_dir: Path | None = None
    resume_state: dict[str, Any] | None = None
    total_steps: int | None = None
    log: Callable[[dict[str, float], int], None] = lambda metrics, step: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1
