"""Swap configuration: class sets, phase order, per-phase loss weights, LoRA settings and task presets."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import SwapConfigError

ClassRef = str | int


class Order(str, Enum):
    """Order of the learn and forget phases."""

    LEARN_THEN_FORGET = "learn_then_forget"
    FORGET_THEN_LEARN = "forget_then_learn"
    LEARN_FORGET_LEARN = "learn_forget_learn"
    FORGET_LEARN_FORGET = "forget_learn_forget"
    # One phase with all three terms. Not from the reference code: an ablation of the library.
    JOINT = "joint"


@dataclass(frozen=True)
class PhaseLength:
    """Length of one phase, in optimizer steps or in epochs of the phase's retain-side loader."""

    steps: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise SwapConfigError(f"PhaseLength needs exactly one of steps or epochs, got {self}.")
        value = self.steps if self.steps is not None else self.epochs
        if not isinstance(value, int) or value < 1:
            raise SwapConfigError(f"PhaseLength must be a positive integer, got {self}.")

    @classmethod
    def parse(cls, value: str | int | Mapping[str, int] | PhaseLength) -> PhaseLength:
        """Read ``{"steps": n}``, ``{"epochs": n}``, ``"500steps"``, ``"5epochs"`` or an int (epochs)."""
        if isinstance(value, PhaseLength):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        if isinstance(value, int):
            return cls(epochs=value)
        text = str(value).strip().lower()
        for unit in ("steps", "step", "epochs", "epoch"):
            if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
                n = int(text[: -len(unit)])
                return cls(steps=n) if unit.startswith("step") else cls(epochs=n)
        raise SwapConfigError(f"Cannot read phase length {value!r}: write e.g. '500steps' or '5epochs'.")

    def __str__(self) -> str:
        return f"{self.steps}steps" if self.steps is not None else f"{self.epochs}epochs"


@dataclass(frozen=True)
class LearnLoss:
    """Weights of a learn phase's loss: ``w_R·T(R) + w_L·T(L) + alpha·GS``.

    Args:
        retain_weight: weight ``w_R`` of the task loss on the retain batch.
        learn_weight: weight ``w_L`` of the task loss on the learn batch (learn and joint phases).
        alpha: weight of the group-sparse penalty on the LoRA groups.
        distill: weight of a distillation term keeping the retain-side outputs at those of the model at the phase
            start (``distillation_loss``). 0 is the reference. timm only: mmdet and detectron2 refuse a non-zero
            weight.
    """

    retain_weight: float = 1.0
    learn_weight: float = 1.0
    alpha: float = 0.01
    distill: float = 0.0

    def weights(self) -> LossWeights:
        """The phase's ``LossWeights`` (no forgetting term)."""
        return LossWeights(**dataclasses.asdict(self), beta=0.0)

    def validate(self, where: str) -> None:
        self.weights().validate(where)


@dataclass(frozen=True)
class ForgetLoss:
    """Weights of a forget phase's loss: ``w_R·T(R ∪ L) + beta·relu(bnd − T(F)) + alpha·GS``.

    Args:
        retain_weight: weight ``w_R`` of the task loss on the retain-side batch (R, or R ∪ L after a learn phase).
        beta: weight of the bounded forgetting term (forget and joint phases).
        bnd: bound on the forget-set task loss; the forgetting term is zero once the loss exceeds it.
        alpha: weight of the group-sparse penalty on the LoRA groups.
        bnd_relative: read ``bnd`` as a multiple of the forget-set task loss measured at the start of the forget
            phase (``bnd=3`` ascends until that loss has tripled) instead of an absolute value (the reference).
        distill: weight of a distillation term keeping the retain-side outputs at those of the model at the phase
            start (``distillation_loss``): it protects what the learn phase just taught. 0 is the reference.
            timm only: mmdet and detectron2 refuse a non-zero weight.
        feature_mmd: weight of a term making the forget images' features at the classifier's input
            indistinguishable from the retain batch's (``feature_mmd_loss``), so that probes on the features stop
            finding the forgotten classes (docs/audit.md). 0 (off) is the reference. timm only: mmdet and detectron2
            refuse a non-zero weight.
    """

    retain_weight: float = 1.0
    beta: float = 0.2
    bnd: float = 105.0
    alpha: float = 0.01
    bnd_relative: bool = False
    distill: float = 0.0
    feature_mmd: float = 0.0

    def weights(self, learn_weight: float = 0.0) -> LossWeights:
        """The phase's ``LossWeights``; ``learn_weight`` for a joint phase, which also has a learn batch."""
        return LossWeights(**dataclasses.asdict(self), learn_weight=learn_weight)

    def validate(self, where: str) -> None:
        self.weights().validate(where)


