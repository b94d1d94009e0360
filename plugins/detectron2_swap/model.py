"""Turn a built detectron2 model into a swapping one, in place, before the optimizer and DDP see it.

The model keeps its class, module tree and state-dict keys (LoRA keys are added, peft keeps base weights under
``base_layer``): it becomes an instance of a subclass whose training ``forward`` takes a batch of samples tagged
with their loss role and returns the phase loss (``swap_state.loss``, the swap session's, set by ``SwapHook``) as
the only entry of its loss dict (detectron2 sums every value), logging each term through the event storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from detectron2.utils import events
from torch import nn

from kswap import (
    ROLE_KEY,
    GrownRows,
    SwapConfigError,
    adapt_model,
    check_head_size,
    extend_head,
    loss_key,
    replace_module,
    role_rows,
)
from kswap.losses import PhaseLossOutput, TaskLoss

from .plan import SwapPlan

# Under detectron2's logger, which default_setup (and so every train_net.py) gives its handlers.
logger = logging.getLogger(f"detectron2.{__name__}")

# The config key that sizes the class head of Mask2Former and of detectron2's semantic segmentation heads.
NUM_CLASSES_KEY = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"
# Mask2Former's classifier ends with a "no object" row; a SemanticSegmentor's 1x1 predictor has one row a class.
HEAD_CANDIDATES = (("sem_seg_head.predictor.class_embed", 1), ("sem_seg_head.predictor", 0))


@dataclass
class SwapModelState:
    """What the swap keeps on the model: the LoRA groups and layers, the grown rows, and the phase loss of per-role
    task losses (``SwapSession.phase_loss``, given by the ``SwapHook`` that drives the swap)."""

    groups: dict[str, list[nn.Parameter]]
    grown: dict[str, GrownRows]
    adapted: list[str]
    class_names: tuple[str, ...] = field(default=())
    loss: Callable[[Mapping[str, TaskLoss]], PhaseLossOutput] | None = None


def every_term(key: str) -> bool:
    """detectron2 optimises the sum of every value of a model's loss dict."""
    return True


class SwapModelMixin:
    """Mixed into the model's own class: a training batch whose samples carry ``swap_role`` gives the phase loss."""

    swap_state: SwapModelState

    def forward(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor] | list[dict]:
        rows = role_rows([x.get(ROLE_KEY) for x in batched_inputs])
        if not self.training or rows is None:  # inference, or a plain training batch of the same model
            return super().forward(batched_inputs)
        if self.swap_state.loss is None:
            raise RuntimeError("A swap batch reached a model without a swap session: register the SwapHook that "
                               "drives the swap (SwapTrainerMixin does) before training.")
        task = {role: super(SwapModelMixin, self).forward([batched_inputs[i] for i in ids])
                for role, ids in rows.items()}
        out = self.swap_state.loss(task)
        bad = [role for role in task if not torch.isfinite(out.terms[f"{role}/task"])]
        if bad:
            raise FloatingPointError(
                f"The {bad} task loss of this batch is not finite. A batch whose targets hold no pixel of the role's "
                "classes gives a NaN cross-entropy: check that cropping keeps those classes (or disable the crop), "
                "and that the datasets' stuff_classes name them."
            )
        if events._CURRENT_STORAGE_STACK:  # inside a trainer: log every term beside detectron2's own scalars
            storage = events.get_event_storage()
            storage.put_scalars(**{loss_key(k): v.item() for k, v in out.terms.items() if k != "total"})
        return {"loss_swap": out.total}


def find_class_head(model: nn.Module, name: str = "", trailing_rows: int = -1) -> tuple[str, nn.Module, int]:
    """The classifier to grow: ``name`` (or the first known one) and its trailing rows (``-1``: the known count)."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            raise SwapConfigError(f"cfg.SWAP.HEAD.NAME {name!r} is not a module of {type(model).__name__}.")
        candidates = [(name, dict(HEAD_CANDIDATES).get(name, 0))]
    else:
        candidates = [(n, t) for n, t in HEAD_CANDIDATES if n in modules]
        if not candidates:
            raise SwapConfigError(
                f"{type(model).__name__} has none of the known classifiers {[n for n, _ in HEAD_CANDIDATES]}: set "
                "cfg.SWAP.HEAD.NAME to the module whose output rows are the classes."
            )
    head_name, known_trailing = candidates[0]
    return head_name, modules[head_name], known_trailing if trailing_rows < 0 else trailing_rows


def extend_classes(model: nn.Module, head_name: str, trailing_rows: int, num_pretrained: int,
                   n_new: int) -> dict[str, GrownRows]:
    """Grow the classifier by ``n_new`` rows before its trailing rows (frozen, xavier, bias 0 as the reference),
    with everything sized by it: ``num_classes`` attributes and Mask2Former's ``empty_weight`` class weights.

    Returns:
        Per grown state-dict key, its ``GrownRows``, for growing checkpoints the same way.
    """
    head = model.get_submodule(head_name)
    rows = head.weight.shape[0]
    check_head_size(rows, num_pretrained, trailing_rows, where=head_name, fix=(
        f"Set {NUM_CLASSES_KEY} to {num_pretrained} (it is {rows - trailing_rows}): the classes the checkpoint was "
        f"trained on, the stuff_classes of DATASETS.TRAIN[0]; the swap adds the {n_new} new classes itself."))
    replace_module(model, head_name, extend_head(head, n_new, trailing_rows=trailing_rows))
    grow = GrownRows(rows, rows + n_new, trailing_rows)
    grown = {f"{head_name}.{p}": grow for p in ("weight", "bias") if getattr(head, p, None) is not None}
    for module_name, module in model.named_modules():
        if getattr(module, "num_classes", None) == num_pretrained:
            module.num_classes = num_pretrained + n_new
        weight = module._buffers.get("empty_weight")
        if weight is not None and weight.shape == (rows,):
            module.empty_weight = torch.cat([weight[: rows - trailing_rows], weight.new_ones(n_new),
                                             weight[rows - trailing_rows:]])
            grown[f"{module_name}.empty_weight" if module_name else "empty_weight"] = grow
    return grown


def prepare_swap_model(model: nn.Module, plan: SwapPlan, head_name: str = "", trailing_rows: int = -1) -> nn.Module:
    """Grow the class head, inject LoRA, freeze all but LoRA and give the model the swap loss, in place.

    Call it on the built model before the optimizer and DDP are created; load the pretrained weights after it
    with ``SwapCheckpointer`` (which grows and maps the checkpoint the same way).
    """
    name, _, trailing = find_class_head(model, head_name, trailing_rows)
    prepared = adapt_model(model, plan.config,
                           extend_classes(model, name, trailing, plan.space.num_pretrained, len(plan.space.new)))
    base = type(model)
    if not isinstance(model, SwapModelMixin):
        model.__class__ = type(f"Swap{base.__name__}", (SwapModelMixin, base), {})
    model.swap_state = SwapModelState(groups=prepared.groups, grown=prepared.grown, adapted=prepared.adapted,
                                      class_names=plan.space.names)
    rows = prepared.grown[f"{name}.weight"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"Swap: LoRA rank {plan.config.lora.rank} on {len(prepared.adapted)} linear layers in "
                f"{len(prepared.groups)} groups, {trainable} trainable parameters of {total}; {name} grown from "
                f"{rows.old} to {rows.new} outputs (new rows frozen).")
    return model
