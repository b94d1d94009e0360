"""``SwapHook``: knowledge swapping in an mmdet DETR-style detector (DINO), enabled from the config.

    custom_imports = dict(imports=['mmdet_swap'], allow_failed_imports=False)
    custom_hooks = [dict(type='SwapHook', forget=('cat',),
                         learn=dict(classes=('zebra',), train=dict(ann_file=..., data_prefix=...), val=dict(...)))]
    load_from = 'dino_coco.pth'

mmengine builds the model, wraps it and builds the optimizer before the first hook runs, so ``before_run``
does the surgery and rebuilds what depends on it: LoRA on the encoder/decoder FFNs, grown class branches
and denoising label embedding, everything else frozen, the model re-wrapped, an optimizer over the LoRA
parameters only, and the config's train loop replaced by the swap's phases. ``after_load_checkpoint``
maps the pretrained checkpoint onto the grown, LoRA-injected model and refuses one that does not fit. From
``before_run`` to ``after_run`` mmengine loads local checkpoints with ``weights_only`` (its own types allowed)
and mmcv's CPU deformable attention runs on kswap's kernel; both are as they were after the run.

Outputs and log keys are the core's (``kswap.export``): ``model_swapped.pth``, ``swap_adapter.safetensors``,
``swap/<set>`` per set score and ``swap/loss/<term>`` per phase-loss term.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from mmdet.registry import DATASETS
from mmengine.config import Config
from mmengine.fileio import exists, join_path
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, LOOPS, OPTIM_WRAPPERS, OPTIMIZERS
from mmengine.utils import is_abs
from torch import nn
from torch.utils.data import ConcatDataset

from kswap import (
    MODEL_FILE,
    SETS,
    AuditSettings,
    LabelSpace,
    Phase,
    SwapConfig,
    SwapConfigError,
    SwapSession,
    adapt_checkpoint,
    adapt_model,
    atomic_write_text,
    check_head_size,
    parent_of,
    score_key,
)

from .audit import PROBE_IMAGES, audit_detector
from .checkpoint import local_checkpoint_loader, rng_states, set_rng_states
from .detector import extend_dino_classes, make_swap_detector
from .evaluation import SetScorer
from .loop import SwapTrainLoop  # noqa: F401  (registers the loop the hook builds)
from .msda import msda_routed_to_kswap

CHECKPOINT_HINT = ("Set load_from to the pretrained detector (trained on the train dataset's metainfo classes); a "
                   f"swapped model ({MODEL_FILE}) runs with the swapped_config.py written next to it.")
# IterTimerHook's scalars in the message hub (mmengine files training scalars under "train/").
TIMER_SCALARS = ("train/time", "train/data_time")


def without_paramwise_lines(record: logging.LogRecord) -> bool:
    """A logging filter: drops mmengine's ``paramwise_options -- <param>:<key>=<value>`` lines."""
    return not str(record.msg).startswith("paramwise_options -- ")


def checkpoints_trainable(model: nn.Module) -> bool:
    """Whether activation checkpointing (mmdet's ``with_cp``, or ``num_cp`` of DETR encoders) re-runs the forward
    of a module holding trainable parameters (LoRA) in the backward."""
    return any((getattr(m, "with_cp", False) or getattr(m, "num_cp", 0) > 0)
               and any(p.requires_grad for p in m.parameters()) for m in model.modules())


def swap_wrapper_cfg(cfg: Config, model: nn.Module) -> dict[str, Any]:
    """The config's DDP wrapper (mmengine's default one where it has none) for the swapped model.

    On CPU (gloo) DDP takes no ``device_ids``. Checkpointing re-runs a forward in the backward, so DDP would see
    LoRA's gradients ready twice ("mark a variable ready only once") unless ``static_graph`` tells it that every
    step uses the same parameters.
    """
    wrapper = copy.deepcopy(dict(cfg.get("model_wrapper_cfg") or dict(
        type="MMDistributedDataParallel", broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False))))
    if next(model.parameters()).device.type == "cpu":
        wrapper["device_ids"] = None
    if checkpoints_trainable(model):
        wrapper.setdefault("static_graph", True)
    return wrapper


