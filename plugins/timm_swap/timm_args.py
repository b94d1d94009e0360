"""Every key of timm's ``train.py`` args.yaml, and what ``timm_swap.train`` does with it.

timm's train.py writes a run's whole configuration to ``output/train/<run>/args.yaml``; that file is a timm user's
config, so ``train.py -c args.yaml`` accepts all of its keys. ``TIMM_KEYS`` holds the keys ``build_parser`` does not
declare (with timm's flag, type and default: checked against timm's parser at commit aa4b585, timm 1.0.29.dev0) and
the declared keys the swap does not use, each with a rule for plain training and one for ``--plugin swap``:

- honoured: used as timm's train.py uses it;
- ignored: the reason and what is done instead, listed at start when the value is not timm's default; the key then
  takes timm's default, so nothing downstream reads it;
- refused: a value other than timm's default stops the run before training with the fix.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import yaml

from kswap import SwapConfigError


class ParseKwargs(argparse.Action):
    """``--model-kwargs key=value ...`` into a dict, values parsed as YAML scalars (as timm)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string} expects key=value pairs, got {item!r}")
            kwargs[key] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


class Use(str, Enum):
    HONOURED = "honoured"
    IGNORED = "ignored"
    REFUSED = "refused"


@dataclass(frozen=True)
class Rule:
    """What happens to a key: ``note`` is the reason and what is done instead (ignored) or the fix (refused)."""

    use: Use
    note: str = ""


HONOURED = Rule(Use.HONOURED)


def ignored(note: str) -> Rule:
    return Rule(Use.IGNORED, note)


def refused(note: str) -> Rule:
    return Rule(Use.REFUSED, note)


