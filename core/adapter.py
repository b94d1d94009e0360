"""A swap's adapter read back: re-apply ``swap_adapter.safetensors`` to the model the swap started from, and revert
it; and the rounds a swapped model has been through (which model each started from, what each forgot and learned).

The adapter holds what the swap changed: the LoRA weights (``<layer>.lora_A|B.<adapter>.weight``, peft's keys),
each grown head's new rows (``rows.<state key>``) and the model's buffers (``buffers.<state key>``: BatchNorm
statistics a swap in training mode updates), with the config, the grown rows' shapes, the classes and the rounds as
metadata. ``apply_adapter`` merges the LoRA into the base weights (peft's ``W + scaling·B·A``), grows the heads and
sets the buffers, giving the weights of ``model_swapped.pth``; ``revert_adapter`` puts the tensors it replaced back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SwapConfig
from .errors import CheckpointMismatchError
from .heads import GrownRows, _grown
from .lora import lora_state_dict, to_plain_keys

ROWS_PREFIX = "rows."  # adapter tensors that are a grown head's new rows: ``rows.<state key>``
BUFFERS_PREFIX = "buffers."  # the swapped model's buffers: ``buffers.<state key>``
ROUNDS_KEY = "swap_rounds"  # where model_swapped.pth keeps its rounds (a list of ``SwapRound.to_dict()``)
_LORA_A, _LORA_B = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class SwapRound:
    """One swap in a model's history.

    Args:
        round: 1 for a swap of a model never swapped, k+1 for a swap of round k's output.
        forget: the classes it forgot.
        learn: the classes it learned.
        parent: ``sha256:<hex>`` of the checkpoint it started from (``""`` when it started from no file).
    """

    round: int
    forget: tuple[str, ...]
    learn: tuple[str, ...]
    parent: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "forget": list(self.forget), "learn": list(self.learn)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwapRound:
        return cls(int(data["round"]), tuple(map(str, data["forget"])), tuple(map(str, data["learn"])),
                   str(data.get("parent", "")))


def file_sha256(path: str | Path) -> str:
    """``sha256:<hex>`` of a file: how a round names the checkpoint it started from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def parent_of(checkpoint: str | Path | None) -> str:
    """A round's parent: ``file_sha256`` of the checkpoint it starts from when that is a local file, else ``""``
    (a model from a hub, a URL the host resolves)."""
    return file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else ""


def rounds_of(checkpoint: Mapping[str, Any]) -> list[SwapRound]:
    """The rounds recorded in a loaded checkpoint (``model_swapped.pth``); none for a model never swapped."""
    return [SwapRound.from_dict(r) for r in checkpoint.get(ROUNDS_KEY, [])]


@dataclass
class SwapAdapter:
    """``swap_adapter.safetensors`` as read back.

    Args:
        lora: the LoRA tensors under peft's keys.
        rows: per grown state key, the new rows it gained.
        buffers: the swapped model's buffers (but grown ones), under its plain keys.
        grown: per grown state key, its ``GrownRows``.
        config: the swap's config (its LoRA settings give the merge scaling).
        classes: per set, the class names.
        rounds: the model's rounds, this adapter's last.
    """

    lora: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    grown: dict[str, GrownRows]
    config: SwapConfig
    classes: dict[str, list[str]]
    rounds: list[SwapRound]

    @property
    def round(self) -> int:
        return self.rounds[-1].round if self.rounds else 1

    @property
    def parent(self) -> str:
        return self.rounds[-1].parent if self.rounds else ""

    @classmethod
    def read(cls, path: str | Path) -> SwapAdapter:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        if "swap_config" not in meta or "grown" not in meta:
            raise CheckpointMismatchError(f"{path} is not a kswap adapter (its metadata has no swap_config/grown): "
                                          "give the swap_adapter.safetensors a swap wrote.")
        grown = {k: GrownRows(**v) for k, v in json.loads(meta["grown"]).items()}
        rows, buffers, lora = {}, {}, {}
        for key, value in tensors.items():
            for prefix, part in ((ROWS_PREFIX, rows), (BUFFERS_PREFIX, buffers), ("", lora)):
                if key.startswith(prefix):
                    part[key[len(prefix):]] = value
                    break
        if set(rows) != set(grown):
            raise CheckpointMismatchError(
                f"{path} lacks the new rows of {sorted(set(grown) - set(rows))}: it was written by a kswap that "
                "saved the LoRA alone. Load model_swapped.pth instead, or swap again to write a full adapter.")
        return cls(lora=lora, rows=rows, buffers=buffers, grown=grown,
                   config=SwapConfig.from_dict(json.loads(meta["swap_config"])),
                   classes=json.loads(meta.get("classes", "{}")),
                   rounds=[SwapRound.from_dict(r) for r in json.loads(meta.get("rounds", "[]"))])

    def deltas(self) -> dict[str, torch.Tensor]:
        """Per adapted linear layer's weight key, its merged delta ``scaling·B·A`` (as peft merges it)."""
        scaling = self.config.lora.scaling  # peft's lora_alpha / r: kswap.inject_lora sets lora_alpha = scaling·r
        out = {}
        for key, a in self.lora.items():
            if _LORA_A in key:
                layer, _, rest = key.partition(_LORA_A)
                b = self.lora[f"{layer}{_LORA_B}{rest}"]
                out[f"{layer}.weight"] = (b @ a) * scaling
        return out


