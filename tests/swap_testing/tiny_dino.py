"""A tiny DINO made from mmdet's own DINO config (ResNet-18 trunk, one encoder and decoder layer, few queries)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mmengine.config import Config

DINO_CONFIG = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0]) / ".mim" / "configs" / "dino" / \
    "dino-4scale_r50_8xb2-12e_coco.py"


def tiny_dino_config(data_root: Path, classes: list[str], work_dir: Path, max_iters: int = 100,
                     batch_size: int = 4) -> Config:
    """mmdet's DINO-4scale config, shrunk for 96x96 images on CPU and pointed at ``data_root``'s COCO files."""
    data_root = Path(data_root)
    cfg = Config.fromfile(str(DINO_CONFIG))
    model = cfg.model
    model.num_queries = 30
    model.backbone.update(depth=18, frozen_stages=-1, init_cfg=None, norm_cfg=dict(type="BN", requires_grad=True),
                          norm_eval=False)
    model.neck.in_channels = [128, 256, 512]
    model.encoder.num_layers = 1
    model.decoder.num_layers = 2
    for part in (model.encoder.layer_cfg.ffn_cfg, model.decoder.layer_cfg.ffn_cfg):
        part.feedforward_channels = 256
    model.bbox_head.num_classes = len(classes)
    model.dn_cfg.group_cfg.num_dn_queries = 20
    model.test_cfg.max_per_img = 30
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                dict(type="Resize", scale=(96, 96), keep_ratio=True), dict(type="PackDetInputs")]
    test_pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(96, 96), keep_ratio=True),
                     dict(type="LoadAnnotations", with_bbox=True),
                     dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                           "scale_factor"))]
    metainfo = dict(classes=tuple(classes))
    cfg.train_dataloader = dict(
        batch_size=batch_size, num_workers=0, persistent_workers=False,
        sampler=dict(type="DefaultSampler", shuffle=True), batch_sampler=None,
        dataset=dict(type="CocoDataset", data_root=str(data_root), ann_file="mnist_train.json",
                     data_prefix=dict(img="mnist_train/"), metainfo=metainfo, filter_cfg=dict(filter_empty_gt=True),
                     pipeline=pipeline))
    cfg.val_dataloader = dict(
        batch_size=4, num_workers=0, persistent_workers=False, drop_last=False,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dict(type="CocoDataset", data_root=str(data_root), ann_file="mnist_val.json",
                     data_prefix=dict(img="mnist_val/"), metainfo=metainfo, test_mode=True, pipeline=test_pipeline))
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = dict(type="CocoMetric", ann_file=str(data_root / "mnist_val.json"), metric="bbox")
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=10**9)
    cfg.optim_wrapper.optimizer.lr = 2e-4
    cfg.optim_wrapper.paramwise_cfg = dict(custom_keys={"backbone": dict(lr_mult=1.0)})
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=max_iters, by_epoch=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=50)
    cfg.log_processor = dict(by_epoch=False)
    cfg.work_dir = str(work_dir)
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=16)
    return cfg


DIGITS = ["0", "1", "2"]
LEARN = ["trouser", "bag"]


def swap_cfg(glyphs, checkpoint, work_dir, **hook):
    """The user's config plus only the three swap lines."""
    cfg = tiny_dino_config(glyphs, DIGITS, work_dir)
    cfg.custom_imports = dict(imports=["mmdet_swap"], allow_failed_imports=False)
    learn = dict(classes=tuple(LEARN),
                 train=dict(ann_file="fashion_train.json", data_prefix=dict(img="fashion_train/")),
                 val=dict(ann_file="fashion_val.json", data_prefix=dict(img="fashion_val/")))
    cfg.custom_hooks = [dict(type="SwapHook", forget=dict(classes=("0",)), learn=learn, learn_length="80steps",
                             forget_length="80steps", **hook)]
    cfg.load_from = str(checkpoint)
    # A short swap needs a larger step than the reference's 1e-4 over 20 epochs.
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.optim_wrapper.clip_grad = dict(max_norm=1.0, norm_type=2)
    return cfg