@dataclass(frozen=True)
class TimmKey:
    """One key of timm's args.yaml.

    Args:
        name: the key (the flag's argparse dest).
        default: timm's default.
        option: argparse keyword arguments of timm's flag; ``None`` when ``build_parser`` declares the flag itself.
        plain: the rule without a plugin.
        swap: the rule under ``--plugin swap`` (``None``: as ``plain``).
        flags: the option strings (default: ``--name-with-dashes``).
    """

    name: str
    default: Any
    option: dict[str, Any] | None
    plain: Rule
    swap: Rule | None = None
    flags: tuple[str, ...] = ()

    @property
    def option_strings(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    def rule(self, swap: bool) -> Rule:
        return self.swap if swap and self.swap is not None else self.plain


def _flag(type_: type = str, **kwargs: Any) -> dict[str, Any]:
    return {"type": type_, **kwargs}


_TRUE = {"action": "store_true"}

_AUG_SWAP = ignored("the swap trains on the eval transform (resize, center crop, normalize) as the reference "
                    "recipe: no augmentation")
_ITERABLE = ignored("only for iterable/hub datasets (--dataset wds/, tfds/, hfds/, ...), which are refused: "
                    "ImageFolders are read from --data-dir")
_MIXUP = ignored("mixup/cutmix are not implemented here: batches are not mixed (use timm's train.py for mixup)")
_MIXUP_SWAP = ignored("the swap's losses need each image's own set (forget/retain/learn): batches are not mixed")
_EMA = ignored("no EMA copy of the weights is kept: checkpoints (and the swap's export) hold the trained weights")
_KD = ignored("knowledge distillation is not implemented: the loss uses the labels only")
_KD_SWAP = ignored("no teacher model: the swap's retain term keeps the pretrained behaviour on the retained classes")
_VARSIZE = ignored("batches have one fixed image size (--input-size, or the model's)")
_NAFLEX = ignored("only with naflex_loader, which is refused")
_EAGER = ignored("the model runs eagerly (same results, no compilation)")

# timm's keys, in the order of its parser's groups.
TIMM_KEYS: tuple[TimmKey, ...] = (
    # Dataset parameters
    TimmKey("dataset", "", _flag(), refused(
        "this script reads ImageFolders only: convert the data to DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg, "
        "pass --data-dir DIR and remove the dataset key")),
    TimmKey("train_num_samples", None, _flag(int), _ITERABLE),
    TimmKey("val_num_samples", None, _flag(int), _ITERABLE),
    TimmKey("dataset_download", False, _TRUE, _ITERABLE),
    TimmKey("class_map", "", _flag(), HONOURED, refused(
        "the swap numbers the pretrained classes in timm's ImageFolder order (the order a head trained without a "
        "class map has): remove class_map, renaming the class folders if the model was trained with one")),
    TimmKey("input_img_mode", None, _flag(), HONOURED),
    TimmKey("input_key", None, _flag(), _ITERABLE),
    TimmKey("target_key", None, _flag(), _ITERABLE),
    TimmKey("dataset_trust_remote_code", False, _TRUE, _ITERABLE),
    # Model parameters
    TimmKey("pretrained_path", None, _flag(), HONOURED),
    TimmKey("channels_last", False, _TRUE, HONOURED),
    TimmKey("fuser", "", _flag(), ignored("only for TorchScript, which is refused")),
    TimmKey("grad_accum_steps", 1, _flag(int), HONOURED),
    TimmKey("grad_checkpointing", False, _TRUE, HONOURED),
    TimmKey("fast_norm", False, _TRUE, HONOURED),
    TimmKey("head_init_scale", None, _flag(float), HONOURED,
            refused("the swap keeps the pretrained head as trained: remove head_init_scale")),
    TimmKey("head_init_bias", None, _flag(float), HONOURED,
            refused("the swap keeps the pretrained head as trained: remove head_init_bias")),
    TimmKey("torchcompile_mode", None, _flag(), _EAGER),
    TimmKey("torchscript", False, _TRUE, refused("training needs the eager model: remove torchscript")),
    TimmKey("torchcompile", None, _flag(nargs="?", const="inductor"), _EAGER),
    # Device parameters
    TimmKey("amp", False, _TRUE, HONOURED),
    TimmKey("amp_dtype", "float16", _flag(), HONOURED),
    TimmKey("model_dtype", None, _flag(), refused(
        "weights are trained in float32: remove model_dtype (for low precision use amp with amp_dtype bfloat16)")),
    TimmKey("no_ddp_bb", False, _TRUE, HONOURED),
    TimmKey("synchronize_step", False, _TRUE, ignored("it only makes timm's step timing exact; nothing is timed")),
    TimmKey("local_rank", 0, _flag(int), ignored("torchrun's LOCAL_RANK environment variable is read instead"),
            flags=("--local_rank",)),
    TimmKey("device_modules", None, _flag(nargs="+"), HONOURED),
    # Optimizer parameters
    TimmKey("layer_decay_min_scale", 0, _flag(float), HONOURED),
    TimmKey("layer_decay_no_opt_scale", None, _flag(float), HONOURED),
    TimmKey("opt_kwargs", {}, {"nargs": "*", "action": ParseKwargs}, HONOURED, ignored(
        "keyword arguments of the run's --opt; the swap's optimizer is --swap-opt with timm's defaults")),
    # Learning rate schedule parameters
    TimmKey("lr_base_scale", "", _flag(), HONOURED,
            ignored("the swap's learning rate is --swap-lr, not scaled by the batch size")),
    TimmKey("lr_noise", None, _flag(float, nargs="+"), HONOURED),
    TimmKey("lr_noise_pct", 0.67, _flag(float), HONOURED),
    TimmKey("lr_noise_std", 1.0, _flag(float), HONOURED),
    TimmKey("lr_cycle_mul", 1.0, _flag(float), HONOURED),
    TimmKey("lr_cycle_decay", 0.5, _flag(float), HONOURED),
    TimmKey("lr_cycle_limit", 1, _flag(int), HONOURED),
    TimmKey("lr_k_decay", 1.0, _flag(float), HONOURED),
    TimmKey("epochs", 300, None, HONOURED,
            ignored("the phase lengths are --swap-learn-length and --swap-forget-length")),
    TimmKey("epoch_repeats", 0.0, _flag(float), _ITERABLE),
    TimmKey("start_epoch", None, _flag(int), refused(
        "remove start_epoch: --resume continues at the checkpoint's exact position")),
    TimmKey("patience_epochs", 10, _flag(int), HONOURED),
    # Augmentation and regularization parameters
    TimmKey("no_aug", False, None, HONOURED, _AUG_SWAP),
    TimmKey("train_crop_mode", None, _flag(), HONOURED, _AUG_SWAP),
    TimmKey("scale", [0.08, 1.0], None, HONOURED, _AUG_SWAP),
    TimmKey("ratio", [3.0 / 4.0, 4.0 / 3.0], None, HONOURED, _AUG_SWAP),
    TimmKey("hflip", 0.5, None, HONOURED, _AUG_SWAP),
    TimmKey("vflip", 0.0, None, HONOURED, _AUG_SWAP),
    TimmKey("color_jitter", 0.4, None, HONOURED, _AUG_SWAP),
    TimmKey("color_jitter_prob", None, _flag(float), HONOURED, _AUG_SWAP),
    TimmKey("grayscale_prob", None, _flag(float), HONOURED, _AUG_SWAP),
    TimmKey("gaussian_blur_prob", None, _flag(float), HONOURED, _AUG_SWAP),
    TimmKey("aa", None, _flag(), HONOURED, _AUG_SWAP),
    TimmKey("aug_repeats", 0, _flag(float), refused(
        "repeated-augmentation sampling is not implemented: remove aug_repeats")),
    TimmKey("aug_splits", 0, _flag(int), refused("augmentation splits are not implemented: remove aug_splits")),
    TimmKey("jsd_loss", False, _TRUE, refused(
        "the loss is cross-entropy (the swap's terms are defined on it): remove jsd_loss")),
    TimmKey("bce_loss", False, _TRUE, refused(
        "the loss is cross-entropy (the swap's terms are defined on it): remove bce_loss")),
    TimmKey("bce_sum", False, _TRUE, ignored("only with bce_loss, which is refused")),
    TimmKey("bce_target_thresh", None, _flag(float), ignored("only with bce_loss, which is refused")),
    TimmKey("bce_pos_weight", None, _flag(float), ignored("only with bce_loss, which is refused")),
    TimmKey("reprob", 0.0, _flag(float), HONOURED, _AUG_SWAP),
    TimmKey("remode", "pixel", _flag(), HONOURED, _AUG_SWAP),
    TimmKey("recount", 1, _flag(int), HONOURED, _AUG_SWAP),
    TimmKey("resplit", False, _TRUE, ignored("only with aug_splits, which is refused")),
    TimmKey("mixup", 0.0, _flag(float), _MIXUP, _MIXUP_SWAP),
    TimmKey("cutmix", 0.0, _flag(float), _MIXUP, _MIXUP_SWAP),
    TimmKey("cutmix_minmax", None, _flag(float, nargs="+"), _MIXUP, _MIXUP_SWAP),
    TimmKey("mixup_prob", 1.0, _flag(float), _MIXUP, _MIXUP_SWAP),
    TimmKey("mixup_switch_prob", 0.5, _flag(float), _MIXUP, _MIXUP_SWAP),
    TimmKey("mixup_mode", "batch", _flag(), _MIXUP, _MIXUP_SWAP),
    TimmKey("mixup_off_epoch", 0, _flag(int), _MIXUP, _MIXUP_SWAP),
    TimmKey("smoothing", 0.1, None, HONOURED,
            ignored("the swap's task losses are plain cross-entropy, as the reference recipe")),
    TimmKey("train_interpolation", "random", _flag(), HONOURED, _AUG_SWAP),
    TimmKey("drop_connect", None, _flag(float), ignored("deprecated and unused by timm's train.py too: use drop_path")),
    TimmKey("drop_block", None, _flag(float), HONOURED),
    # Batch norm parameters
    TimmKey("bn_momentum", None, _flag(float), HONOURED),
    TimmKey("bn_eps", None, _flag(float), HONOURED),
    TimmKey("sync_bn", False, _TRUE, HONOURED),
    TimmKey("dist_bn", "reduce", _flag(), HONOURED),
    TimmKey("split_bn", False, _TRUE, refused("only with aug_splits, which is not implemented: remove split_bn")),
    # Model exponential moving average parameters
    TimmKey("model_ema", False, _TRUE, _EMA),
    TimmKey("model_ema_force_cpu", False, _TRUE, _EMA),
    TimmKey("model_ema_decay", 0.9998, _flag(float), _EMA),
    TimmKey("model_ema_warmup", False, _TRUE, _EMA),
    # Miscellaneous parameters
    TimmKey("worker_seeding", "all", _flag(), ignored(
        "PyTorch seeds each loader worker (torch and random) from --seed")),
    TimmKey("val_interval", 1, _flag(int), HONOURED,
            ignored("the swap evaluates at each phase end and every --swap-eval-interval steps")),
    TimmKey("checkpoint_hist", 10, _flag(int), ignored("last.pth and model_best.pth are kept (no top-N history)")),
    TimmKey("save_images", False, _TRUE, ignored("a debugging aid of timm's train.py: no images are saved")),
    TimmKey("pin_mem", False, _TRUE, HONOURED),
    TimmKey("no_prefetcher", False, _TRUE, ignored(
        "there is no CUDA prefetcher here: the transform normalizes on the CPU (same results)")),
    TimmKey("tta", 0, _flag(int), ignored("validation runs without test-time augmentation")),
    TimmKey("use_multi_epochs_loader", False, _TRUE, ignored("a plain DataLoader is used (same results)")),
    TimmKey("wandb_tags", [], _flag(nargs="+"), HONOURED),
    TimmKey("wandb_resume_id", "", _flag(), HONOURED),
    # Variable-size training
    TimmKey("train_img_sizes", None, _flag(int, nargs="+"), _VARSIZE),
    TimmKey("train_batch_sizes", None, _flag(int, nargs="+"), _VARSIZE),
    TimmKey("train_size_probs", None, _flag(float, nargs="+"), _VARSIZE),
    TimmKey("train_size_schedule", "constant", _flag(choices=("constant", "progressive")), _VARSIZE),
    TimmKey("train_size_schedule_spread", 0.65, _flag(float), _VARSIZE),
    TimmKey("train_size_random_mix", 0.1, _flag(float), _VARSIZE),
    TimmKey("train_batches_per_epoch", None, _flag(int), ignored("an epoch is one pass over the train split"),
            ignored("the phase lengths are --swap-learn-length and --swap-forget-length"),
            flags=("--train-batches-per-epoch", "--train-steps-per-epoch")),
    TimmKey("variable_batch_loss_scale", "none", _flag(choices=("none", "sqrt", "linear")), _VARSIZE),
    # NaFlex
    TimmKey("naflex_loader", False, _TRUE, refused(
        "batches are fixed-size images from ImageFolders: remove naflex_loader")),
    TimmKey("naflex_train_seq_lens", [128, 256, 576, 784, 1024], _flag(int, nargs="+"), _NAFLEX),
    TimmKey("naflex_max_seq_len", 576, _flag(int), _NAFLEX),
    TimmKey("naflex_patch_sizes", None, _flag(int, nargs="+"), _NAFLEX),
    TimmKey("naflex_patch_size_probs", None, _flag(float, nargs="+"), _NAFLEX),
    TimmKey("naflex_loss_scale", "linear", _flag(choices=("none", "sqrt", "linear")), _NAFLEX),
    TimmKey("naflex_patchify_channels_first", False, _TRUE, _NAFLEX),
    # Knowledge distillation
    TimmKey("kd_model_name", None, _flag(), _KD, _KD_SWAP),
    TimmKey("kd_distill_type", "logit", _flag(choices=("logit", "feature", "token")), _KD, _KD_SWAP),
    TimmKey("kd_loss_type", "kl", _flag(), _KD, _KD_SWAP),
    TimmKey("distill_loss_weight", None, _flag(float), _KD, _KD_SWAP),
    TimmKey("task_loss_weight", None, _flag(float), _KD, _KD_SWAP),
    TimmKey("kd_temperature", 4.0, _flag(float), _KD, _KD_SWAP),
    TimmKey("kd_student_feature_dim", None, _flag(int), _KD, _KD_SWAP),
    TimmKey("kd_teacher_feature_dim", None, _flag(int), _KD, _KD_SWAP),
    TimmKey("kd_token_distill_type", "soft", _flag(choices=("soft", "hard")), _KD, _KD_SWAP),
)

AMP_DTYPES = ("float16", "bfloat16")


def add_timm_arguments(parser: argparse.ArgumentParser) -> None:
    """timm's flags that ``build_parser`` lacks, with timm's types and defaults (so ``-c`` accepts its args.yaml)."""
    group = parser.add_argument_group("timm train.py options (honoured, ignored or refused: see docs/timm.md)")
    for key in TIMM_KEYS:
        if key.option is not None:
            group.add_argument(*key.option_strings, dest=key.name, default=key.default, **key.option)


def _differs(value: Any, default: Any) -> bool:
    # YAML and argparse give lists where timm's defaults may be tuples.
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) != list(default)
    return value != default


