"""The swap losses: bounded forgetting, group sparsity, and the per-phase combination of host task losses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import LossWeights

TaskLoss = torch.Tensor | Mapping[str, torch.Tensor]


def bounded_forget_loss(task_loss_forget: torch.Tensor, bnd: float | torch.Tensor, beta: float) -> torch.Tensor:
    """``beta · relu(bnd − L_F)``: gradient ascent on the forget-set loss that stops once it reaches ``bnd``."""
    return beta * torch.relu(bnd - task_loss_forget)


def group_sparse_loss(groups: Mapping[str, Iterable[torch.Tensor]] | Iterable[Iterable[torch.Tensor]]) -> torch.Tensor:
    """``Σ_g ||concat(g)||_2``: the sum over groups of the L2 norm of all of a group's LoRA tensors.

    No per-group weight and no normalisation by the number of groups, as in GS-LoRA and the reference.
    """
    tensors = groups.values() if isinstance(groups, Mapping) else groups
    norms = []
    for group in tensors:
        squares = [p.pow(2).sum() for p in group]
        if squares:
            # sqrt of a sum of squares has an infinite gradient at 0; clamp keeps an all-zero group finite.
            norms.append(torch.stack(squares).sum().clamp_min(1e-12).sqrt())
    if not norms:
        raise ValueError("group_sparse_loss got no LoRA tensors: inject LoRA before building the loss.")
    return torch.stack(norms).sum()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) || softmax(student/T))`` averaged over the batch (Hinton et al.).

    Args:
        student: logits being trained, ``(N, C)``.
        teacher: logits to keep, ``(N, C)``; no gradient flows into them.
        temperature: softening temperature ``T``.
    """
    t = temperature
    target = torch.log_softmax(teacher.detach().float() / t, dim=-1)
    log_p = torch.log_softmax(student.float() / t, dim=-1)
    return t * t * torch.nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean")


def feature_mmd_loss(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """Squared maximum mean discrepancy between the forget and the retain batch's features (Gretton et al.).

    Gaussian kernels at 1/4, 1 and 4 times the median squared distance of the two batches (the median heuristic,
    so the term needs no bandwidth setting); the biased estimator. No gradient flows into ``retain``: the forget
    features move into the retain features' distribution, not the other way.

    Args:
        forget: features of the forget images, ``(N, ...)``.
        retain: features of the retain-side images, ``(M, ...)``.
    """
    x, y = forget.float().flatten(1), retain.detach().float().flatten(1)
    z = torch.cat([x, y])
    squares = z.pow(2).sum(1)
    # ||a - b||² expanded: torch.cdist has no finite gradient at the zero distances of the diagonal.
    dist = (squares[:, None] + squares[None] - 2 * z @ z.T).clamp_min(0)
    scale = dist.detach()[dist.detach() > 0].median()
    kernel = sum(torch.exp(-dist / (scale * s)) for s in (0.25, 1.0, 4.0))
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def default_loss_key(key: str) -> bool:
    """mmengine's rule: a term is optimised when its key contains ``'loss'``."""
    return "loss" in key


def sum_task_loss(losses: TaskLoss, is_loss: Callable[[str], bool] = default_loss_key) -> torch.Tensor:
    """The task loss of one batch: a tensor as is, or the sum of the loss terms of a host loss dict.

    As mmengine's ``parse_losses``: a multi-element term counts as its mean, and a list of tensors (per-level
    losses) as the sum of their means.
    """
    if isinstance(losses, torch.Tensor):
        return losses
    terms = []
    for key, value in losses.items():
        if not is_loss(key):
            continue
        if isinstance(value, torch.Tensor):
            terms.append(value.mean())
        else:
            terms.append(torch.stack([v.mean() for v in value]).sum())
    if not terms:
        raise ValueError(f"The loss dict {sorted(losses)} holds no loss term (keys selected by {is_loss.__name__}).")
    return torch.stack(terms).sum()


@dataclass
class PhaseLossOutput:
    """The total loss to back-propagate and every term, detached, for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class PhaseLoss:
    """Combines the host's task losses of one step into the phase loss.

    ``total = w_R·T(R) + w_L·T(L) + beta·relu(bnd − T(F)) + alpha·GS`` (+ ``distill·D`` and
    ``feature_mmd·MMD`` when the host passes those terms); a role missing from ``task_losses`` contributes nothing,
    so the same object serves learn, forget and joint phases.

    Args:
        weights: the phase's loss weights.
        is_loss: selects the optimised terms of a host loss dict (mmengine: keys with ``'loss'``;
            detectron2: every key).
    """

    def __init__(self, weights: LossWeights, is_loss: Callable[[str], bool] = default_loss_key) -> None:
        self.weights = weights
        self.is_loss = is_loss

    def __call__(self, task_losses: Mapping[str, TaskLoss], gs: torch.Tensor | None = None,
                 distill: torch.Tensor | None = None, feature_mmd: torch.Tensor | None = None) -> PhaseLossOutput:
        """Args:
            task_losses: per role (``retain``, ``learn``, ``forget``) the host's loss tensor or loss dict.
            gs: the group-sparse value of the LoRA groups, or ``None`` to leave it out.
            distill: ``distillation_loss`` of the retain-side batch against the phase-start model, or ``None``.
            feature_mmd: ``feature_mmd_loss`` of the forget batch's features against the retain batch's, or
                ``None``.
        """
        unknown = set(task_losses) - {"retain", "learn", "forget"}
        if unknown:
            raise ValueError(f"Unknown loss roles {sorted(unknown)}; use retain, learn and forget.")
        w = self.weights
        parts: list[torch.Tensor] = []
        terms: dict[str, torch.Tensor] = {}
        for role, losses in task_losses.items():
            task = sum_task_loss(losses, self.is_loss)
            terms[f"{role}/task"] = task.detach()
            if not isinstance(losses, torch.Tensor):
                for key, value in losses.items():
                    if isinstance(value, torch.Tensor) and value.numel() == 1:
                        terms[f"{role}/{key}"] = value.detach().reshape(())
            if role == "retain":
                parts.append(w.retain_weight * task)
            elif role == "learn":
                parts.append(w.learn_weight * task)
            else:
                # An unresolved relative bound is measured on this batch (the phase's first step); the host then
                # resolves it once for the phase (``SwapReport.start_forget_phase``).
                bnd = w.bnd * task.detach() if w.bnd_relative else w.bnd
                bounded = bounded_forget_loss(task, bnd, w.beta)
                terms["forget/bounded"] = bounded.detach()
                parts.append(bounded)
        if gs is not None:
            terms["group_sparse"] = gs.detach()
            parts.append(w.alpha * gs)
        if distill is not None:
            terms["retain/distill"] = distill.detach()
            parts.append(w.distill * distill)
        if feature_mmd is not None:
            terms["forget/feature_mmd"] = feature_mmd.detach()
            parts.append(w.feature_mmd * feature_mmd)
        if not parts:
            raise ValueError("PhaseLoss got no task loss: pass at least one of retain, learn, forget.")
        total = torch.stack([p.reshape(()) for p in parts]).sum()
        terms["total"] = total.detach()
        return PhaseLossOutput(total=total, terms=terms)
