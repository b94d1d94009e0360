"""LoRA on named linear layers with peft: inject, re-initialise, freeze, group, map checkpoint keys, merge."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .config import LoraSettings
from .errors import CheckpointMismatchError, SwapConfigError
from .groups import discover_groups

ADAPTER = "default"
LORA_KEY = ".lora_"

# Regexes that fully match module names (peft's rule for a string target). One per host model family.
TARGET_PRESETS: dict[str, str] = {
    # timm ViT/DeiT `blocks.N.mlp.fc1|fc2` and Swin `layers.S.blocks.B.mlp.fc1|fc2`.
    "timm_vit": r"(.*\.)?blocks\.\d+\.mlp\.fc[12]",
    # Not the reference: the same blocks' attention projections too (`attn.qkv`, `attn.proj`), still one group per
    # block. On the demo it learned the new classes 2.7 points better at the same retain (docs/benchmarks.md).
    "timm_vit_attn": r"(.*\.)?blocks\.\d+\.(mlp\.fc[12]|attn\.qkv|attn\.proj)",
    # mmdet DINO: encoder/decoder FFNs (mmcv FFN: `ffn.layers.0.0` is fc1, `ffn.layers.1` is fc2) and mmdet Swin.
    "mmdet_dino": r"(.*\.)?(encoder\.layers|decoder\.layers|stages\.\d+\.blocks)\.\d+\.ffn\.layers\.(0\.0|1)",
    # Mask2Former: Swin backbone MLPs, pixel-decoder encoder FFNs, transformer-decoder FFNs.
    "mask2former": (
        r"(.*\.)?(backbone\.layers\.\d+\.blocks\.\d+\.mlp\.fc[12]"
        r"|sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.\d+\.linear[12]"
        r"|sem_seg_head\.predictor\.transformer_ffn_layers\.\d+\.linear[12])"
    ),
}
# The reference's placement in every host: the FFN presets only.
TARGET_PRESETS["ffn"] = "|".join(f"(?:{TARGET_PRESETS[k]})" for k in ("timm_vit", "mmdet_dino", "mask2former"))


def resolve_targets(targets: str) -> str:
    """The regex for ``targets``: a preset name or a regex of its own."""
    regex = TARGET_PRESETS.get(targets, targets)
    try:
        re.compile(regex)
    except re.error as err:
        raise SwapConfigError(
            f"lora.targets {targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) nor a valid regex: {err}."
        ) from None
    return regex


def matching_linears(model: nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` modules whose full name matches the targets."""
    regex = re.compile(resolve_targets(targets))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.fullmatch(n)]


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Add LoRA to every linear layer matched by ``settings.targets``, in place.

    Returns:
        The names of the adapted modules.

    Raises:
        SwapConfigError: when the targets match no linear layer (the message lists some that exist).
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = matching_linears(model, settings.targets)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
        raise SwapConfigError(
            f"lora.targets {settings.targets!r} matches no linear layer of {type(model).__name__}. "
            f"Its linear layers include: {shown or 'none'}. Give a regex that fully matches some of them."
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.scaling * settings.rank,
        lora_dropout=settings.dropout,
        target_modules=names,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if settings.reference_init:
        reinit_lora_(model)
    return names


@torch.no_grad()
def reinit_lora_(model: nn.Module) -> None:
    """The reference re-initialisation after loading: A ~ kaiming_uniform(a=√50), B = 0.

    Also the guard to call after a host re-runs weight initialisation over the whole model.
    """
    for layer in _lora_layers(model).values():
        for adapter in layer.lora_A:
            nn.init.kaiming_uniform_(layer.lora_A[adapter].weight, a=math.sqrt(50))
            nn.init.zeros_(layer.lora_B[adapter].weight)


def freeze_all_but_lora_(model: nn.Module, also_trainable: Iterable[str] = ()) -> int:
    """Freeze every parameter except LoRA and those whose name starts with one of ``also_trainable``.

    Returns:
        The number of trainable parameter elements.
    """
    prefixes = tuple(also_trainable)
    count = 0
    for name, param in model.named_parameters():
        trainable = LORA_KEY in f".{name}" or (bool(prefixes) and name.startswith(prefixes))
        param.requires_grad_(trainable)
        count += param.numel() if trainable else 0
    return count


def lora_groups(model: nn.Module, group_by: str | None = None) -> dict[str, list[nn.Parameter]]:
    """Trainable LoRA tensors per group (one group per transformer block unless ``group_by`` says otherwise)."""
    layers = _lora_layers(model)
    if not layers:
        raise SwapConfigError("The model holds no LoRA: call inject_lora first.")
    groups: dict[str, list[nn.Parameter]] = {}
    for key, names in discover_groups(layers, group_by).items():
        params = [
            p
            for n in names
            for p in (*layers[n].lora_A.parameters(), *layers[n].lora_B.parameters())
            if p.requires_grad
        ]
        if params:
            groups[key] = params
    return groups


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of the model's state dict."""
    return {k: v for k, v in model.state_dict().items() if LORA_KEY in f".{k}"}


class LoraSnapshot:
    """A copy of the model's LoRA weights that can stand in for the current ones, e.g. a teacher for distillation
    (the model at a phase start) without a second copy of the frozen base weights.

    Args:
        model: the model with LoRA layers; its current LoRA weights are copied.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model`` computes with the snapshot's LoRA weights, in eval mode (a teacher's outputs
        carry no dropout) and without gradient; weights and every module's mode are restored after."""
        params = dict(model.named_parameters())
        current = {k: params[k].detach().clone() for k in self.tensors}
        modes = {module: module.training for module in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                for k, v in self.tensors.items():
                    params[k].copy_(v)
                yield model
        finally:
            for module, training in modes.items():
                module.training = training
            with torch.no_grad():
                for k, v in current.items():
                    params[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping[str, torch.Tensor]) -> LoraSnapshot:
        snapshot = cls(model)
        missing = set(snapshot.tensors) - set(state)
        if missing:
            raise CheckpointMismatchError(f"The saved LoRA snapshot lacks {_some(sorted(missing))}: it was written "
                                          "for another LoRA placement.")
        snapshot.tensors = {k: state[k].to(v) for k, v in snapshot.tensors.items()}
        return snapshot


def _base_prefixes(model: nn.Module) -> list[str]:
    return [f"{n}." if n else "" for n in _lora_layers(model)]


def to_plain_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An injected model's state dict under the original keys, without LoRA (``x.base_layer.weight`` → ``x.weight``)."""
    prefixes = _base_prefixes(model)
    out = {}
    for key, value in state_dict.items():
        if LORA_KEY in f".{key}":
            continue
        for prefix in prefixes:
            if key.startswith(f"{prefix}base_layer."):
                key = prefix + key[len(prefix) + len("base_layer.") :]
                break
        out[key] = value
    return out


def to_injected_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename original keys to the injected model's (``fc1.weight`` → ``fc1.base_layer.weight``); others pass."""
    prefixes = _base_prefixes(model)
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            rest = key[len(prefix) :]
            if key.startswith(prefix) and "." not in rest and not rest.startswith("lora_"):
                key = f"{prefix}base_layer.{rest}"
                break
        out[key] = value
    return out


def validate_lora_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a plain (pre-LoRA) or LoRA checkpoint to the injected model's keys and check it fits.

    Only LoRA keys may be missing (a plain checkpoint has none); any other missing key, any unexpected key and
    any shape mismatch is a ``CheckpointMismatchError`` naming the keys.

    Returns:
        The state dict under the injected model's keys.
    """
    mapped = to_injected_keys(state_dict, model)
    own = model.state_dict()
    bad_missing = [k for k in own if k not in mapped and LORA_KEY not in f".{k}"]
    unexpected = [k for k in mapped if k not in own]
    shapes = [f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
              for k in mapped if k in own and mapped[k].shape != own[k].shape]
    problems = []
    if bad_missing:
        problems.append(f"missing {_some(bad_missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_some(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            "The checkpoint does not fit the model: " + "; ".join(problems)
            + ". Check that it comes from the same architecture and class count."
        )
    return mapped


def load_lora_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a plain (pre-LoRA) or LoRA checkpoint into an injected model, after ``validate_lora_state``.

    Returns:
        The LoRA keys that were missing and keep their current values.
    """
    mapped = validate_lora_state(model, state_dict)
    model.load_state_dict(mapped, strict=False)
    return [k for k in model.state_dict() if k not in mapped]


def _some(items: list[str], n: int = 5) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"


@torch.no_grad()
def merge_and_export(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every LoRA delta merged into its base weight and the adapters removed.

    The copy's state dict has the original keys, so the host loads it without kswap. ``model`` is unchanged.
    """
    return _without_lora_layers(model, merge=True)


@torch.no_grad()
def pretrained_model(model: nn.Module, buffers: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The pretrained model inside a LoRA-injected one: a plain copy with the adapters dropped (base weights as
    loaded; a grown head keeps its rows) and ``buffers`` (e.g. BatchNorm statistics as the swap started) put back.
    ``model`` is unchanged."""
    plain = _without_lora_layers(model, merge=False)
    if buffers:
        plain.load_state_dict(dict(buffers), strict=False)
    return plain


def _without_lora_layers(model: nn.Module, merge: bool) -> nn.Module:
    """A copy of ``model`` with each LoRA layer replaced by its base layer, its delta merged in or dropped."""
    plain = copy.deepcopy(model)
    for name, layer in _lora_layers(plain).items():
        if merge:
            layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name) if parent_name else plain, child, base)
        else:
            plain = base
    plain.requires_grad_(True)
    return plain
