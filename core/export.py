"""What a swap leaves behind, named the same in every host: the merged model, the adapter alone, and log keys.

* ``model_swapped.pth``: the LoRA merged into the base weights, the original keys, the grown head; a plain model
  of the host loads it without kswap.
* ``swap_adapter.safetensors``: the LoRA weights alone, with the swap config, the grown rows and the classes in
  its metadata: what is needed to re-apply the swap to the pretrained model or to revert it.
* Log keys: ``swap/<set>`` for a set's score and ``swap/loss/<term>`` for a phase-loss term.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import atomic_save, atomic_write_bytes
from .config import SwapConfig
from .heads import GrownRows
from .lora import lora_state_dict, merge_and_export

MODEL_FILE = "model_swapped.pth"
ADAPTER_FILE = "swap_adapter.safetensors"


def score_key(name: str) -> str:
    """The log key of a set's score (``swap/forget``)."""
    return f"swap/{name}"


def loss_key(term: str) -> str:
    """The log key of a phase-loss term (``swap/loss/forget/task``)."""
    return f"swap/loss/{term}"


def write_merged_model(model: nn.Module, out_dir: str | Path, key: str = "state_dict", **extra: Any) -> Path:
    """Write ``model_swapped.pth``: ``{key: <merged weights>, **extra}`` (the model keeps its LoRA).

    ``key`` is where the host's checkpoint loader looks: ``state_dict`` for timm and mmengine, ``model`` for
    detectron2's ``DetectionCheckpointer`` (which would read a ``state_dict`` file as a model without weights).
    """
    return atomic_save({key: merge_and_export(model).state_dict(), **extra}, Path(out_dir) / MODEL_FILE)


def write_adapter(model: nn.Module, out_dir: str | Path, config: SwapConfig, grown: Mapping[str, GrownRows],
                  classes: Mapping[str, list[str]]) -> Path:
    """Write ``swap_adapter.safetensors``: the LoRA weights, with the config, grown rows and classes as metadata."""
    from safetensors.torch import save

    adapter = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {"swap_config": json.dumps(config.to_dict()),
                "grown": json.dumps({k: vars(g) for k, g in grown.items()}),
                "classes": json.dumps(dict(classes))}
    return atomic_write_bytes(Path(out_dir) / ADAPTER_FILE, save(adapter, metadata=metadata))
