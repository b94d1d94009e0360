"""The timm model of a run: the keywords that build it, its classifier heads, how to load it again, and why a
checkpoint does not fit it."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Flags that shape the model (its weights need them to load) -> timm.create_model keyword.
ARCHITECTURE_FLAGS = {"in_chans": "in_chans", "img_size": "img_size", "gp": "global_pool", "bn_eps": "bn_eps"}
# Flags that only change training -> timm.create_model keyword.
TRAINING_FLAGS = {"drop": "drop_rate", "drop_path": "drop_path_rate", "drop_block": "drop_block_rate",
                  "bn_momentum": "bn_momentum"}


def architecture_kwargs(args: Any) -> dict[str, Any]:
    """The keywords ``timm.create_model`` needs, besides the name and ``num_classes``, to rebuild the model a run
    trained: ``--model-kwargs`` and the flags that shape it. ``args`` is this script's or timm's train.py's."""
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    for flag, key in ARCHITECTURE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[key] = value
    input_size = getattr(args, "input_size", None)
    if input_size is not None:
        kwargs.setdefault("in_chans", input_size[0])
    return kwargs


def creation_kwargs(args: Any) -> dict[str, Any]:
    """Every keyword of the run's ``timm.create_model`` call besides the name, ``pretrained`` and ``num_classes``."""
    kwargs = architecture_kwargs(args)
    for flag, key in TRAINING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[key] = value
    return kwargs


def load_call(arch: str, num_classes: int, checkpoint: str | Path, kwargs: Mapping[str, Any]) -> str:
    """The ``timm.create_model(...)`` call, as Python source, that loads ``checkpoint`` into the model it holds."""
    args = [repr(arch), f"num_classes={num_classes}", f"checkpoint_path={str(checkpoint)!r}",
            *(f"{k}={v!r}" for k, v in kwargs.items())]
    return f"timm.create_model({', '.join(args)})"


def classifier_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The model's classifiers by dotted name: timm's ``get_classifier()``, which is a tuple for models with several
    heads (a distilled DeiT's ``head`` and ``head_dist``, whose logits it averages)."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return {name: module for name, module in model.named_modules() if any(module is h for h in heads)}


def recorded_model(checkpoint: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """The timm model name and ``architecture_kwargs`` a checkpoint records, each ``None`` when it records none:
    ours keep ``arch`` and ``model_kwargs`` (earlier ones the run's ``args``), timm's train.py ``arch`` and ``args``."""
    import timm
    from timm.utils import load_checkpoint_metadata

    try:
        meta = load_checkpoint_metadata(str(checkpoint))
    except Exception:  # a safetensors file or a plain pickle records nothing torch.load can read safely
        return None, None
    if not isinstance(meta, dict):
        return None, None
    arch = meta.get("arch")
    arch = arch if isinstance(arch, str) and timm.is_model(arch) else None
    args = meta.get("args")
    if "model_kwargs" in meta:
        return arch, dict(meta["model_kwargs"])
    if args is not None:
        return arch, architecture_kwargs(argparse.Namespace(**args) if isinstance(args, dict) else args)
    return arch, None


def model_flags(arch: str, kwargs: Mapping[str, Any]) -> str:
    """The command-line flags that build ``arch`` with ``kwargs`` (``architecture_kwargs`` turned back)."""
    flag_of = {key: f"--{flag.replace('_', '-')}" for flag, key in ARCHITECTURE_FLAGS.items()}
    flags = [f"--model {arch}"]
    extra = {k: v for k, v in kwargs.items() if k not in flag_of}
    if extra:
        flags.append("--model-kwargs " + " ".join(
            shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}") for k, v in extra.items()))
    flags += [f"{flag_of[k]} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
              for k, v in kwargs.items() if k in flag_of]
    return " ".join(flags)


def wrong_model(args: argparse.Namespace, checkpoint: str | Path | None = None,
                state: Mapping[str, torch.Tensor] | None = None, model: nn.Module | None = None) -> str:
    """The likely cause, and the fix, when the run's model cannot be built (``state`` None) or ``checkpoint``'s
    ``state`` does not fit ``model``: the flags of the model the checkpoint records, else what its keys say."""
    arch, kwargs = recorded_model(checkpoint) if checkpoint else (None, None)
    ours = architecture_kwargs(args)
    if (arch or args.model) != args.model or (kwargs is not None and kwargs != ours):
        flags = model_flags(arch or args.model, ours if kwargs is None else kwargs)
        return f"The checkpoint records the model it was trained as: pass {flags}."
    if state is None:
        return ("Remove that keyword from --model-kwargs (or its flag: --img-size, --in-chans, --gp, --bn-eps), or "
                "pass the --model it is for.")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    found = "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for keys, what in (
        (missing, "keys of the model missing from it"), (unexpected, "keys the model does not have"),
        (shapes, "of another shape, checkpoint vs model")) if keys)
    cause = ("it is another architecture, or another depth: pass the --model it was trained as and its "
             "--model-kwargs" if missing or unexpected else
             "the same architecture in other sizes: pass the --model-kwargs, --img-size and --in-chans it was "
             "trained with")
    return f"It has {found}. Likely {cause} (this run: {model_flags(args.model, ours)})."