@dataclass(frozen=True)
class LossWeights(ForgetLoss):
    """What ``PhaseLoss`` computes a phase's loss with: ``w_R·T(R) + w_L·T(L) + beta·relu(bnd − T(F)) + alpha·GS``.

    A forget loss's terms and a learn weight: a learn phase has no forgetting term (``LearnLoss.weights``), a forget
    phase no learn batch, a joint phase both (``SwapConfig.joint_loss``).

    Args:
        learn_weight: weight ``w_L`` of the task loss on the learn batch (learn and joint phases).
    """

    learn_weight: float = 1.0

    def validate(self, where: str) -> None:
        for name in ("retain_weight", "learn_weight", "beta", "alpha", "distill", "feature_mmd"):
            value = getattr(self, name)
            if not value >= 0:
                raise SwapConfigError(f"{where}.{name} must be >= 0, got {value}.")
        if not self.bnd > 0:
            raise SwapConfigError(
                f"{where}.bnd must be > 0, got {self.bnd}: it bounds the forget-set task loss from above "
                "(reference: 105 classification, 15 detection, 115 segmentation)."
            )
        if self.bnd_relative and not self.bnd > 1:
            raise SwapConfigError(
                f"{where}.bnd={self.bnd} with bnd_relative must be > 1: the bound is that multiple of the forget "
                "loss measured at the phase start, and a bound at or below it forgets nothing (try 2-5)."
            )
        if self.beta > 10:
            raise SwapConfigError(f"{where}.beta={self.beta} is out of range (0..10; reference 0.2).")
        if self.alpha > 10:
            raise SwapConfigError(f"{where}.alpha={self.alpha} is out of range (0..10; reference 0.005-0.01).")

    def resolve_bound(self, measured_forget_loss: float) -> LossWeights:
        """These weights with an absolute ``bnd``: a relative bound becomes that multiple of the measured loss."""
        if not self.bnd_relative:
            return self
        return dataclasses.replace(self, bnd=self.bnd * measured_forget_loss, bnd_relative=False)




@dataclass(frozen=True)
class LoraSettings:
    """LoRA placement and shape.

    Args:
        rank: LoRA rank ``r``.
        scaling: multiplier of ``B·A`` (peft's ``lora_alpha / r``; reference 1/8).
        targets: a regex fully matching module names, or the name of a target preset (see ``TARGET_PRESETS``).
        dropout: dropout on the LoRA input.
        group_by: optional regex whose match at the start of a module name is that module's group;
            by default one group per transformer block is discovered from the names.
        reference_init: re-initialise LoRA as the reference does (A: kaiming_uniform a=√50, B: 0).
    """

    rank: int = 8
    scaling: float = 0.125
    targets: str = "ffn"
    dropout: float = 0.0
    group_by: str | None = None
    reference_init: bool = True

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SwapConfigError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if not self.scaling > 0:
            raise SwapConfigError(f"lora.scaling must be > 0, got {self.scaling}.")
        if not 0 <= self.dropout < 1:
            raise SwapConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        if not self.targets:
            raise SwapConfigError("lora.targets is empty: give a regex or a preset name such as 'ffn'.")


