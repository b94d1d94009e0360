"""Grow a classifier (or a label embedding) by the rows of the new classes, keeping the old rows exact."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointMismatchError, SwapConfigError


def sigmoid_prior_bias(prior_prob: float = 0.01) -> float:
    """The bias whose sigmoid is ``prior_prob``: how focal-loss heads such as DINO's initialise class rows."""
    return -math.log((1 - prior_prob) / prior_prob)


@torch.no_grad()
def _grown(old: torch.Tensor, n_new: int, trailing_rows: int, new_rows: torch.Tensor) -> torch.Tensor:
    """``old`` with ``new_rows`` inserted before its last ``trailing_rows`` rows."""
    n_old = old.shape[0] - trailing_rows
    return torch.cat([old[:n_old], new_rows.to(old), old[n_old:]], dim=0)


def _check_rows(module: nn.Module, rows: int, n_new: int, trailing_rows: int) -> None:
    if n_new < 1:
        raise SwapConfigError(f"A head grows by at least one class, got n_new={n_new}.")
    if not 0 <= trailing_rows < rows:
        raise SwapConfigError(f"trailing_rows={trailing_rows} does not fit {type(module).__name__} with {rows} rows.")


@torch.no_grad()
def extend_head(
    old_head: nn.Linear | nn.Conv2d,
    n_new: int,
    *,
    trailing_rows: int = 0,
    init: str = "xavier_uniform",
    bias: float = 0.0,
    trainable: bool = False,
    new_weight: torch.Tensor | None = None,
) -> nn.Linear | nn.Conv2d:
    """A copy of a classifier with ``K`` more output rows; the old rows are copied bit for bit.

    Works for ``nn.Linear`` and ``nn.Conv2d`` classifiers (a segmentation head's 1x1 predictor) and their
    subclasses, whose type and other attributes the copy keeps.

    Args:
        old_head: the pretrained classifier, ``N_old`` class rows then ``trailing_rows`` extra rows.
        n_new: the number ``K`` of new classes; their rows come after the old class rows.
        trailing_rows: rows kept last, such as Mask2Former's "no object" row.
        init: ``"xavier_uniform"`` (reference) or ``"zeros"`` for the new weight rows.
        bias: the new rows' bias (reference 0; ``sigmoid_prior_bias()`` for sigmoid heads).
        trainable: whether the head trains; the reference keeps it frozen.
        new_weight: the new rows themselves (e.g. ``imprinted_rows``), instead of ``init``.
    """
    if isinstance(old_head, nn.Conv2d):
        if old_head.groups != 1:
            raise SwapConfigError(f"Cannot extend a grouped convolution ({old_head}) as a classifier.")
        size_attr = "out_channels"
    elif isinstance(old_head, nn.Linear):
        size_attr = "out_features"
    else:
        raise SwapConfigError(f"extend_head takes an nn.Linear or nn.Conv2d classifier, got {type(old_head).__name__}.")
    rows = old_head.weight.shape[0]
    _check_rows(old_head, rows, n_new, trailing_rows)
    old_weight = old_head.weight
    weight = torch.empty(n_new, *old_weight.shape[1:], device=old_weight.device, dtype=old_weight.dtype)
    if new_weight is not None:
        if new_weight.numel() != weight.numel():
            raise SwapConfigError(f"new_weight has shape {tuple(new_weight.shape)}; the {n_new} new rows need "
                                  f"{tuple(weight.shape)}.")
        weight.copy_(new_weight.reshape(weight.shape))
    elif init == "xavier_uniform":
        nn.init.xavier_uniform_(weight)
    elif init == "zeros":
        weight.zero_()
    else:
        raise SwapConfigError(f"Unknown head init {init!r}; use 'xavier_uniform' or 'zeros'.")
    head = copy.deepcopy(old_head)
    head.weight = nn.Parameter(_grown(old_head.weight, n_new, trailing_rows, weight))
    if old_head.bias is not None:
        new_bias = torch.full((n_new,), float(bias), device=old_head.bias.device, dtype=old_head.bias.dtype)
        head.bias = nn.Parameter(_grown(old_head.bias, n_new, trailing_rows, new_bias))
    setattr(head, size_attr, rows + n_new)
    head.requires_grad_(trainable)
    return head


@torch.no_grad()
def imprinted_rows(old_weight: torch.Tensor, class_features: torch.Tensor, *, trailing_rows: int = 0) -> torch.Tensor:
    """New classifier rows imprinted from the new classes' features (Qi et al., "Low-Shot Learning with
    Imprinted Weights", CVPR 2018): each row is its class's mean feature direction, scaled to the mean norm of
    the old class rows, so a new class starts where its images are instead of at a random direction.

    Args:
        old_weight: the pretrained classifier's weight, ``(N_old + trailing_rows, D)`` (a 1x1 conv's
            ``(N, D, 1, 1)`` too).
        class_features: ``(K, D)``, per new class the mean of its images' pre-logit features.
        trailing_rows: rows of ``old_weight`` that are not classes (such as "no object"), left out of the norm.
    """
    rows = old_weight.flatten(1)[: old_weight.shape[0] - trailing_rows]
    if class_features.dim() != 2 or class_features.shape[1] != rows.shape[1]:
        raise SwapConfigError(f"class_features must be (K, {rows.shape[1]}), got {tuple(class_features.shape)}.")
    direction = nn.functional.normalize(class_features.to(rows), dim=1)
    return direction * rows.norm(dim=1).mean()


