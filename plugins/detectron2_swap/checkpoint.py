"""``SwapCheckpointer``: detectron2's checkpointer for a swapping model.

* Loads ``.pth`` files with ``torch.load(weights_only=True)`` (torch >= 2.6's default, which fvcore does not
  handle) and says what to do with one that holds Python objects.
* Maps a plain pretrained checkpoint onto the grown, LoRA-injected model (new class rows, ``base_layer`` keys)
  and refuses one that does not fit, instead of fvcore's warning and a silently half-loaded model; the state
  dict's format metadata, which modules such as Mask2Former's ``MaskFormerHead`` read, goes along.
* Writes checkpoints and the ``last_checkpoint`` pointer atomically.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from kswap import (
    CheckpointMismatchError,
    GrownRows,
    adapt_checkpoint,
    atomic_save,
    atomic_write_text,
)
from kswap.lora import LORA_KEY

CLASS_ROWS_HINT = ("Set MODEL.WEIGHTS to the model trained on those classes, or list the classes it was trained "
                   "with (the stuff_classes of the pretrained dataset, DATASETS.TRAIN[0]).")


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
        # Modules read their format version from the state dict's metadata, and Mask2Former's MaskFormerHead
        # renames every pixel-decoder key of a state dict without it: the dict rebuilt here keeps it.
        metadata = getattr(state, "_metadata", None)
        self._convert_ndarray_to_tensor(state)
        mapped = OrderedDict(adapt_checkpoint(state, self.model, self.grown, hint=CLASS_ROWS_HINT))
        if metadata is not None:
            mapped._metadata = metadata
        checkpoint["model"] = mapped
        incompatible = super()._load_model(checkpoint)
        # The LoRA tensors of a plain checkpoint are missing by design: they keep their initialisation.
        missing = [k for k in incompatible.missing_keys if LORA_KEY not in f".{k}"]
        if missing:
            raise CheckpointMismatchError(
                f"The model did not take {len(missing)} tensors that the checkpoint holds ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}): a module's own _load_from_state_dict renamed or dropped "
                "them, as Mask2Former's MaskFormerHead does with a state dict that carries no format version. Load "
                "the checkpoint as torch.save wrote it (its state dict's _metadata intact)."
            )
        return incompatible._replace(missing_keys=[])

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
