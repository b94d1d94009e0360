"""Turn a built mmdet DETR-style detector into a swapping one, in place.

The detector keeps its class, module tree and state-dict keys (only LoRA keys are added): it becomes an
instance of a subclass that computes the phase loss from per-role task losses and re-zeroes LoRA after
mmengine re-runs ``init_weights``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from kswap import (
    GrownRows,
    PhaseLoss,
    extend_embedding,
    extend_head,
    group_sparse_loss,
    reinit_lora_,
    sigmoid_prior_bias,
)

ROLE_KEY = "swap_role"


class SwapDetectorMixin:
    """Mixed into the detector's own class. ``_swap_phase`` returns the current phase (its loss weights) and
    ``_swap_groups`` the LoRA groups; batches carry each sample's role in ``metainfo['swap_role']``."""

    _swap_phase: Callable[[], Any]
    _swap_groups: dict[str, list[nn.Parameter]]

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples: list) -> dict[str, torch.Tensor]:
        roles = [s.metainfo.get(ROLE_KEY) for s in batch_data_samples]
        if None in roles:  # not a swap batch (e.g. a plain fine-tuning run of the same model)
            return super().loss(batch_inputs, batch_data_samples)
        task = {}
        for role in dict.fromkeys(roles):
            idx = [i for i, r in enumerate(roles) if r == role]
            task[role] = super().loss(batch_inputs[idx], [batch_data_samples[i] for i in idx])
        out = PhaseLoss(self._swap_phase().loss)(task, gs=group_sparse_loss(self._swap_groups))
        # mmengine optimises keys containing "loss" and logs the rest.
        logged = {k.replace("/", "_"): v for k, v in out.terms.items() if k.endswith(("task", "bounded", "sparse"))}
        return {"loss": out.total, **logged}

    def init_weights(self) -> None:
        super().init_weights()
        # DETR init re-initialises every >1-D encoder/decoder tensor, LoRA included: restore B = 0.
        reinit_lora_(self)


def make_swap_detector(detector: nn.Module, phase: Callable[[], Any], groups: dict[str, list[nn.Parameter]]) -> None:
    """Give ``detector`` the swap loss, in place (its class becomes a subclass of its own class)."""
    base = type(detector)
    if not isinstance(detector, SwapDetectorMixin):
        detector.__class__ = type(f"Swap{base.__name__}", (SwapDetectorMixin, base), {})
    detector._swap_phase = phase
    detector._swap_groups = groups


def extend_dino_classes(detector: nn.Module, n_new: int) -> dict[str, GrownRows]:
    """Grow DINO's sigmoid classifiers and denoising label embedding by ``n_new`` classes (old rows exact, new
    rows: xavier weights as the reference and the focal-loss prior bias; new label embeddings normal).

    Returns:
        Per grown parameter name, its ``GrownRows``, for growing checkpoints the same way.
    """
    head = detector.bbox_head
    grown = {}
    for i, branch in enumerate(head.cls_branches):
        old = branch if isinstance(branch, nn.Linear) else branch[-1]
        new = extend_head(old, n_new, init="xavier_uniform", bias=sigmoid_prior_bias(0.01))
        if isinstance(branch, nn.Linear):
            head.cls_branches[i] = new
        else:
            branch[-1] = new
        prefix = f"bbox_head.cls_branches.{i}" + ("" if isinstance(branch, nn.Linear) else f".{len(branch) - 1}")
        grown[f"{prefix}.weight"] = grown[f"{prefix}.bias"] = GrownRows(old.out_features, new.out_features)
    head.num_classes += n_new
    head.cls_out_channels += n_new
    generator = getattr(detector, "dn_query_generator", None)
    if generator is not None:
        old = generator.label_embedding
        generator.label_embedding = extend_embedding(old, n_new)
        generator.num_classes += n_new
        grown["dn_query_generator.label_embedding.weight"] = GrownRows(old.num_embeddings, old.num_embeddings + n_new)
    return grown
