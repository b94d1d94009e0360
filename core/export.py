"""What a swap leaves behind, named the same in every host: the merged model, the adapter alone, and log keys.

* ``model_swapped.pth``: the LoRA merged into the base weights, the original keys, the grown head; a plain model
  of the host loads it without kswap.
* ``swap_adapter.safetensors``: the LoRA weights and the grown heads' new rows, with the swap config, the grown
  rows' shapes, the classes and the rounds in its metadata: ``kswap.apply_adapter`` re-applies the swap to the
  model it started from, ``kswap.revert_adapter`` reverts it.
* Log keys: ``swap/<set>`` for a set's score and ``swap/loss/<term>`` for a phase-loss term.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .adapter import ROUNDS_KEY, SwapRound, adapter_tensors
from .checkpoint import atomic_save, atomic_write_bytes
from .config import SwapConfig
from .heads import GrownRows
from .lora import merge_and_export

MODEL_FILE = "model_swapped.pth"
ADAPTER_FILE = "swap_adapter.safetensors"


def score_key(name: str) -> str:
    """The log key of a set's score (``swap/forget``)."""
    return f"swap/{name}"


def loss_key(term: str) -> str:
    """The log key of a phase-loss term (``swap/loss/forget/task``)."""
    return f"swap/loss/{term}"


def write_merged_model(model: nn.Module, out_dir: str | Path, key: str = "state_dict",
                       rounds: Sequence[SwapRound] = (), **extra: Any) -> Path:
    """Write ``model_swapped.pth``: ``{key: <merged weights>, "swap_rounds": [...], **extra}`` (the model keeps its
    LoRA); ``rounds`` is the model's history, this swap last, which a next round reads (``kswap.rounds_of``).

    ``key`` is where the host's checkpoint loader looks: ``state_dict`` for timm and mmengine, ``model`` for
    detectron2's ``DetectionCheckpointer`` (which would read a ``state_dict`` file as a model without weights).
    """
    merged = {key: merge_and_export(model).state_dict(), ROUNDS_KEY: [r.to_dict() for r in rounds], **extra}
    return atomic_save(merged, Path(out_dir) / MODEL_FILE)


def write_adapter(model: nn.Module, out_dir: str | Path, config: SwapConfig, grown: Mapping[str, GrownRows],
                  classes: Mapping[str, list[str]], rounds: Sequence[SwapRound] = ()) -> Path:
    """Write ``swap_adapter.safetensors``: the LoRA weights and the new head rows, with the config, grown rows,
    classes and rounds (this swap's last: its round and parent) as metadata."""
    from safetensors.torch import save

    metadata = {"swap_config": json.dumps(config.to_dict()),
                "grown": json.dumps({k: vars(g) for k, g in grown.items()}),
                "classes": json.dumps(dict(classes)),
                "rounds": json.dumps([r.to_dict() for r in rounds])}
    return atomic_write_bytes(Path(out_dir) / ADAPTER_FILE, save(adapter_tensors(model, grown), metadata=metadata))