@torch.no_grad()
def extend_embedding(old: nn.Embedding, n_new: int, *, trailing_rows: int = 0, trainable: bool = False) -> nn.Embedding:
    """An embedding with ``n_new`` more rows (normal init, as ``nn.Embedding``) before the trailing rows."""
    _check_rows(old, old.num_embeddings, n_new, trailing_rows)
    # Built on the old weights' device and dtype: a GPU (or meta) model never mixes devices.
    new_rows = torch.randn(n_new, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    new_rows *= old.weight.std()
    emb = nn.Embedding(old.num_embeddings + n_new, old.embedding_dim, padding_idx=old.padding_idx)
    emb.to(device=old.weight.device, dtype=old.weight.dtype)
    emb.weight.copy_(_grown(old.weight, n_new, trailing_rows, new_rows))
    emb.requires_grad_(trainable)
    return emb


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` inside ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def check_head_size(head_rows: int, num_pretrained: int, trailing_rows: int = 0, where: str = "head",
                    fix: str = "") -> None:
    """Raise when a pretrained head does not have one row per pretrained class (plus its trailing rows); ``fix``
    (e.g. the host's config key and value) replaces the generic advice."""
    expected = num_pretrained + trailing_rows
    if head_rows != expected:
        rows = f"{expected} outputs ({num_pretrained} classes + {trailing_rows} trailing)" if trailing_rows \
            else f"{expected} outputs"
        raise SwapConfigError(
            f"The {where} has {head_rows} outputs, but {num_pretrained} pretrained classes need {rows}. " + (
                fix or "Give the class list the checkpoint was trained with, or build the model with that many "
                "classes.")
        )


@dataclass(frozen=True)
class GrownRows:
    """How a parameter or buffer of a head grew: ``old`` rows became ``new`` rows, the last ``trailing`` of
    them (such as a "no object" row) kept last."""

    old: int
    new: int
    trailing: int = 0


@torch.no_grad()
def grow_checkpoint_rows(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
                         grown: dict[str, GrownRows]) -> list[str]:
    """Give a pretrained checkpoint's class rows the model's new rows, so it loads into the grown heads.

    Args:
        state: the checkpoint's state dict, changed in place.
        model_state: the grown model's state dict (the new rows are taken from it).
        grown: per grown key, its ``GrownRows``.

    Returns:
        The keys that were grown (a checkpoint already grown, such as a resume, is left as it is).
    """
    done = []
    for key, rows in grown.items():
        if key in state and state[key].shape[0] == rows.old:
            n_new = rows.new - rows.old
            new_rows = model_state[key][rows.old - rows.trailing: rows.new - rows.trailing]
            state[key] = _grown(state[key], n_new, rows.trailing, new_rows)
            done.append(key)
    return done


def check_checkpoint_rows(state: Mapping[str, torch.Tensor], grown: Mapping[str, GrownRows], hint: str = "",
                          grown_ok: bool = True) -> None:
    """Refuse a checkpoint whose class rows are neither the pretrained nor (with ``grown_ok``) the grown count,
    naming the pretrained size (a shape check after growing would compare it with the grown head's, which means
    nothing to the user).

    Args:
        hint: the host's way to fix it, appended to the message.
        grown_ok: accept the grown count (the swap's own resume checkpoints); ``False`` where the checkpoint must be
            the pretrained model, so that a swapped model (as many rows as the grown head) is not swapped again
            unnoticed.
    """
    for key, rows in grown.items():
        if key not in state or state[key].shape[0] == rows.old or (grown_ok and state[key].shape[0] == rows.new):
            continue
        classes = rows.old - rows.trailing
        trailing = f"{classes} + {rows.trailing} trailing = " if rows.trailing else ""
        more = " (more rows than the pretrained classes: a swapped model?)" if state[key].shape[0] > rows.old else ""
        raise CheckpointMismatchError(
            f"The checkpoint's {key} has {state[key].shape[0]} rows, but the pretrained label space has {classes} "
            f"classes ({trailing}{rows.old} rows){more}. {hint}".rstrip())


def _hide_rows_hook(dim: int, rows: GrownRows):
    start, n_new = rows.old - rows.trailing, rows.new - rows.old

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # Far below any real logit, yet finite: softmax gives 0, sigmoid 0, argmax/top-k never pick it.
        output = output.clone()
        output.narrow(dim, start, n_new).fill_(torch.finfo(output.dtype).min / 4)
        return output

    return hook


@contextmanager
def hidden_new_classes(model: nn.Module, grown: Mapping[str, GrownRows]) -> Iterator[None]:
    """Inside the block the grown model predicts exactly as the pretrained one did: "before" scores.

    Every grown classifier (an ``nn.Linear`` or ``nn.Conv2d`` named by a ``<module>.weight`` key of ``grown``)
    gets its new-class outputs pushed far below any real logit, so softmax, sigmoid, argmax and top-k treat
    them as absent while the old rows are the pretrained ones. Grown embeddings and buffers are inputs, not
    outputs, and stay as they are. LoRA must still be at its zero initialisation for this to be the pretrained
    model.

    Args:
        model: the grown model (unwrapped: the keys of ``grown`` are relative to it).
        grown: per grown state-dict key, its ``GrownRows`` (what the host's head growth returned).
    """
    handles = []
    try:
        for key, rows in grown.items():
            name, _, param = key.rpartition(".")
            module = model.get_submodule(name) if name else model
            if param != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            dim = -1 if isinstance(module, nn.Linear) else 1
            handles.append(module.register_forward_hook(_hide_rows_hook(dim, rows)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, a list holding the first tensor input of ``module``'s latest forward (e.g. a classifier's
    features), gradient attached: a forward pre-hook, removed on exit."""
    seen: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple) -> None:
        seen[:] = [next(a for a in args if isinstance(a, torch.Tensor))]

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
