"""Small detectron2 models registered for the tests (no weights exist offline; these are trained in the tests).

* ``GlyphViT``: a tiny transformer backbone (``blocks.N.ffn.linear1|linear2``) with one stride-4 feature map, for
  detectron2's built-in ``SemanticSegmentor`` and ``SemSegFPNHead``.
* ``MiniMask2Former``: a meta-architecture with Mask2Former's module names and shapes where LoRA and the class
  head go (Swin ``backbone.layers.S.blocks.B.mlp.fc1|fc2``, pixel-decoder encoder ``linear1|linear2``, decoder
  ``transformer_ffn_layers.N.linear1|linear2``, ``class_embed`` with a trailing "no object" row, a criterion
  with ``num_classes`` and ``empty_weight``). Its loss is a mask-classification loss with a fixed query
  assignment (query j takes the j-th class present), returned as Mask2Former's loss dict keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone
from detectron2.structures import ImageList
from torch import nn


class Block(nn.Module):
    """Pre-norm attention and FFN; the FFN's linears are ``<mlp>.<fc1>`` and ``<mlp>.<fc2>`` (or direct children
    when ``mlp`` is empty), so each model below gets the names its namesake has."""

    def __init__(self, dim: int, hidden: int, mlp: str = "ffn", fc: tuple[str, str] = ("linear1", "linear2"),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, dropout=dropout, batch_first=True)
        holder = self
        if mlp:
            holder = nn.Module()
            setattr(self, mlp, holder)
        setattr(holder, fc[0], nn.Linear(dim, hidden))
        setattr(holder, fc[1], nn.Linear(hidden, dim))
        self.mlp_name, self.fc_names = mlp, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        holder = getattr(self, self.mlp_name) if self.mlp_name else self
        fc1, fc2 = (getattr(holder, n) for n in self.fc_names)
        return x + fc2(F.gelu(fc1(self.norm2(x))))


class GlyphViT(Backbone):
    """Patch-4 embedding, ``depth`` transformer blocks (attention ``dropout``: a model that draws random numbers
    as it trains), one ``p2`` feature map at stride 4."""

    def __init__(self, dim: int = 32, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(Block(dim, 2 * dim, dropout=dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens)
        return {"p2": tokens.transpose(1, 2).reshape(b, c, h, w)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {"p2": ShapeSpec(channels=self.dim, stride=4)}

    @property
    def size_divisibility(self) -> int:
        return 4  # inputs are padded to whole patches


@BACKBONE_REGISTRY.register()
def build_glyph_vit_backbone(cfg, input_shape) -> GlyphViT:
    return GlyphViT(dim=cfg.MODEL.GLYPH.DIM, depth=cfg.MODEL.GLYPH.DEPTH, dropout=cfg.MODEL.GLYPH.DROPOUT)


def add_glyph_config(cfg) -> None:
    cfg.MODEL.GLYPH = CN()
    cfg.MODEL.GLYPH.DIM = 32
    cfg.MODEL.GLYPH.DEPTH = 2
    cfg.MODEL.GLYPH.DROPOUT = 0.0


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, eos_coef: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("empty_weight", weight)

    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[torch.Tensor],
                ignore: int) -> dict[str, torch.Tensor]:
        ce, bce, dice = [], [], []
        for logits, masks, sem_seg in zip(class_logits, mask_logits, targets, strict=True):
            present = [c for c in sem_seg.unique().tolist() if c != ignore][: len(logits)]
            labels = torch.full((len(logits),), self.num_classes, dtype=torch.long)
            labels[: len(present)] = torch.tensor(present, dtype=torch.long)
            ce.append(F.cross_entropy(logits, labels, self.empty_weight))
            valid = sem_seg != ignore
            for j, c in enumerate(present):
                target = (sem_seg == c).float()
                pred = masks[j][valid]
                bce.append(F.binary_cross_entropy_with_logits(pred, target[valid]))
                prob = pred.sigmoid()
                dice.append(1 - (2 * (prob * target[valid]).sum() + 1) / (prob.sum() + target[valid].sum() + 1))
        zero = mask_logits.sum() * 0
        return {"loss_ce": 2.0 * torch.stack(ce).mean(),
                "loss_mask": 5.0 * (torch.stack(bce).mean() if bce else zero),
                "loss_dice": 5.0 * (torch.stack(dice).mean() if dice else zero)}


class Predictor(nn.Module):
    def __init__(self, hidden: int, num_classes: int, num_queries: int, layers: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.query_feat = nn.Embedding(num_queries, hidden)
        self.transformer_ffn_layers = nn.ModuleList(Block(hidden, 4 * hidden, mlp="") for _ in range(layers))
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.mask_embed = nn.Linear(hidden, hidden)


class PixelDecoder(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(Block(dim, 4 * dim, mlp="") for _ in range(layers))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, 2 * dim, mlp="mlp", fc=("fc1", "fc2")) for _ in range(depth))


@META_ARCH_REGISTRY.register()
class MiniMask2Former(nn.Module):
    """Mask classification with Mask2Former's names: ``num_queries`` queries, each a class (with "no object")
    and a mask from the query embedding against the pixel features."""

    def __init__(self, cfg) -> None:
        super().__init__()
        dim, num_classes = cfg.MODEL.GLYPH.DIM, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.backbone = nn.Module()
        self.backbone.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.backbone.layers = nn.ModuleList(SwinStage(dim, d) for d in (1, 2))
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.num_classes = num_classes
        self.sem_seg_head.pixel_decoder = PixelDecoder(dim, 2)
        self.sem_seg_head.predictor = Predictor(dim, num_classes, num_queries=8, layers=3)
        self.criterion = SetCriterion(num_classes)
        self.register_buffer("pixel_mean", torch.tensor([128.0, 128.0, 128.0]).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([64.0, 64.0, 64.0]).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone.patch(x)
        b, c, h, w = feat.shape
        tokens = feat.flatten(2).transpose(1, 2)
        for stage in self.backbone.layers:
            for block in stage.blocks:
                tokens = block(tokens)
        for layer in self.sem_seg_head.pixel_decoder.transformer.encoder.layers:
            tokens = layer(tokens)
        predictor = self.sem_seg_head.predictor
        queries = self._decode(predictor.query_feat.weight.unsqueeze(0).expand(b, -1, -1), tokens)
        class_logits = predictor.class_embed(queries)
        masks = torch.einsum("bqc,bnc->bqn", predictor.mask_embed(queries), tokens).reshape(b, -1, h, w)
        return class_logits, F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def _decode(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer decoder's query updates (``tokens``: the pixel features, unused by this small one)."""
        for layer in self.sem_seg_head.predictor.transformer_ffn_layers:
            queries = layer(queries)
        return queries

    def forward(self, batched_inputs: list[dict]):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, 4)
        class_logits, mask_logits = self._run(images.tensor)
        if self.training:
            targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
            targets = ImageList.from_tensors(targets, 4, pad_value=self.ignore_value).tensor
            return self.criterion(class_logits, mask_logits, list(targets), self.ignore_value)
        out = []
        for i, x in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            probs = class_logits[i].softmax(-1)[:, :-1]
            seg = torch.einsum("qc,qhw->chw", probs, mask_logits[i, :, :h, :w].sigmoid())
            seg = F.interpolate(seg[None], size=(x.get("height", h), x.get("width", w)), mode="bilinear")[0]
            out.append({"sem_seg": seg})
        return out


