"""``SwapHook(audit=...)``: the core unlearning audit (``kswap.run_audit``) on a DETR-style detector (DINO).

Features, per ground-truth object of the forget and retain sets: the last decoder layer's embedding of the query
whose predicted box overlaps the object most (IoU), i.e. what the class branch reads for that object, the
detection analogue of a classifier's pre-logits. (Box-pooled backbone or neck features would not do: the swap
freezes them, so they are the same before and after.) The probes train on objects of the train split's images and
are scored on those of the test split, both through the test pipeline; labels are the objects' classes.

Relearn attack: every weight of a copy of the merged model is fine-tuned with the detector's own loss on
``relearn_shots`` train images per forgotten class (the forget set as its role trained on it, the forgotten
objects labelled), in batches of the train batch size, then the forget set is scored again by the report's
scorer (``SetScorer``: bbox AP over the union of the sets' test images).

Revival test: the same fine-tuning on ``revival_shots`` train images per retained class of the retain set (as its
role trained on it), then the forget set scored again. Prototype attack: class means of ``prototype_shots`` train
objects per class on the probes' features, scored on the test objects of the forgotten classes.

Neighbour mass: the sigmoid class scores of the queries matched to forgotten test objects, summed over the
classes the pretrained model scored highest on them (other than the forgotten ones).

The "pretrained" row is the same model with every LoRA B zeroed and merged (the pretrained weights), its buffers
as the swap started, and the new classes hidden. Runs on rank 0 after training, on copies: the exported model is
never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps
from mmengine.dataset import pseudo_collate
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from kswap import AuditHost, AuditSettings, GrownRows, hidden_new_classes, merge_and_export, pretrained_model, run_audit
from kswap.audit import few_shot_indices
from kswap.data import drawn_indices

from .evaluation import SetScorer

# By default the probes see at most this many images per split (a seeded draw): a few thousand objects on
# COCO-like data, enough for a linear probe, and it bounds the audit's inference cost.
PROBE_IMAGES = 500


@torch.no_grad()
def matched_queries(model: nn.Module, dataset: Dataset, classes: Sequence[int],
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per ground-truth object of ``classes`` in ``dataset`` (test pipeline, boxes in the original image):
    the last decoder layer's embedding and sigmoid class scores of the query whose box overlaps it most.

    Returns:
        Embeddings ``(N, D)``, class scores ``(N, C)`` and the objects' joint labels ``(N,)``.
    """
    keep = torch.tensor(list(classes))
    embeddings, scores, labels = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pseudo_collate):
        data = model.data_preprocessor(batch, False)
        samples = data["data_samples"]
        head_inputs = model.forward_transformer(model.extract_feat(data["inputs"]), samples)
        hidden = head_inputs["hidden_states"][-1]
        cls, coords = model.bbox_head(head_inputs["hidden_states"], head_inputs["references"])
        for b, sample in enumerate(samples):
            gt = sample.gt_instances
            if "labels" not in gt:
                continue
            mine = torch.isin(gt.labels.cpu(), keep)
            if not mine.any():
                continue
            h, w = sample.img_shape
            boxes = bbox_cxcywh_to_xyxy(coords[-1, b]) * coords.new_tensor([w, h, w, h])
            # The test pipeline loads boxes in the original image's coordinates; the queries see the resized one.
            gt_boxes = gt.bboxes[mine.to(gt.bboxes.device)].to(boxes) * boxes.new_tensor(sample.scale_factor).repeat(2)
            query = bbox_overlaps(gt_boxes, boxes).argmax(1)
            embeddings.append(hidden[b, query].float().cpu())
            scores.append(cls[-1, b, query].sigmoid().float().cpu())
            labels.append(gt.labels.cpu()[mine])
    if not labels:
        raise ValueError("The audit found no object of the forget or retain classes: the test pipeline must load "
                         "annotations (LoadAnnotations with_bbox=True).")
    return torch.cat(embeddings), torch.cat(scores), torch.cat(labels)


def audit_detector(model: nn.Module, pretrained_buffers: Mapping[str, torch.Tensor] | None,
                   grown: Mapping[str, GrownRows], scorer: SetScorer,
                   probe_sets: Mapping[str, Dataset], attack_sets: Mapping[str, Dataset],
                   sets: Mapping[str, Sequence[int]],
                   settings: AuditSettings, batch_sizes: tuple[int, int],
                   probe_images: int = PROBE_IMAGES) -> dict[str, Any]:
    """The audit of the pretrained and the swapped detector (``SwapReport.audit``).

    Args:
        model: the swapped detector, LoRA still injected.
        pretrained_buffers: its buffers as the swap started (``None``: the current ones).
        grown: the grown class rows (hidden in the pretrained row).
        scorer: the report's scorer; its ``forget`` score is the audit's forget score.
        probe_sets: ``{"train": ds, "test": ds}``: images of the forget and retain sets through the test pipeline.
        attack_sets: the forget and the retain set's train images through the train pipeline, as the swap trains
            on them (``"forget"``: the relearn attack's, the forgotten objects labelled; ``"retain"``: the revival
            test's).
        sets: per set, its joint class ids.
        settings: the audit settings.
        batch_sizes: the train and the test batch size.
        probe_images: at most this many images per split for the probes.
    """
    forget, observed = list(sets["forget"]), [*sets["forget"], *sets["retain"]]
    train_batch, test_batch = batch_sizes
    drawn = {split: Subset(ds, drawn_indices(len(ds), probe_images, settings.seed))
             for split, ds in probe_sets.items()}

    def shot_batches(role: str, shots: int) -> list[dict]:
        """``shots`` images per class of ``role``'s set (an image counts for every class in it), in train batches."""
        dataset = attack_sets[role]
        labels = [{i["bbox_label"] for i in dataset.get_data_info(j)["instances"]} for j in range(len(dataset))]
        picked = sorted({j for c in sets[role] for j in few_shot_indices(
            [c if c in present else -1 for present in labels], [c], shots, settings.seed)})
        return [pseudo_collate([dataset[j] for j in picked[k:k + train_batch]])
                for k in range(0, len(picked), train_batch)]

    def features(m: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings, _, labels = matched_queries(m, drawn[split], observed, test_batch)
        return embeddings, labels

    def batch_loss(m: nn.Module, batch: dict) -> torch.Tensor:
        data = m.data_preprocessor(copy.deepcopy(batch), True)
        loss, _ = m.parse_losses(m(**data, mode="loss"))
        return loss

    host = AuditHost(
        features=features,
        forget_score=lambda m: scorer(m)["forget"],
        attack_batches=shot_batches("forget", settings.relearn_shots),
        batch_loss=batch_loss,
        forget_probs=lambda m: matched_queries(m, probe_sets["test"], forget, test_batch)[1],
        retain_batches=shot_batches("retain", settings.revival_shots),
    )
    pretrained, swapped = pretrained_model(model, pretrained_buffers), merge_and_export(model)
    with hidden_new_classes(pretrained, grown):
        return run_audit({"pretrained": pretrained, "swapped": swapped}, host, forget, settings)