def check_timm_args(args: argparse.Namespace, swap: bool) -> list[str]:
    """Check timm's keys before anything is built; return the lines that list the ignored ones.

    Ignored keys set away from timm's default get one line each (key, value, reason) and are reset to the default;
    the rest are counted in a last line.

    Raises:
        SwapConfigError: a refused key not at timm's default (all of them, each with its fix), or a bad value of an
            honoured key.
    """
    if args.grad_accum_steps < 1:
        raise SwapConfigError(f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}.")
    if args.amp_dtype not in AMP_DTYPES:
        raise SwapConfigError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {args.amp_dtype!r}.")
    errors, lines, unchanged = [], [], 0
    for key in TIMM_KEYS:
        rule = key.rule(swap)
        value = getattr(args, key.name)
        changed = _differs(value, key.default)
        if rule.use is Use.REFUSED and changed:
            errors.append(f"{key.option_strings[0]} {value!r} (key {key.name!r}): {rule.note}")
        elif rule.use is Use.IGNORED and changed:
            lines.append(f"  {key.name}: {value!r} -> {key.default!r}: {rule.note}")
            setattr(args, key.name, key.default)
        elif rule.use is Use.IGNORED:
            unchanged += 1
    if errors:
        raise SwapConfigError("timm options that would change the results in a way this run cannot follow:\n  "
                              + "\n  ".join(errors))
    who = "the swap" if swap else "this script"
    header = [f"timm keys {who} ignores (set to timm's default instead):"] if lines else []
    return [*header, *lines, f"{unchanged} {'more ' if lines else ''}timm keys {who} ignores are at timm's defaults "
                             "(docs/timm.md: 'timm's own args.yaml')"]


def markdown_table(keys: Sequence[TimmKey] = TIMM_KEYS) -> str:
    """docs/timm.md's table: each key's rule in plain training and under ``--plugin swap``."""
    def cell(rule: Rule) -> str:
        return rule.use.value + (f": {rule.note}" if rule.note else "")

    rows = ["| key | timm default | plain training | `--plugin swap` |", "|---|---|---|---|"]
    for key in keys:
        swap = "same" if key.swap is None else cell(key.swap)
        rows.append(f"| `{key.name}` | `{key.default!r}` | {cell(key.plain)} | {swap} |")
    return "\n".join(rows)
