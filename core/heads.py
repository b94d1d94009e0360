"""Grow a classifier (or a label embedding) by the rows of the new classes, keeping the old rows exact."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import SwapConfigError


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
    old_head: nn.Linear,
    n_new: int,
    *,
    trailing_rows: int = 0,
    init: str = "xavier_uniform",
    bias: float = 0.0,
    trainable: bool = False,
) -> nn.Linear:
    """A ``Linear(d, N_old + K [+ trailing])`` with the old rows copied bit for bit.

    Args:
        old_head: the pretrained classifier, ``N_old`` class rows then ``trailing_rows`` extra rows.
        n_new: the number ``K`` of new classes; their rows come after the old class rows.
        trailing_rows: rows kept last, such as Mask2Former's "no object" row.
        init: ``"xavier_uniform"`` (reference) or ``"zeros"`` for the new weight rows.
        bias: the new rows' bias (reference 0; ``sigmoid_prior_bias()`` for sigmoid heads).
        trainable: whether the head trains; the reference keeps it frozen.
    """
    _check_rows(old_head, old_head.out_features, n_new, trailing_rows)
    weight = torch.empty(n_new, old_head.in_features)
    if init == "xavier_uniform":
        nn.init.xavier_uniform_(weight)
    elif init == "zeros":
        weight.zero_()
    else:
        raise SwapConfigError(f"Unknown head init {init!r}; use 'xavier_uniform' or 'zeros'.")
    head = nn.Linear(old_head.in_features, old_head.out_features + n_new, bias=old_head.bias is not None)
    head.to(device=old_head.weight.device, dtype=old_head.weight.dtype)
    head.weight.copy_(_grown(old_head.weight, n_new, trailing_rows, weight))
    if old_head.bias is not None:
        head.bias.copy_(_grown(old_head.bias, n_new, trailing_rows, torch.full((n_new,), float(bias))))
    head.requires_grad_(trainable)
    return head


@torch.no_grad()
def extend_embedding(old: nn.Embedding, n_new: int, *, trailing_rows: int = 0, trainable: bool = False) -> nn.Embedding:
    """An embedding with ``n_new`` more rows (normal init, as ``nn.Embedding``) before the trailing rows."""
    _check_rows(old, old.num_embeddings, n_new, trailing_rows)
    new_rows = torch.randn(n_new, old.embedding_dim) * old.weight.std()
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


def check_head_size(head_rows: int, num_pretrained: int, trailing_rows: int = 0, where: str = "head") -> None:
    """Raise when a pretrained head does not have one row per pretrained class (plus its trailing rows)."""
    expected = num_pretrained + trailing_rows
    if head_rows != expected:
        extra = f" + {trailing_rows} trailing" if trailing_rows else ""
        raise SwapConfigError(
            f"The {where} has {head_rows} outputs but the pretrained label space has {num_pretrained} classes"
            f"{extra} = {expected}. Give the class list the checkpoint was trained with (or the right "
            "--num-classes)."
        )
