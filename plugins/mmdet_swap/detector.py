"""Turn a built mmdet DETR-style detector into a swapping one, in place.

The detector keeps its class, module tree and state-dict keys (only LoRA keys are added): it becomes an
instance of a subclass that computes the phase loss from per-role task losses and keeps LoRA as injected when
mmengine re-runs ``init_weights``.

A swap step runs the backbone, neck and transformer once over the merged role-tagged batch, as the detector's
own step runs them over one batch, and the head's loss once per role on that role's rows. Images are independent
rows there, except for what the detector's own step also shares across its batch:

* DINO's denoising layout: the number of denoising groups and each group's padding follow the largest object
  count of the merged batch (a role alone may get more groups), and the noise is one draw over the merged batch;
  ``dn_meta`` describes that layout for every row, so each role's rows keep it.
* BatchNorm with batch statistics (``norm_eval=False``; stock DINO freezes them): the merged batch's statistics
  normalise every role's images and update the running statistics once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kswap import (
    ROLE_KEY,
    GrownRows,
    PhaseLossOutput,
    extend_embedding,
    extend_head,
    lora_state_dict,
    loss_key,
    role_rows,
    sigmoid_prior_bias,
)
from kswap.losses import TaskLoss

# The phase-loss terms the detector returns beside its loss, under PhaseLoss's names (``retain/task``,
# ``forget/bounded``, ``group_sparse``): none contains "loss", as mmengine's parse_losses optimises every key that
# does; the swap loop then renames them to their log keys (``log_outputs``).
LOGGED_TERM_SUFFIXES = ("task", "bounded", "sparse")
# Head inputs of DINO / Deformable DETR (``forward_transformer``'s output) with the decoder layers first;
# every other tensor is batch-first, lists hold batch-first tensors (``references``).
LAYERS_FIRST = frozenset({"hidden_states"})


def logged_terms(terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The phase-loss terms to log (the task loss per role, the bounded forget loss, the group-sparse penalty)."""
    return {k: v for k, v in terms.items() if k.endswith(LOGGED_TERM_SUFFIXES)}


def log_outputs(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``train_step``'s outputs with the phase-loss terms under their log keys (``forget/task`` ->
    ``swap/loss/forget/task``)."""
    return {loss_key(k) if k.endswith(LOGGED_TERM_SUFFIXES) else k: v for k, v in outputs.items()}


def head_input_rows(head_inputs: Mapping[str, Any], rows: list[int]) -> dict[str, Any]:
    """The head inputs of the images ``rows`` of the batch (``dn_meta`` and ``None`` kept as they are)."""
    index = torch.tensor(rows)

    def take(value: torch.Tensor, dim: int) -> torch.Tensor:
        return value.index_select(dim, index.to(value.device))

    out: dict[str, Any] = {}
    for key, value in head_inputs.items():
        if isinstance(value, torch.Tensor):
            out[key] = take(value, 1 if key in LAYERS_FIRST else 0)
        elif isinstance(value, (list, tuple)):
            out[key] = [take(v, 0) for v in value]
        else:  # dn_meta: the denoising layout, the same for every row
            out[key] = value
    return out


PhaseLossFn = Callable[[Mapping[str, TaskLoss]], PhaseLossOutput]


class SwapDetectorMixin:
    """Mixed into the detector's own class. ``_swap_loss`` turns per-role task losses into the current phase's
    loss; batches carry each sample's role in ``metainfo['swap_role']``."""

    _swap_loss: PhaseLossFn

    def loss(self, batch_inputs: torch.Tensor, batch_data_samples: list) -> dict[str, torch.Tensor]:
        rows = role_rows([s.metainfo.get(ROLE_KEY) for s in batch_data_samples])
        if rows is None:  # not a swap batch (e.g. a plain fine-tuning run of the same model)
            return super().loss(batch_inputs, batch_data_samples)
        head_inputs = self.forward_transformer(self.extract_feat(batch_inputs), batch_data_samples)
        task = {role: self.bbox_head.loss(**head_input_rows(head_inputs, ids),
                                          batch_data_samples=[batch_data_samples[i] for i in ids])
                for role, ids in rows.items()}
        out = self._swap_loss(task)
        return {"loss": out.total, **logged_terms(out.terms)}

    def init_weights(self) -> None:
        # DETR init re-initialises every >1-D encoder/decoder tensor, LoRA included: put LoRA back as
        # ``inject_lora`` left it (B = 0; A as ``LoraSettings.reference_init`` asked).
        lora = {k: v.clone() for k, v in lora_state_dict(self).items()}
        super().init_weights()
        self.load_state_dict(lora, strict=False)


def make_swap_detector(detector: nn.Module, phase_loss: PhaseLossFn) -> None:
    """Give ``detector`` the swap loss, in place (its class becomes a subclass of its own class).

    Args:
        phase_loss: per-role task losses to the current step's phase loss (``SwapSession.phase_loss``: the
            phase's weights, its forget bound resolved, and the LoRA groups' sparsity).
    """
    base = type(detector)
    if not isinstance(detector, SwapDetectorMixin):
        detector.__class__ = type(f"Swap{base.__name__}", (SwapDetectorMixin, base), {})
    detector._swap_loss = phase_loss


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
