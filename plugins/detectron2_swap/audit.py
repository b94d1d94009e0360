"""``SWAP.AUDIT``: the core unlearning audit (``kswap.run_audit``) of a detectron2 segmentation swap.

* Features (the probes): per image and per ground-truth class of the forget and retain sets present in it, the
  per-pixel features that the class predictor reads (``SWAP.AUDIT.FEATURES``, default ``sem_seg_head.predictor``:
  its first 4-D input, which is Mask2Former's pixel-decoder mask features and a SemanticSegmentor head's last
  feature map), averaged over the class's pixels (area-weighted at the feature map's resolution). Probes train
  on the forget and retain training datasets and are scored on their test datasets, at most
  ``SWAP.AUDIT.PROBE_IMAGES`` images of each (a seeded draw), read by the user's test loader.
* Relearn attack: every weight of a copy of the model fine-tuned on ``RELEARN_SHOTS`` training images per
  forgotten class (the user's train loader and mapper; targets of every joint class), then the forget set
  scored with the report's per-set mIoU (``score_sets``).
* Revival test: the same fine-tuning on ``REVIVAL_SHOTS`` training images per retained class (cfg.SWAP.DATASETS.RETAIN)
  only, then the forget set scored again. Prototype attack: class means of ``PROTOTYPE_SHOTS`` pooled training
  features per class (the probes'), scored on the forget test features.
* Neighbour mass: per forget test image and forgotten class in it, the class probabilities
  (``class_probabilities``) averaged over that class's pixels; the mass on the classes the pretrained model
  confuses most with them.

"Pretrained" is the swapped model with its LoRA at zero and the new classes hidden; "swapped" is the merged
model the swap exports. Every process calls the audit (``SegmentationAudit.__call__``): each runs its shard of
the test loaders, and features, probabilities and attack batches are gathered, so every process attacks the
same copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from torch import nn

from kswap import (
    AuditHost,
    AuditSettings,
    SwapConfigError,
    hidden_new_classes,
    merge_and_export,
    pretrained_model,
    run_audit,
)
from kswap.data import drawn_indices

from .data import remap_sample
from .evaluation import score_sets
from .plan import SETS, SOURCE_KEY, SwapPlan, read_label_ids, register_alias

PROBE_MODULE = "sem_seg_head.predictor"

BuildTestLoader = Callable[[str], Iterable[list[dict]]]
BuildTrainLoader = Callable[[tuple[str, ...], int], Iterable[list[dict]]]


def _first_map(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() == 4), None)


def probed_modules(model: nn.Module, features: str = "") -> dict[str, nn.Module]:
    """The modules whose inputs the probes read: ``features`` (``""``: ``sem_seg_head.predictor``) and
    ``backbone``; a model without them is refused (the trainer checks it before training)."""
    modules = dict(model.named_modules())
    wanted = {"features": features or PROBE_MODULE, "input": "backbone"}
    if missing := [name for name in wanted.values() if name not in modules]:
        raise SwapConfigError(f"{type(model).__name__} has no module {missing} for the audit's probes: set "
                              "cfg.SWAP.AUDIT.FEATURES to the module whose input is the per-pixel feature map (the "
                              "model needs a backbone too), or disable cfg.SWAP.AUDIT.ENABLED.")
    return {key: modules[name] for key, name in wanted.items()}


@contextmanager
def captured_inputs(model: nn.Module, features: str) -> Iterator[dict[str, torch.Tensor | None]]:
    """Within the block, after each forward: ``"features"``, the first 4-D input of the ``features`` module, and
    ``"input"``, the padded image batch the backbone got (the area the feature map covers)."""
    out: dict[str, torch.Tensor | None] = {}

    def grab(key: str) -> Callable:
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
            out[key] = _first_map(args, kwargs)
        return hook

    handles = [module.register_forward_pre_hook(grab(key), with_kwargs=True)
               for key, module in probed_modules(model, features).items()]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


def mask_pooled(features: torch.Tensor, padded: Sequence[int], labels: torch.Tensor,
                keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class of ``keep`` present in ``labels``, the mean of ``features`` over its pixels.

    Args:
        features: ``(C, h, w)``, the feature map of the padded input.
        padded: the padded input's size ``(H, W)``, which the feature map covers.
        labels: ``(H', W')`` joint labels of the input image, which fills the padded one's top left.
        keep: the classes to pool.

    Returns:
        The pooled features ``(K, C)`` and their classes ``(K,)``; each feature cell weighs by the share of the
        class's pixels in it.
    """
    classes = labels.unique()
    classes = classes[torch.isin(classes, keep)]
    masks = (labels[None] == classes[:, None, None]).float()
    masks = F.pad(masks, (0, padded[1] - labels.shape[1], 0, padded[0] - labels.shape[0]))
    weights = F.adaptive_avg_pool2d(masks, features.shape[-2:])
    pooled = torch.einsum("khw,chw->kc", weights, features.float().cpu())
    return pooled / weights.sum((1, 2)).clamp_min(1e-12)[:, None], classes