def set_spec(value: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """A set argument as ``dict(classes=..., train=..., val=...)``; a plain sequence holds the class names."""
    if value is None:
        return {}
    return dict(value) if isinstance(value, Mapping) else {"classes": value}


@HOOKS.register_module()
class SwapHook(Hook):
    """Forget, retain and learn classes of a pretrained detector: the host of a ``kswap.SwapSession``, which
    ``SwapTrainLoop`` steps through its phases.

    Args:
        forget: the pretrained class names to forget, or ``dict(classes=(...))`` optionally with ``train``/``val``
            dataset overrides (COCO files of its own); by default the config's own datasets, filtered by class.
        learn: ``dict(classes=(...), train=dict(...), val=dict(...))``: the new classes and their COCO files.
        retain: like ``forget``; ``None`` keeps every other pretrained class.
        batch_size: images per role per step (default: the config's train batch size).
        checkpoint_interval: also save a resumable checkpoint every N steps (0: at phase ends only).
        out_dir: where the report, ``model_swapped.pth``, ``swap_adapter.safetensors`` and the stock test configs
            go (default: the run's work_dir).
        audit: after the swap, audit the forgetting into the report (``audit`` in ``swap_report.json``): ``True``
            for the defaults, or ``dict(relearn_shots=5, relearn_steps=50, relearn_lr=1e-4, probe_steps=100,
            neighbours=3, seed=..., probe_images=500)`` (``kswap.AuditSettings``, the seed defaulting to the run's,
            and at most ``probe_images`` images per split for the probes). Linear probes on
            the decoder query matched to each forget / retain object, a relearn attack on a copy of the merged
            model and the neighbour-class score mass, for the pretrained and the swapped model (see
            ``mmdet_swap.audit``). Off by default; the exported model is the same either way.
        **settings: every other ``kswap.SwapConfig`` field under its own name, over the ``detection`` preset
            (``kswap.config_fields()`` lists them; an unknown one raises ``SwapConfigError``):
            ``order`` (``learn_then_forget``, the recommended one), ``learn_length`` / ``forget_length``
            (``'500steps'`` or ``'20epochs'``, epochs of the retain-side loader; 20 epochs), ``learn_loss`` /
            ``forget_loss`` (only the keys given change the preset's bnd 15, beta 0.2, alpha 0.01, learn weight
            0.9; ``forget_loss=dict(bnd=3, bnd_relative=True)`` bounds the forget loss at 3x its value measured at
            the forget phase start), ``lora`` (likewise over rank 8, scaling 1/8, targets ``mmdet_dino``),
            ``forget_retains_learned`` (a forget phase after a learn phase retains R and L; ``True``),
            ``reset_optimizer_between_phases`` (a fresh optimizer at each phase start; ``False``) and
            ``restart_lr_schedule``, which has no effect here: the swap keeps the optimizer's LR constant, as the
            reference does, and runs no ``param_scheduler`` of the config.
    """

    priority = "VERY_HIGH"

    def __init__(
        self,
        forget: Mapping[str, Any] | Sequence[str],
        learn: Mapping[str, Any],
        retain: Mapping[str, Any] | Sequence[str] | None = None,
        batch_size: int | None = None,
        checkpoint_interval: int = 0,
        out_dir: str | None = None,
        audit: bool | Mapping[str, Any] = False,
        **settings: Any,
    ) -> None:
        self.specs = {"forget": set_spec(forget), "retain": set_spec(retain), "learn": set_spec(learn)}
        for name in ("forget", "learn"):
            if not self.specs[name].get("classes"):
                raise SwapConfigError(f"SwapHook: {name} needs classes=(...) (class names).")
        if not (self.specs["learn"].get("train") and self.specs["learn"].get("val")):
            raise SwapConfigError("SwapHook: learn needs train=dict(ann_file=..., data_prefix=...) and val=dict(...) "
                                  "with the new classes' COCO files.")
        classes = {name: spec.get("classes") or None for name, spec in self.specs.items()}
        self.config = SwapConfig.preset("detection", **classes, **settings)
        self.config.refuse_timm_only_terms("SwapHook (learn_loss / forget_loss)")
        self.batch_size = batch_size
        self.checkpoint_interval = checkpoint_interval
        self.out_dir = out_dir
        self.audit = {} if audit is True else dict(audit) if audit else None
        if self.audit is not None:
            known = [f.name for f in fields(AuditSettings)] + ["probe_images"]
            unknown = set(self.audit) - set(known)
            if unknown:
                raise SwapConfigError(f"SwapHook: audit has no {sorted(unknown)}; it takes {known}.")
        self.session: SwapSession | None = None
        self.pretrained_buffers: dict[str, torch.Tensor] | None = None
        self._run_patches = contextlib.ExitStack()
        # mmengine builds the config's optimizer after the hooks and before before_run, logging a line for every
        # parameter its paramwise_cfg matches (hundreds on DINO); before_run replaces it by one over LoRA, so those
        # lines would describe nothing that trains. Quiet until the run ends.
        logger = MMLogger.get_current_instance()
        logger.addFilter(without_paramwise_lines)
        self._run_patches.callback(logger.removeFilter, without_paramwise_lines)

    # -- surgery -------------------------------------------------------------------------------------------------
    def before_run(self, runner: Any) -> None:
        if not (runner._load_from or runner._resume):
            raise SwapConfigError("SwapHook edits a trained detector: set load_from to its checkpoint.")
        self.runner = runner
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        pretrained = runner.train_loop.dataloader.dataset.metainfo["classes"]
        self.space = LabelSpace.for_config(pretrained, self.config)
        self.sets = self.space.resolve(self.config).as_dict()
        check_head_size(model.bbox_head.num_classes, self.space.num_pretrained, where="bbox_head")
        # Not kswap.prepare_model: DINO has one class branch per decoder layer and a denoising label embedding.
        self.grown = extend_dino_classes(model, len(self.space.new))
        prepared = adapt_model(model, self.config, self.grown)
        # A function, not a bound method: merge_and_export deep-copies the model, which would copy the hook too.
        make_swap_detector(model, lambda task: self.session.phase_loss(task))
        model.dataset_meta = {**(getattr(model, "dataset_meta", None) or {}), "classes": self.space.names}
        self.model = model
        runner.model = runner.wrap_model(swap_wrapper_cfg(runner.cfg, model), model) if runner.distributed else model
        runner.optim_wrapper = self._lora_optim_wrapper(runner)
        if "paramwise_cfg" in runner.cfg.optim_wrapper:
            runner.logger.info("SwapHook: the config's optimizer is rebuilt over the LoRA parameters alone; its "
                               "paramwise_cfg does not apply to them.")
        # The reference keeps the detection LR constant; the config's epoch-based schedule does not apply.
        runner.param_schedulers = []
        if self.config.restart_lr_schedule:
            runner.logger.warning("SwapHook: restart_lr_schedule has no effect: the swap keeps the LR constant.")
        self._build_data(runner)
        self.session = SwapSession(
            self.config, self, prepared, metric="bbox_mAP",
            log=lambda level, message: runner.logger.log(level, f"SwapHook: {message}"),
            classes={s: [self.space.names[i] for i in ids] for s, ids in self.sets.items()},
            parent=parent_of(runner._load_from))
        runner._train_loop = LOOPS.build(dict(type="SwapTrainLoop", swap=self), default_args=dict(runner=runner))
        # For this run only (after_run undoes them): the checkpoints load under torch >= 2.6, the kernel serves.
        # A run that raises gets no after_run: loading the checkpoint (load_or_resume, next) and the swap loop
        # undo them themselves.
        self._run_patches.enter_context(local_checkpoint_loader())
        self._run_patches.enter_context(msda_routed_to_kswap())
        runner.load_or_resume = self.undoing_patches_on_error(runner.load_or_resume)
        self._run_patches.callback(vars(runner).pop, "load_or_resume", None)
        runner.logger.info(f"SwapHook: LoRA in {len(prepared.groups)} groups; classes {self.space.num_pretrained} -> "
                           f"{self.space.num_classes}; phases {[p.name for p in self.session.phases]} of "
                           f"{self.session.scheduler.phase_steps} steps")

    def after_run(self, runner: Any) -> None:
        self._run_patches.close()

    def undoing_patches_on_error(self, step: Callable[[], Any]) -> Callable[[], Any]:
        """``step``, closing the run's patches when it raises (mmengine then calls no after_run)."""

        @functools.wraps(step)
        def run_step() -> Any:
            try:
                return step()
            except BaseException:
                self._run_patches.close()
                raise

        return run_step

    def _lora_optim_wrapper(self, runner: Any) -> Any:
        """The config's optimizer and wrapper type over the trainable (LoRA) parameters only."""
        cfg = copy.deepcopy(runner.cfg.optim_wrapper)
        optimizer = OPTIMIZERS.build({**cfg.pop("optimizer"),
                                      "params": [p for p in self.model.parameters() if p.requires_grad]})
        cfg.pop("paramwise_cfg", None)
        cfg.pop("constructor", None)
        return OPTIM_WRAPPERS.build({**cfg, "optimizer": optimizer})

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Map the checkpoint onto the grown, LoRA-injected model (refusing one that does not fit); on resume,
        restore the swap's position, data order and report."""
        saved = checkpoint.get("swap")
        # Only the swap's own checkpoints (a resume) may hold the grown class rows: a swapped model is not swapped
        # again as if it were the pretrained one.
        checkpoint["state_dict"] = adapt_checkpoint(checkpoint["state_dict"], self.model, self.grown,
                                                    hint=CHECKPOINT_HINT, grown_ok=saved is not None)
        if saved is not None:  # resume: the report's run time goes on from the saved one
            set_rng_states(saved["rng"])
            self.session.load_state_dict(saved)
            self.pretrained_buffers = saved.get("pretrained_buffers")

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """The session's state plus what mmdet needs besides: the global RNGs (denoising noise, the pipeline's
        random transforms) and, for the audit, the pretrained buffers."""
        # The session's report ticks its run time: a resumed run goes on adding.
        checkpoint["swap"] = {**self.session.state_dict(), "rng": rng_states()}
        if self.pretrained_buffers is not None:
            checkpoint["swap"]["pretrained_buffers"] = self.pretrained_buffers

    def save(self, state: dict[str, Any] | None = None, tag: str = "") -> None:
        """A resumable checkpoint (the session's ``state`` goes in through ``before_save_checkpoint``);
        ``last_checkpoint`` moves to it only once it is completely written."""
        runner = self.runner
        name = f"iter_{runner.train_loop.iter}.pth"
        runner.save_checkpoint(runner.work_dir, name, save_optimizer=True, save_param_scheduler=False)
        if runner.rank == 0:
            atomic_write_text(Path(runner.work_dir) / "last_checkpoint", str(Path(runner.work_dir) / name))

    def checkpoint_due(self, step: int) -> bool:
        """Whether ``checkpoint_interval`` asks for a checkpoint after ``step`` steps."""
        return bool(self.checkpoint_interval) and step % self.checkpoint_interval == 0

    # -- data ----------------------------------------------------------------------------------------------------
    def _dataset_cfg(self, runner: Any, name: str, split: str, every_object: bool = False) -> dict:
        """Set ``name``'s dataset of ``split`` in the joint label space: the images showing its classes and their
        objects of those classes, or with ``every_object`` every image and every object of the joint classes."""
        base = runner.cfg.train_dataloader.dataset if split == "train" else runner.cfg.val_dataloader.dataset
        cfg = copy.deepcopy(dict(base))
        cfg.update(copy.deepcopy(self.specs[name].get(split, {})))
        keep = None if every_object else [self.space.names[i] for i in self.sets[name]]
        cfg.update(type="SwapCocoDataset", keep_classes=keep, metainfo=dict(classes=self.space.names))
        return cfg

    def _check_ann_file(self, cfg: Mapping[str, Any], name: str, split: str) -> None:
        """Refuse a set whose COCO file is missing, naming the set and the key that sets its path (pycocotools'
        own error names neither)."""
        ann_file, data_root = cfg.get("ann_file", ""), cfg.get("data_root", "")
        path = join_path(data_root, ann_file) if ann_file and data_root and not is_abs(ann_file) else ann_file
        if exists(path, backend_args=cfg.get("backend_args")):
            return
        root = f" (relative to data_root {data_root})" if data_root and not is_abs(ann_file) else ""
        raise SwapConfigError(f"SwapHook: the {name} set's {split} annotation file {path!r} does not exist: set "
                              f"SwapHook's {name}=dict({split}=dict(ann_file=...)){root} to its COCO file.")

    def _build_data(self, runner: Any) -> None:
        self.train_sets = {name: self._dataset_cfg(runner, name, "train") for name in SETS}
        # Scoring keeps every labelled object of the sets' test images (see evaluation.py); sets read from the
        # same files share one dataset.
        self.eval_cfgs = {name: self._dataset_cfg(runner, name, "val", every_object=True) for name in SETS}
        for split, cfgs in (("train", self.train_sets), ("val", self.eval_cfgs)):
            for name, cfg in cfgs.items():
                self._check_ann_file(cfg, name, split)
        built: dict[str, Any] = {}
        datasets = {}
        for name, cfg in self.eval_cfgs.items():
            key = json.dumps(cfg, sort_keys=True, default=str)
            if key not in built:
                built[key] = DATASETS.build(cfg)
            datasets[name] = built[key]
        # Every rank scores the whole union (a sharded sampler would give each rank a different mAP).
        self.scorer = SetScorer(datasets, self.sets, self.space.names,
                                runner.cfg.val_dataloader.get("batch_size", 1))

    # -- the session's host (kswap.SwapHost): role loaders and phase starts; SwapTrainLoop runs the steps ------
    def role_loader(self, phase: Phase, role: str, sets: tuple[str, ...]) -> Any:
        """mmengine's loader of the config's train dataloader over the concatenation of ``role``'s sets."""
        runner = self.runner
        datasets = [self.train_sets[s] for s in sets]
        dataset = datasets[0] if len(datasets) == 1 else dict(type="ConcatDataset", datasets=datasets)
        cfg = copy.deepcopy(dict(runner.cfg.train_dataloader))
        # A loader of its own generator: creating an iterator then draws no number from the global RNG, whose
        # state (DINO's denoising noise) a resumed run restores.
        cfg.update(dataset=dataset, batch_size=self.batch_size or cfg["batch_size"],
                   sampler=dict(type="SwapSampler", shuffle=True, seed=(runner.seed or 0) + 1000 * phase.index),
                   generator=torch.Generator().manual_seed(runner.seed or 0))
        cfg.pop("batch_sampler", None)
        loader = runner.build_dataloader(cfg, seed=runner.seed)
        if len(loader.dataset) == 0:
            raise SwapConfigError(f"SwapHook: the {role} loader of phase {phase.name} has no images.")
        return loader

    # -- phases, evaluation, outputs -----------------------------------------------------------------------------
    def score(self, subsample: bool = False) -> tuple[dict[str, float], dict[str, int]]:
        """The per-set scores of the model over the sets' whole test images, and the images each read."""
        return self.scorer(self.model), self.scorer.images_per_score()

    def before_swap(self, runner: Any) -> None:
        scores = self.session.score_before()
        if scores is not None:
            self.log_scores(runner, scores)
            if self.audit is not None:
                # Frozen weights stay as loaded, but a config without norm_eval moves BatchNorm statistics while
                # the swap trains: the audit's pretrained row needs them as they were.
                self.pretrained_buffers = {k: v.detach().clone() for k, v in self.model.named_buffers()}

    def start_phase(self, phase: Phase) -> None:
        runner = self.runner
        if phase.index > 0 and self.config.reset_optimizer_between_phases:
            runner.optim_wrapper = self._lora_optim_wrapper(runner)
        # The logger reports every train scalar of the message hub, each a running mean: drop the last phase's
        # (the loss, its terms such as learn/task in a forget phase, the gradient norm) so that this phase's
        # lines show this phase alone. IterTimerHook's step times go on (they feed the ETA).
        hub = runner.message_hub
        for key in [k for k in hub.log_scalars if k.startswith("train/") and k not in TIMER_SCALARS]:
            del hub.log_scalars[key]
            # A resumable key without a value would be warned about as the run is resumed.
            hub._resumed_keys.pop(key, None)
        runner.logger.info(f"SwapHook: phase {phase.name} ({self.session.scheduler.phase_steps[phase.index]} steps)")

    def log_scores(self, runner: Any, scores: Mapping[str, float]) -> None:
        """The per-set scores under ``swap/<set>``, at the current step, in the message hub and the visualizer's
        backends (the file LoggerHook writes the training scalars to, TensorBoard, ...); the session logs the line."""
        logged = {score_key(k): v for k, v in scores.items()}
        runner.message_hub.update_scalars(logged)
        runner.visualizer.add_scalars(logged, step=self.session.scheduler.global_step,
                                      file_path=f"{runner.timestamp}.json")

    def finish(self, runner: Any) -> None:
        if runner.rank != 0:
            return
        out = Path(self.out_dir or runner.work_dir)
        report = self.session.report
        if self.audit is not None:
            report.audit = self._audit(runner)
        meta = {"dataset_meta": {"classes": list(self.space.names)}, "kswap": {"report": str(out / "swap_report.json")}}
        model = self.session.export(out, meta=meta)["model"]
        self._write_stock_test_configs(runner, out)
        runner.logger.info("\n" + report.to_markdown())
        runner.logger.info(f"SwapHook: score {model} with mmdet's tools/test.py "
                           f"{out / 'swapped_test_<set>.py'} {model} (set: {', '.join(SETS)})")

    def _audit(self, runner: Any) -> dict[str, Any]:
        options = {"seed": runner.seed or 0, **self.audit}
        probe_images = options.pop("probe_images", PROBE_IMAGES)
        settings = AuditSettings(**options)
        runner.logger.info(f"SwapHook: auditing the forgetting ({settings})")
        if self.pretrained_buffers is None:
            runner.logger.warning("SwapHook: the run resumed from a checkpoint written without audit, which lacks "
                                  "the buffers (BatchNorm statistics) of the pretrained model: its audit row uses "
                                  "the current ones.")
        # The probes read objects through the test pipeline (no augmentation, boxes as annotated).
        probe_sets = {split: ConcatDataset([DATASETS.build({**self._dataset_cfg(runner, name, cfg_split),
                                                            "pipeline": self.eval_cfgs[name]["pipeline"],
                                                            "test_mode": True})
                                            for name in ("forget", "retain")])
                      for split, cfg_split in (("train", "train"), ("test", "val"))}
        batch_sizes = (self.batch_size or runner.cfg.train_dataloader.batch_size,
                       runner.cfg.val_dataloader.get("batch_size", 1))
        attack_sets = {role: DATASETS.build(self.train_sets[role]) for role in ("forget", "retain")}
        audit = audit_detector(self.model, self.pretrained_buffers, self.grown, self.scorer, probe_sets, attack_sets,
                               self.sets, settings, batch_sizes, probe_images)
        runner.logger.info(f"SwapHook: audit {audit}")
        return audit

    def _write_stock_test_configs(self, runner: Any, out: Path) -> None:
        """What mmdet's ``tools/test.py`` needs to score ``model_swapped.pth`` per set in the joint label space.

        ``swapped_config.py``: the run's config without the swap, with ``num_classes`` = old + new and
        ``load_from`` the merged model. Per set, ``swapped_<set>.json`` (the test images of all sets, the set's
        objects; categories: the joint class list, ``id`` = label + 1) and ``swapped_test_<set>.py``,
        which inherits ``swapped_config.py`` and tests on that file with ``CocoMetric``.
        """
        cfg = copy.deepcopy(runner.cfg)
        cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") not in ("SwapHook", SwapHook)]
        imports = (cfg.get("custom_imports") or {}).get("imports", [])
        imports = [m for m in ([imports] if isinstance(imports, str) else imports) if m.split(".")[0] != "mmdet_swap"]
        if imports:
            cfg.custom_imports.imports = imports
        else:
            cfg.pop("custom_imports", None)
        cfg.model.bbox_head.num_classes = self.space.num_classes
        cfg.load_from, cfg.resume = str(out / MODEL_FILE), False
        atomic_write_text(out / "swapped_config.py", cfg.pretty_text)
        for name in SETS:
            ann_file = out / f"swapped_{name}.json"
            atomic_write_text(ann_file, json.dumps(self.scorer.coco(name)))
            dataset = {k: v for k, v in self.eval_cfgs[name].items() if k != "keep_classes"}
            # The file holds every scored image under its absolute path.
            dataset.update(_delete_=True, type="CocoDataset", ann_file=str(ann_file), data_prefix=dict(img=""),
                           test_mode=True, metainfo=dict(classes=tuple(self.space.names)))
            test = Config(dict(
                test_dataloader=dict(batch_size=runner.cfg.val_dataloader.get("batch_size", 1), dataset=dataset),
                test_evaluator=dict(_delete_=True, type="CocoMetric", ann_file=str(ann_file), metric="bbox",
                                    format_only=False)))
            atomic_write_text(out / f"swapped_test_{name}.py",
                              f"# {MODEL_FILE} on the {name} set, joint label space: mmdet's tools/test.py "
                              f"swapped_test_{name}.py {MODEL_FILE}\n_base_ = ['./swapped_config.py']\n\n"
                              f"{test.pretty_text}")
