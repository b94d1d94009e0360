"""``--swap-audit``: the core unlearning audit (``kswap.run_audit``) on a timm classifier.

Features are timm's pre-logits (``forward_head(..., pre_logits=True)``); probes train on the forget and retain
images of the train split and are scored on those of the validation split (disjoint images), as are the prototype
attack's class means; the relearn attack fine-tunes every weight of a copy of the merged model on ``k`` train images
per forgotten class, the revival test on ``revival_shots`` train images per retained class (cross-entropy on the
joint head, as the swap trains). The "pretrained" row is the same model with its LoRA adapters switched off and the
new classes hidden, i.e. the pretrained classifier.
Runs on the main process only, after training, on copies: the exported model is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from kswap import AuditHost, AuditSettings, GrownRows, hidden_new_classes, merge_and_export, pretrained_model, run_audit
from kswap.audit import few_shot_indices
from kswap.data import drawn_indices

from .data import targets

# The probes see at most this many images per split (a seeded draw): enough for a linear probe on pre-logits,
# and it bounds the audit's cost on ImageNet-sized sets.
PROBE_IMAGES = 2000


def _labels(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Subset):
        inner = _labels(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [t for d in dataset.datasets for t in _labels(d)]
    return targets(dataset)


def _drawn(dataset: Dataset, seed: int) -> Dataset:
    return Subset(dataset, drawn_indices(len(dataset), PROBE_IMAGES, seed))


def _stack(dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*DataLoader(dataset, batch_size=batch_size, shuffle=False), strict=True)
    return torch.cat(images), torch.cat(labels)


def _batched(model: nn.Module, images: torch.Tensor, fn, device: torch.device, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(model, x.to(device)).float().cpu() for x in images.split(batch_size)])


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def audit_classifier(model: nn.Module, grown: Mapping[str, GrownRows], sets: Mapping[str, Mapping[str, Dataset]],
                     forget_ids: Sequence[int], settings: AuditSettings, device: torch.device,
                     batch_size: int) -> dict[str, Any]:
    """The audit of the pretrained and the swapped classifier (``SwapReport.audit``).

    Args:
        model: the swapped model, LoRA still injected.
        grown: the grown head rows (to hide the new classes in the pretrained row).
        sets: ``{"train": {"forget": ds, "retain": ds}, "test": {...}}`` with joint-space labels.
        forget_ids: the forgotten classes.
        settings: the audit settings.
        device: where the models run.
        batch_size: inference batch size.
    """
    data = {split: _stack(_drawn(ConcatDataset([s["forget"], s["retain"]]), settings.seed), batch_size)
            for split, s in sets.items()}
    forget_test = _stack(sets["test"]["forget"], batch_size)
    shots = few_shot_indices(_labels(sets["train"]["forget"]), forget_ids, settings.relearn_shots, settings.seed)
    attack = _stack(Subset(sets["train"]["forget"], shots), batch_size)
    retain_labels = _labels(sets["train"]["retain"])
    kept = few_shot_indices(retain_labels, sorted(set(retain_labels)), settings.revival_shots, settings.seed)
    revival = _stack(Subset(sets["train"]["retain"], kept), batch_size)

    def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    host = AuditHost(
        features=lambda m, split: (_batched(m, data[split][0], _pre_logits, device, batch_size), data[split][1]),
        forget_score=lambda m: 100.0 * float((_batched(m, forget_test[0], logits, device, batch_size).argmax(-1)
                                              == forget_test[1]).float().mean()),
        attack_batches=[(attack[0].to(device), attack[1].to(device))],
        batch_loss=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
        forget_probs=lambda m: _batched(m, forget_test[0], logits, device, batch_size).softmax(-1),
        retain_batches=[(x.to(device), y.to(device)) for x, y in zip(*(t.split(batch_size) for t in revival),
                                                                     strict=True)],
    )
    pretrained, swapped = pretrained_model(model), merge_and_export(model)
    with hidden_new_classes(pretrained, grown):
        return run_audit({"pretrained": pretrained, "swapped": swapped}, host, forget_ids, settings)