@dataclass
class AppliedAdapter:
    """An adapter applied to a model: the model, the adapter, and the tensors it replaced (for ``revert_adapter``)."""

    model: nn.Module
    adapter: SwapAdapter
    replaced: dict[str, torch.Tensor]


def adapter_tensors(model: nn.Module, grown: Mapping[str, GrownRows]) -> dict[str, torch.Tensor]:
    """What a swapped (LoRA-injected, grown) model's adapter holds: its LoRA tensors, each grown key's new rows and
    its other buffers."""
    state = model.state_dict()
    rows = {f"{ROWS_PREFIX}{k}": state[k][g.old - g.trailing: g.new - g.trailing] for k, g in grown.items()}
    names = {name for name, _ in model.named_buffers()}
    buffers = {f"{BUFFERS_PREFIX}{k}": v for k, v in to_plain_keys({k: state[k] for k in names & set(state)},
                                                                    model).items() if k not in grown}
    return {k: v.detach().cpu().contiguous() for k, v in {**lora_state_dict(model), **rows, **buffers}.items()}


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: str | Path | SwapAdapter) -> AppliedAdapter:
    """Turn the model a swap started from into the swapped one, in place: every grown head gets its new rows, every
    adapted linear layer its merged LoRA delta and the buffers their swapped values (the weights of the swap's
    ``model_swapped.pth``).

    Args:
        model: the plain model the swap started from (its pretrained head size), e.g. the round's parent.
        adapter: the swap's ``swap_adapter.safetensors`` (or one read with ``SwapAdapter.read``).

    Returns:
        The applied adapter; ``revert_adapter`` of it restores the model's exact previous weights.

    Raises:
        CheckpointMismatchError: the model lacks an adapted layer, or its head has another size than the model
            the swap started from.
    """
    adapter = adapter if isinstance(adapter, SwapAdapter) else SwapAdapter.read(adapter)
    state = model.state_dict(keep_vars=True)
    deltas = adapter.deltas()
    _check_fits(state, adapter, deltas)
    replaced: dict[str, torch.Tensor] = {}
    for key, rows in adapter.grown.items():
        replaced[key] = state[key].detach().clone()
        _set_tensor(model, key, _grown(state[key].detach(), rows.new - rows.old, rows.trailing, adapter.rows[key]))
    for key, delta in deltas.items():
        weight = state[key]
        replaced[key] = weight.detach().clone()
        weight.copy_(weight + delta.to(weight))
    for key, value in adapter.buffers.items():
        replaced[key] = state[key].detach().clone()
        state[key].copy_(value)
    return AppliedAdapter(model, adapter, replaced)


@torch.no_grad()
def revert_adapter(applied: AppliedAdapter) -> nn.Module:
    """Put back the exact tensors ``apply_adapter`` replaced (heads to their previous size); returns the model."""
    for key, tensor in applied.replaced.items():
        _set_tensor(applied.model, key, tensor.clone())
    return applied.model


def _check_fits(state: Mapping[str, torch.Tensor], adapter: SwapAdapter, deltas: Mapping[str, torch.Tensor]) -> None:
    problems = [f"no {k}" for k in [*deltas, *adapter.grown, *adapter.buffers] if k not in state]
    problems += [f"{k} has {state[k].shape[0]} rows, the swap's model had {g.old}"
                 for k, g in adapter.grown.items() if k in state and state[k].shape[0] != g.old]
    problems += [f"{k} is {tuple(state[k].shape)}, the adapter's {tuple(d.shape)}"
                 for k, d in {**deltas, **adapter.buffers}.items() if k in state and state[k].shape != d.shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise CheckpointMismatchError(
            f"The adapter of round {adapter.round} does not fit the model: {shown}. Apply it to the model that round "
            f"started from ({adapter.parent or 'the pretrained checkpoint'}), built with its class count "
            "(after the adapters of earlier rounds, if any).")


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer ``key`` (another size allowed), keeping its kind and ``requires_grad``; a
    resized layer's size attribute follows (``out_features``, ``out_channels``, ``num_embeddings``)."""
    name, _, attr = key.rpartition(".")
    owner = model.get_submodule(name) if name else model
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(owner, attr, tensor)
    if attr == "weight":
        for size in ("out_features", "out_channels", "num_embeddings"):
            if hasattr(owner, size):
                setattr(owner, size, tensor.shape[0])