def class_probabilities(sem_seg: torch.Tensor) -> torch.Tensor:
    """Per-pixel class probabilities of a ``(C, H, W)`` ``sem_seg`` output: a SemanticSegmentor's are logits
    (softmax; negative values tell them apart), Mask2Former's are non-negative class scores that do not sum to 1
    (normalised)."""
    if (sem_seg < 0).any():
        return sem_seg.softmax(0)
    return sem_seg / sem_seg.sum(0, keepdim=True).clamp_min(1e-12)


def _gathered(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every process's ``tensors``, concatenated in rank order."""
    return torch.cat([t for rank in comm.all_gather(list(tensors)) for t in rank])


class SegmentationAudit:
    """The ``AuditHost`` of a detectron2 segmentation swap.

    Args:
        plan: the swap plan (sets, datasets, label tables).
        settings: the audit settings.
        build_test_loader: the user's test loader of a dataset name.
        build_train_loader: the user's train loader over dataset names with a total batch size.
        batch_size: images per relearn step, over all processes (at most the shots).
        features: ``SWAP.AUDIT.FEATURES`` ("" for ``sem_seg_head.predictor``).
        probe_images: ``SWAP.AUDIT.PROBE_IMAGES``.
    """

    def __init__(self, plan: SwapPlan, settings: AuditSettings, build_test_loader: BuildTestLoader,
                 build_train_loader: BuildTrainLoader, batch_size: int, features: str = "",
                 probe_images: int = 500) -> None:
        self.plan = plan
        self.settings = settings
        self.build_test_loader = build_test_loader
        self.build_train_loader = build_train_loader
        self.batch_size = batch_size
        self.module = features
        self.forget = torch.tensor(plan.sets["forget"])
        self.keep = torch.tensor(plan.sets["forget"] + plan.sets["retain"])
        self.probe_datasets = {split: tuple(dict.fromkeys(d for s in ("forget", "retain") for d in by_set[s]))
                               for split, by_set in (("train", plan.train), ("test", plan.test))}
        self.probe_files = {d: self._draw(d, probe_images) for ds in self.probe_datasets.values() for d in ds}

    def _draw(self, dataset: str, limit: int) -> set[str]:
        files = [r["file_name"] for r in DatasetCatalog.get(dataset)]
        return {files[i] for i in drawn_indices(len(files), limit, self.settings.seed)}

    def _images(self, model: nn.Module, datasets: Iterable[str],
                only: dict[str, set[str]] | None = None) -> Iterator[tuple[int, dict, dict, torch.Tensor]]:
        """Per image of ``datasets`` (of ``only[dataset]`` when given) in this process's shard: its index in the
        batch, the mapped sample, the model's output and the joint labels of every labelled pixel."""
        for dataset in datasets:
            table = self.plan.score_table(dataset)
            gt_files = {r["file_name"]: r["sem_seg_file_name"] for r in DatasetCatalog.get(dataset)}
            for batch in self.build_test_loader(dataset):
                batch = [s for s in batch if only is None or s["file_name"] in only[dataset]]
                if batch:
                    for i, (sample, output) in enumerate(zip(batch, model(batch), strict=True)):
                        labels = read_label_ids(gt_files[sample["file_name"]], table)
                        yield i, sample, output, torch.from_numpy(labels)

    def features(self, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask-pooled features and classes of the forget and retain classes in ``split``'s images."""
        rows, classes = [], []
        with captured_inputs(model, self.module) as captured:
            for i, sample, _, labels in self._images(model, self.probe_datasets[split], self.probe_files):
                features, padded = captured["features"], captured["input"]
                if features is None or padded is None:
                    raise SwapConfigError(f"{self.module or PROBE_MODULE} got no 4-D feature map in "
                                          f"{type(model).__name__}'s inference: set cfg.SWAP.AUDIT.FEATURES to a "
                                          "module that does.")
                size = tuple(sample["image"].shape[-2:])  # as the test mapper resized it
                labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
                pooled, present = mask_pooled(features[i], padded.shape[-2:], labels, self.keep)
                rows.append(pooled)
                classes.append(present)
        return _gathered(rows), _gathered(classes)

    def forget_score(self, model: nn.Module) -> float:
        """The forget set's mIoU as the swap report scores it."""
        return comm.all_gather(score_sets(model, self.plan, self.build_test_loader, sets=("forget",)))[0]["forget"]

    def forget_probs(self, model: nn.Module) -> torch.Tensor:
        """Per forget test image and forgotten class in it, the class probabilities averaged over its pixels."""
        rows = []
        for _, _, output, labels in self._images(model, self.plan.test["forget"]):
            probs = class_probabilities(output["sem_seg"].float().cpu())
            present = labels.unique()
            rows += [probs[:, labels == c].mean(1) for c in present[torch.isin(present, self.forget)]]
        return _gathered([torch.stack(rows)] if rows else [])

    def shot_images(self, role: str, shots: int) -> dict[str, list[dict]]:
        """Per training dataset of ``role``'s set (``forget``: the relearn attack, ``retain``: the revival test),
        the records of ``shots`` images per class of the set (a seeded draw; an image counts for every class of the
        set in it)."""
        records = {name: DatasetCatalog.get(name) for name in self.plan.train[role]}
        tables = {name: self.plan.label_table(name, (role,), -1) for name in records}
        candidates = [(name, record) for name, recs in records.items() for record in recs]
        need = dict.fromkeys(self.plan.sets[role], shots)
        picked: dict[str, list[dict]] = {name: [] for name in records}
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.settings.seed))
        for j in order.tolist():
            name, record = candidates[j]
            present = np.unique(read_label_ids(record["sem_seg_file_name"], tables[name])).tolist()
            wanted = [c for c in present if need.get(c)]
            if wanted:
                picked[name].append({**record, SOURCE_KEY: name})
                need.update({c: need[c] - 1 for c in wanted})
            if not any(need.values()):
                break
        if missing := [self.plan.space.names[c] for c, n in need.items() if n == shots]:
            raise SwapConfigError(f"The audit found no training image of {missing} in "
                                  f"cfg.SWAP.DATASETS.{role.upper()}.")
        return {name: recs for name, recs in picked.items() if recs}

    def shot_batches(self, role: str, shots: int) -> list[list[dict]]:
        """The batches of ``shot_images``, mapped by the user's train loader, with targets of every joint class;
        the same on every process."""
        picked = self.shot_images(role, shots)
        for name, recs in picked.items():
            register_alias(name, f"{name}@swap:audit:{role}", lambda recs=recs: recs)
        tables = {name: self.plan.label_table(name, SETS, self.plan.ignore_value) for name in picked}
        shots, world = sum(len(recs) for recs in picked.values()), comm.get_world_size()
        total = world * math.ceil(min(shots, self.batch_size) / world)  # detectron2 splits a batch evenly
        loader = iter(self.build_train_loader(tuple(f"{name}@swap:audit:{role}" for name in picked), total))
        local = [[remap_sample(s, tables[s[SOURCE_KEY]], self.plan.ignore_value) for s in next(loader)]
                 for _ in range(math.ceil(shots / total))]
        ranks = comm.all_gather(local)
        return [[s for rank in ranks for s in rank[j]] for j in range(len(local))]

    def host(self) -> AuditHost:
        return AuditHost(features=self.features, forget_score=self.forget_score,
                         attack_batches=self.shot_batches("forget", self.settings.relearn_shots),
                         batch_loss=lambda model, batch: sum(model(batch).values()),
                         forget_probs=self.forget_probs,
                         retain_batches=self.shot_batches("retain", self.settings.revival_shots))

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """The audit of the pretrained and the swapped model (``SwapReport.audit``); ``model`` (the prepared
        swapping model, unwrapped) is left as it is."""
        pretrained = pretrained_model(model)
        models = {"pretrained": pretrained, "swapped": merge_and_export(model)}
        torch.manual_seed(self.settings.seed)  # every process attacks identical copies in the same way
        with hidden_new_classes(pretrained, model.swap_state.grown):
            return run_audit(models, self.host(), self.plan.sets["forget"], self.settings)
