"""``SwapCheckpointer``: detectron2's checkpointer for a swapping model.

* Loads ``.pth`` files with ``torch.load(weights_only=True)`` (torch >= 2.6's default, which fvcore does not
  handle) and says what to do with one that holds Python objects.
* Maps a plain pretrained checkpoint onto the grown, LoRA-injected model (new class rows, ``base_layer`` keys)
  and refuses one that does not fit, instead of fvcore's warning and a silently half-loaded model.
* Writes checkpoints and the ``last_checkpoint`` pointer atomically.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from kswap import (
    CheckpointMismatchError,
    GrownRows,
    atomic_save,
    atomic_write_text,
    grow_checkpoint_rows,
    validate_lora_state,
)
from kswap.lora import LORA_KEY


class SwapCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that grows, maps and validates what it loads into a swapping model.

    Args:
        model: the (possibly DDP-wrapped) model prepared by ``prepare_swap_model``.
        save_dir: where checkpoints go.
        grown: the grown rows of the model's head (``model.swap_state.grown``).
        checkpointables: other objects whose state is saved, as for ``DetectionCheckpointer``.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, grown: dict[str, GrownRows],
                 **checkpointables: Any) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.grown = grown

    def _load_file(self, filename: str) -> dict[str, Any]:
        if not filename.endswith(".pth"):
            return super()._load_file(filename)
        with self.path_manager.open(filename, "rb") as f:
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointMismatchError(
                    f"{filename} holds Python objects that torch.load(weights_only=True) refuses ({err}). If you trust "
                    "it, re-save its weights: torch.save({'model': torch.load(path, weights_only=False)['model']}, "
                    "new_path)."
                ) from None
        return loaded if "model" in loaded else {"model": loaded}

    def _load_model(self, checkpoint: dict[str, Any]) -> Any:
        if checkpoint.get("matching_heuristics", False):
            raise CheckpointMismatchError(
                f"A swap starts from a trained detectron2 model, not from {checkpoint.get('__author__')} weights that "
                "need name-matching heuristics: set MODEL.WEIGHTS to the trained model's checkpoint."
            )
        state = checkpoint["model"]
        self._convert_ndarray_to_tensor(state)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        grow_checkpoint_rows(state, self.model.state_dict(), self.grown)
        checkpoint["model"] = validate_lora_state(self.model, state)
        incompatible = super()._load_model(checkpoint)
        # The LoRA tensors of a plain checkpoint are missing by design: they keep their initialisation.
        missing = [k for k in incompatible.missing_keys if LORA_KEY not in f".{k}"]
        return incompatible._replace(missing_keys=missing)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {os.path.join(self.save_dir, basename)}")
        atomic_save(data, os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
