"""The hooks of ``timm_swap.train``, at the natural points of a timm training run.

A plugin is any object with ``@hookimpl`` methods named like these specs, registered under the entry-point
group ``timm_swap.plugins`` and enabled with ``--plugin NAME``. Without a plugin the script trains a
classifier with cross-entropy over ``--epochs`` epochs and reports validation top-1, as timm's train.py.
A plugin that implements ``train_steps`` owns the run's data and schedule; ``firstresult`` hooks take the
first result that is not ``None``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .context import Step, TrainContext

PROJECT = "timm_swap"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's argument group; its flags also work as keys of the ``-c`` YAML config."""


@hookspec
def validate_args(args: argparse.Namespace) -> None:
    """Raise a clear error for bad input, before any model, data or output is touched."""


@hookspec
def configure_model(model: Any, ctx: TrainContext) -> None:
    """Adapt the model (LoRA, head extension, freezing) after its checkpoint is loaded and before the optimizer
    and DDP are built."""


@hookspec
def build_loaders(ctx: TrainContext) -> dict[str, Any] | None:
    """Build the loaders this plugin needs; the returned dict is merged into ``ctx.loaders``."""


@hookspec(firstresult=True)
def train_steps(ctx: TrainContext) -> Iterator[Step] | None:
    """Yield the training steps (a batch plus where it sits: period, epoch, step). Resumable from
    ``ctx.resume_state``. The default walks ``--epochs`` epochs of ``ctx.loaders['train']``."""


@hookspec(firstresult=True)
def compute_loss(ctx: TrainContext, step: Step) -> dict[str, Any] | None:
    """The step's loss: a dict with the tensor to back-propagate under ``'loss'`` and scalars to log."""


@hookspec
def on_period_start(ctx: TrainContext, step: Step) -> dict[str, float] | None:
    """A period (an epoch of plain training, a phase of a swap) starts with ``step``; metrics measured there (the
    swap's "before" scores) are returned, and logged like ``evaluate``'s at the step count before ``step``."""


@hookspec
def after_step(ctx: TrainContext, step: Step, losses: dict[str, float]) -> None:
    """Called after each optimizer step."""


@hookspec
def evaluate(ctx: TrainContext, step: Step) -> dict[str, float] | None:
    """Evaluate at the end of a period; the returned metrics are merged and logged."""


@hookspec
def state_dict(ctx: TrainContext) -> dict[str, Any] | None:
    """Extra state to checkpoint (tensors and primitives only), keyed by names of the plugin's own."""


@hookspec
def load_state_dict(ctx: TrainContext, state: dict[str, Any]) -> None:
    """Restore what ``state_dict`` returned (all plugins' keys merged), on ``--resume``."""


@hookspec
def on_train_end(ctx: TrainContext) -> None:
    """Training finished; write reports and exports."""