@dataclass(frozen=True)
class SwapConfig:
    """Everything that defines a knowledge swap, independent of the host framework.

    Class sets are names or ids in the pretrained model's label space (``forget``, ``retain``) and names of
    the new classes (``learn``). ``retain=None`` means every pretrained class not in ``forget``.

    Args:
        forget: classes to forget.
        retain: classes to keep; ``None`` for all other pretrained classes.
        learn: new classes to learn.
        order: phase order; ``learn_then_forget`` is the recommended one.
        learn_length: length of each learn phase.
        forget_length: length of each forget phase (also the length of a joint phase).
        learn_loss: loss weights of learn phases.
        forget_loss: loss weights of forget phases.
        lora: LoRA settings.
        forget_retains_learned: a forget phase that follows a learn phase retains R ∪ L (as the reference).
        reset_optimizer_between_phases: build a fresh optimizer at each phase start (reference: segmentation).
        restart_lr_schedule: restart the LR schedule at each phase start (reference: classification, segmentation).
        task: the preset this config came from, for the report.
    """

    forget: tuple[ClassRef, ...]
    learn: tuple[ClassRef, ...]
    retain: tuple[ClassRef, ...] | None = None
    order: Order = Order.LEARN_THEN_FORGET
    learn_length: PhaseLength = field(default_factory=lambda: PhaseLength(epochs=5))
    forget_length: PhaseLength = field(default_factory=lambda: PhaseLength(epochs=5))
    learn_loss: LearnLoss = field(default_factory=lambda: LearnLoss(retain_weight=0.2, alpha=0.005))
    forget_loss: ForgetLoss = field(default_factory=lambda: ForgetLoss(beta=0.2, bnd=105.0, alpha=0.005))
    lora: LoraSettings = field(default_factory=LoraSettings)
    forget_retains_learned: bool = True
    reset_optimizer_between_phases: bool = False
    restart_lr_schedule: bool = True
    task: str = "classification"

    def __post_init__(self) -> None:
        coerce = object.__setattr__
        coerce(self, "forget", _as_class_tuple(self.forget, "forget"))
        coerce(self, "learn", _as_class_tuple(self.learn, "learn"))
        if self.retain is not None:
            coerce(self, "retain", _as_class_tuple(self.retain, "retain"))
        try:
            coerce(self, "order", Order(self.order))
        except ValueError:
            names = ", ".join(o.value for o in Order)
            raise SwapConfigError(f"Unknown order {self.order!r}; choose one of: {names}.") from None
        coerce(self, "learn_length", PhaseLength.parse(self.learn_length))
        coerce(self, "forget_length", PhaseLength.parse(self.forget_length))
        for name, kind in (("learn_loss", LearnLoss), ("forget_loss", ForgetLoss), ("lora", LoraSettings)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                coerce(self, name, kind(**value))
        self.validate()

    def validate(self) -> None:
        """Check ranges and set shapes that need no model; raise ``SwapConfigError`` naming the fix."""
        for name in ("forget", "learn"):
            if not getattr(self, name):
                raise SwapConfigError(f"The {name} set is empty: a swap needs at least one class to {name}.")
        if self.retain is not None and not self.retain:
            raise SwapConfigError("The retain set is empty: pass retain=None to keep every other class.")
        self.learn_loss.validate("learn_loss")
        self.forget_loss.validate("forget_loss")
        self.lora.validate()

    @property
    def joint_loss(self) -> LossWeights:
        """Weights of the joint phase: the forget loss's, with the learn loss's learn weight."""
        return self.forget_loss.weights(learn_weight=self.learn_loss.learn_weight)

    @classmethod
    def preset(cls, task: str, **overrides: Any) -> SwapConfig:
        """A config with the reference defaults of ``task`` (classification, detection or segmentation).

        ``overrides`` are ``SwapConfig`` fields; a mapping given for ``learn_loss``, ``forget_loss`` or ``lora``
        changes only the keys it names (``forget_loss=dict(beta=0.5)`` keeps the preset's bound).
        """
        try:
            defaults = PRESETS[task]
        except KeyError:
            raise SwapConfigError(f"Unknown task preset {task!r}; choose one of: {', '.join(PRESETS)}.") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SwapConfigError(f"Unknown swap settings {unknown}; the settings are: {sorted(known - {'task'})}.")
        merged = {**defaults, "task": task}
        for name, value in overrides.items():
            base = merged.get(name)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(base):
                names = {f.name for f in dataclasses.fields(base)}
                if set(value) - names:
                    raise SwapConfigError(f"Unknown {name} settings {sorted(set(value) - names)}; "
                                          f"{name} has: {sorted(names)}.")
                value = dataclasses.replace(base, **value)
            merged[name] = value
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``SwapConfig.from_dict`` reads it back."""
        out = dataclasses.asdict(self)
        out["order"] = self.order.value
        out["learn_length"] = str(self.learn_length)
        out["forget_length"] = str(self.forget_length)
        for name in ("forget", "learn", "retain"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwapConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SwapConfigError(f"Unknown swap config keys {sorted(unknown)}; known keys: {sorted(known)}.")
        return cls(**data)

    def refuse_timm_only_terms(self, host: str) -> None:
        """Raise ``SwapConfigError`` when a weight is set for a term that only timm computes (distillation, the
        feature MMD): in another host it would be silently left out of the loss."""
        named = [f"{name}.distill" for name in ("learn_loss", "forget_loss") if getattr(self, name).distill]
        if named:
            raise SwapConfigError(f"{host} has no distillation term: set {' and '.join(named)} to 0 (distillation "
                                  "towards the phase-start model is implemented for timm classification).")
        if self.forget_loss.feature_mmd:
            raise SwapConfigError(f"{host} has no feature MMD term: set forget_loss.feature_mmd to 0 (the term on the "
                                  "classifier's input features is implemented for timm classification).")

    def fingerprint(self) -> str:
        """A short hash of the config, stored in checkpoints so a resume with another config is refused."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _as_class_tuple(values: Sequence[ClassRef] | ClassRef, name: str) -> tuple[ClassRef, ...]:
    if isinstance(values, (str, int)):
        values = [values]
    out = tuple(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise SwapConfigError(f"The {name} set must hold class names or integer ids, got {v!r}.")
    if len(set(out)) != len(out):
        dup = sorted({str(v) for v in out if out.count(v) > 1})
        raise SwapConfigError(f"The {name} set lists {dup} more than once.")
    return out


# Reference defaults (../shared/spec/algorithm.md §2.1, §2.5, §7): classification from the README command,
# detection and segmentation from the constants in the reference engine and config.
PRESETS: dict[str, dict[str, Any]] = {
    "classification": dict(
        learn_length=PhaseLength(epochs=5),
        forget_length=PhaseLength(epochs=5),
        learn_loss=LearnLoss(retain_weight=0.2, learn_weight=1.0, alpha=0.005),
        forget_loss=ForgetLoss(retain_weight=1.0, beta=0.2, bnd=105.0, alpha=0.005),
        lora=LoraSettings(rank=8, scaling=0.125, targets="timm_vit"),
        reset_optimizer_between_phases=False,
        restart_lr_schedule=True,
    ),
    "detection": dict(
        learn_length=PhaseLength(epochs=20),
        forget_length=PhaseLength(epochs=20),
        learn_loss=LearnLoss(retain_weight=1.0, learn_weight=0.9, alpha=0.01),
        forget_loss=ForgetLoss(retain_weight=1.0, beta=0.2, bnd=15.0, alpha=0.01),
        lora=LoraSettings(rank=8, scaling=0.125, targets="mmdet_dino"),
        reset_optimizer_between_phases=False,
        restart_lr_schedule=False,
    ),
    "segmentation": dict(
        learn_length=PhaseLength(steps=3500),
        forget_length=PhaseLength(steps=3500),
        learn_loss=LearnLoss(retain_weight=1.0, learn_weight=0.9, alpha=0.01),
        forget_loss=ForgetLoss(retain_weight=1.0, beta=0.2, bnd=115.0, alpha=0.01),
        lora=LoraSettings(rank=8, scaling=0.125, targets="mask2former"),
        reset_optimizer_between_phases=True,
        restart_lr_schedule=True,
    ),
}


@dataclass(frozen=True)
class ConfigField:
    """One setting of ``SwapConfig``, named the same way in every host.

    Args:
        path: the field and, for ``learn_loss`` / ``forget_loss`` / ``lora``, its sub-field.
        kind: ``classes``, ``length``, ``order``, ``bool``, ``int``, ``float`` or ``str``.
        help: the field's description, from the dataclass docstring.
    """

    path: tuple[str, ...]
    kind: str
    help: str

    @property
    def name(self) -> str:
        """``forget_loss.alpha``: the keyword path (mmdet: ``forget_loss=dict(alpha=...)``)."""
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        """``--swap-forget-loss-alpha``: the command-line flag (timm)."""
        return "--swap-" + "-".join(self.path).replace("_", "-")

    @property
    def cfg_key(self) -> str:
        """``FORGET_LOSS.ALPHA``: the key under a config's ``SWAP`` node (detectron2)."""
        return ".".join(p.upper() for p in self.path)

    def get(self, config: SwapConfig) -> Any:
        value: Any = config
        for part in self.path:
            value = getattr(value, part)
        return value


_KINDS = {bool: "bool", int: "int", float: "float", str: "str", PhaseLength: "length", Order: "order"}


def config_fields() -> tuple[ConfigField, ...]:
    """Every ``SwapConfig`` setting but ``task`` (each host picks its preset), nested ones flattened."""
    return tuple(_fields_of(SwapConfig, ()))


def _fields_of(cls: type, prefix: tuple[str, ...]) -> list[ConfigField]:
    hints = typing.get_type_hints(cls)
    docs = arg_docs(cls)
    out: list[ConfigField] = []
    for f in dataclasses.fields(cls):
        if f.name == "task":
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and hint not in _KINDS:
            out += _fields_of(hint, (*prefix, f.name))
            continue
        kinds = [_KINDS.get(t) for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
        kind = "classes" if typing.get_origin(hint) is tuple or "tuple" in str(hint) else kinds[0]
        out.append(ConfigField((*prefix, f.name), kind, docs.get(f.name, "")))
    return out


def arg_docs(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style class docstring, one line each."""
    doc = inspect.getdoc(cls) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    out: dict[str, str] = {}
    for names, text in re.findall(r"^ {4}([\w, ]+): (.*(?:\n {8}.*)*)", args, flags=re.M):
        for name in names.split(","):
            out[name.strip()] = " ".join(text.split())
    return out


def config_from_fields(task: str, values: Mapping[ConfigField, Any]) -> SwapConfig:
    """The ``task`` preset with the settings in ``values`` changed (a host's flags or keys, unset ones left out)."""
    overrides: dict[str, Any] = {}
    for f, value in values.items():
        if len(f.path) == 1:
            overrides[f.path[0]] = value
        else:
            overrides.setdefault(f.path[0], {})[f.path[1]] = value
    return SwapConfig.preset(task, **overrides)


def vocabulary_table() -> str:
    """The Markdown table of every setting's name in each host and its default per preset (docs/settings.md, "One
    vocabulary")."""
    presets = {task: SwapConfig.preset(task, forget=("_",), learn=("_",)) for task in PRESETS}

    def default(f: ConfigField, config: SwapConfig) -> str:
        if f.kind == "classes":
            return "all others" if f.path == ("retain",) else "required"
        value = f.get(config)
        return str(value.value if isinstance(value, Order) else value)

    def keyword(f: ConfigField) -> str:
        return f.name if len(f.path) == 1 else f"{f.path[0]}=dict({f.path[1]}=...)"

    lines = ["| setting | timm flag | mmdet `SwapHook` keyword | detectron2 key | classification / detection / "
             "segmentation | what it is |", "|---|---|---|---|---|---|"]
    for f in config_fields():
        defaults = " / ".join(default(f, c) for c in presets.values())
        lines.append(f"| `{f.name}` | `{f.flag}` | `{keyword(f)}` | `SWAP.{f.cfg_key}` | {defaults} | {f.help} |")
    return "\n".join(lines)