# -- data and configs shared by the tests and the DDP worker ---------------------------------------------------------

def register_datasets(spec: dict[str, dict]) -> None:
    """Register ``{name: {"records": [...], "stuff_classes": [...]}}`` (idempotent, for spawned processes too)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name, entry in spec.items():
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda records=entry["records"]: records)
            MetadataCatalog.get(name).set(stuff_classes=entry["stuff_classes"], ignore_label=255,
                                          evaluator_type="sem_seg")


def glyph_cfg(out_dir: str, meta: str = "SemanticSegmentor", num_classes: int = 5):
    """A small CPU config: 64-pixel inputs, a GlyphViT SemanticSegmentor (or MiniMask2Former), AdamW."""
    from detectron2.config import get_cfg

    from detectron2_swap import add_swap_config

    cfg = get_cfg()
    add_glyph_config(cfg)
    add_swap_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = meta
    cfg.MODEL.BACKBONE.NAME = "build_glyph_vit_backbone"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [128.0] * 3, [64.0] * 3
    head = cfg.MODEL.SEM_SEG_HEAD
    head.IN_FEATURES, head.CONVS_DIM, head.COMMON_STRIDE, head.NUM_CLASSES, head.NORM = ["p2"], 32, 4, num_classes, ""
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 86
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 86
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("glyph_digits_train",), ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 8, 3e-3, 0, ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 100_000
    cfg.OUTPUT_DIR = str(out_dir)
    return cfg


def swap_glyphs(cfg, weights: str, learn: int = 200, forget: int = 200, **swap):
    """Enable the swap: forget digit 3, keep background and 0-2, learn trousers and bags (Fashion-MNIST)."""
    cfg.MODEL.WEIGHTS = str(weights)
    s = cfg.SWAP
    s.ENABLED, s.FORGET, s.LEARN = True, ["3"], ["trouser", "bag"]
    s.DATASETS.FORGET = s.DATASETS.RETAIN = ("glyph_digits_train",)
    s.DATASETS.LEARN = ("glyph_clothes_train",)
    s.DATASETS.FORGET_TEST = s.DATASETS.RETAIN_TEST = ("glyph_digits_val",)
    s.DATASETS.LEARN_TEST = ("glyph_clothes_val",)
    s.LEARN_LENGTH, s.FORGET_LENGTH, s.EVAL_PERIOD = f"{learn}steps", f"{forget}steps", 0
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        s.LORA.TARGETS = r"backbone\.blocks\.\d+\.ffn\.linear[12]"  # no preset: the generic path, by regex
        # A few hundred steps of this small model need its pretraining LR, not the reference's 1e-4 (3500 steps).
        s.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR
    # This model's loss is one cross-entropy (~0.3), not Mask2Former's sum of 30 weighted terms (~100): the bound
    # and the sparsity weight are scaled to it.
    s.FORGET_LOSS.BND, s.FORGET_LOSS.ALPHA, s.LEARN_LOSS.ALPHA = 3.0, 1e-4, 1e-4
    cfg.merge_from_list([item for key, value in swap.items() for item in (f"SWAP.{key.replace('__', '.')}", value)])
    return cfg


def make_trainer_classes():
    """The user's Trainer (AdamW over trainable parameters, as Mask2Former's skips frozen ones; a SemSegEvaluator
    writing to ``output_folder``, by default ``OUTPUT_DIR/inference``, as Mask2Former's) and the swap one."""
    import os

    import torch
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import SemSegEvaluator

    from detectron2_swap import SwapTrainerMixin

    class Trainer(DefaultTrainer):
        @classmethod
        def build_optimizer(cls, cfg, model):
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=0.0)

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return SemSegEvaluator(dataset_name, distributed=True,
                                   output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    class SwapTrainer(SwapTrainerMixin, Trainer):
        pass

    return Trainer, SwapTrainer


def ddp_main(spec_path: str, weights: str, out_dir: str) -> None:
    """One process of the DDP test: a short swap, then this rank's LoRA tensors to ``out_dir/rank<r>.pt``."""
    import json

    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from kswap import lora_state_dict

    register_datasets(json.loads(Path(spec_path).read_text()))
    # Periodic scores too: every process runs the scoring, the main one records it.
    cfg = swap_glyphs(glyph_cfg(out_dir), weights, learn=6, forget=6, EVAL_PERIOD=4, EVAL_IMAGES=10)
    seed_all_rng(comm.get_rank())
    _, SwapTrainer = make_trainer_classes()
    trainer = SwapTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    import torch

    torch.save({"lora": lora_state_dict(model), "world_size": comm.get_world_size(),
                "ddp": hasattr(trainer.model, "module")}, f"{out_dir}/rank{comm.get_rank()}.pt")


TESTS_DIR = Path(__file__).resolve().parents[1]
DIGITS = ["background", "0", "1", "2", "3"]
CLOTHES = ["background", "trouser", "bag"]


def write_glyph_spec(root: Path) -> Path:
    """The four composited datasets (digits: background and 0-3; clothes: background, trouser, bag), registered here
    and described in a JSON file for spawned processes."""
    import json

    from swap_testing.glyph_coco import write_glyph_semseg

    parts = {"glyph_digits_train": ("mnist", DIGITS, 600, "train", 1),
             "glyph_digits_val": ("mnist", DIGITS, 100, "test", 2),
             "glyph_clothes_train": ("fashion", CLOTHES, 300, "train", 3),
             "glyph_clothes_val": ("fashion", CLOTHES, 100, "test", 4)}
    spec = {name: {"records": write_glyph_semseg(root, source, stuff[1:], stuff, n, split, seed),
                   "stuff_classes": stuff}
            for name, (source, stuff, n, split, seed) in parts.items()}
    register_datasets(spec)
    path = root / "datasets.json"
    path.write_text(json.dumps(spec))
    return path


def pretrain_glyph_segmentor(out: Path) -> Path:
    """A GlyphViT SemanticSegmentor trained on the digits with plain detectron2 (the user's model before a swap)."""
    from detectron2.utils.env import seed_all_rng

    cfg = glyph_cfg(str(out))
    cfg.SOLVER.MAX_ITER = 1500
    seed_all_rng(0)
    trainer = make_trainer_classes()[0](cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return out / "model_final.pth"


def run_swap(cfg, resume: bool = False, extra_hooks=()):
    """Train the swap of ``cfg`` with the mixed-in trainer (seeded); returns the trainer."""
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(0)
    trainer = make_trainer_classes()[1](cfg)
    trainer.register_hooks(list(extra_hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer
