"""ImageFolder datasets and resumable loaders, built with timm's dataset and transform factories."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, create_transform
from timm.data.readers.reader_image_folder import find_images_and_targets
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from kswap import ResumableSampler, SwapConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Unreadable images named in the error (the count says how many more there are).
UNREADABLE_SHOWN = 5
SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "eval", "evaluation", "test")}


def resolve_split(root: str | Path, split: str) -> str:
    """The split folder name under ``root``: ``split`` itself or, for ``validation``, one of its aliases."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (Path(root) / name).is_dir():
            return name
    return split


def image_mode(in_chans: int) -> str:
    """The PIL mode timm's train.py loads images in for ``in_chans`` channels."""
    return "RGB" if in_chans == 3 else "L"


def check_image_folder(root: str | Path, split: str, what: str) -> Path:
    """The ``root/split`` ImageFolder, checked: it exists and every class folder holds images.

    An empty class folder would silently shift every later class id, so it is an error.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise SwapConfigError(f"The {what} has no '{split}' split: {folder} is not a directory.")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise SwapConfigError(f"The {what} split {folder} holds no class folders.")
    empty = [p.name for p in classes if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*"))]
    if empty:
        raise SwapConfigError(
            f"The {what} split {folder} has class folders without images: {empty}. Remove them or add images "
            "(an empty class folder shifts the ids of the classes after it)."
        )
    bad = unreadable_images(folder)
    if bad:
        shown = "; ".join(f"{path} ({why})" for path, why in bad[:UNREADABLE_SHOWN])
        more = f"; and {len(bad) - UNREADABLE_SHOWN} more" if len(bad) > UNREADABLE_SHOWN else ""
        raise SwapConfigError(
            f"The {what} split {folder} has {len(bad)} image file(s) that cannot be read: {shown}{more}. Delete them "
            "or replace them with readable images (timm's loader would skip each one silently, every epoch, while "
            "the scores still count it)."
        )
    return folder


def unreadable_images(folder: str | Path) -> list[tuple[str, str]]:
    """The images of the ImageFolder split ``folder`` that cannot be read, each with the reason.

    The files are those of timm's own folder scan; each is opened and checked by PIL (``verify``: the header, and
    for PNG the chunk checksums), which is much cheaper than decoding every pixel.
    """
    from PIL import Image

    images, _ = find_images_and_targets(str(folder))
    bad = []
    for path, _ in images:
        if os.path.getsize(path) == 0:
            bad.append((path, "zero bytes"))
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, struct.error ... for a bad file
            bad.append((path, f"{type(err).__name__}: {err}"))
    return bad


def folder_classes(root: str | Path, split: str) -> list[str]:
    """The classes of the ImageFolder ``root/split`` in the order of timm's ImageFolder, i.e. its label ids.

    timm sorts class folders naturally (``2`` before ``10``); the ``class_to_idx`` of its own folder scan is taken
    rather than re-implementing the rule.
    """
    _, class_to_idx = find_images_and_targets(str(Path(root) / split))
    return sorted(class_to_idx, key=class_to_idx.__getitem__)


def image_folder(
    root: str | Path,
    split: str,
    data_config: Mapping[str, Any],
    class_map: Mapping[str, int] | None = None,
    is_training: bool = False,
) -> Dataset:
    """timm's ImageFolder dataset of ``root/split`` with the transform of ``data_config`` (timm's
    ``create_transform`` keywords; an optional ``input_img_mode`` overrides the PIL mode of ``in_chans``)."""
    config = dict(data_config)
    mode = config.pop("input_img_mode", None) or image_mode(config["input_size"][0])
    dataset = create_dataset(
        "", root=str(root), split=split, class_map=dict(class_map) if class_map else None, input_img_mode=mode,
    )
    dataset.transform = create_transform(**config, is_training=is_training)
    return dataset


def class_names(dataset: Dataset) -> list[str]:
    """Class names of a timm ImageFolder dataset, indexed by label id."""
    class_to_idx = dataset.reader.class_to_idx
    names = [""] * len(class_to_idx)
    for name, idx in class_to_idx.items():
        names[idx] = name
    return names


def targets(dataset: Dataset) -> list[int]:
    """Labels of every sample, read from the file list (no image is decoded)."""
    return [t for _, t in dataset.reader.samples]


def subset_by_labels(dataset: Dataset, labels: Iterable[int], fraction: float = 1.0, seed: int = 0) -> Subset:
    """The samples whose label is in ``labels``; a seeded random ``fraction`` of them (reference: 10 %)."""
    wanted = set(labels)
    indices = [i for i, t in enumerate(targets(dataset)) if t in wanted]
    if fraction < 1.0:
        g = torch.Generator().manual_seed(seed)
        keep = max(1, round(len(indices) * fraction))
        indices = sorted(indices[i] for i in torch.randperm(len(indices), generator=g)[:keep].tolist())
    return Subset(dataset, indices)


def labelled(labels: Iterable[int], datasets: Sequence[Dataset], fraction: float = 1.0, seed: int = 0) -> Dataset:
    """``subset_by_labels`` over several datasets, concatenated (the first one's, empty, when none has any)."""
    labels = tuple(labels)
    parts = [subset_by_labels(d, labels, fraction, seed) for d in datasets]
    return concat([p for p in parts if len(p)] or parts[:1])


def concat(datasets: Sequence[Dataset]) -> Dataset:
    return datasets[0] if len(datasets) == 1 else ConcatDataset(list(datasets))


def resumable_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
    workers: int = 0, pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader sharded across ranks with a ``ResumableSampler``: padded when shuffling (training), an
    exact split otherwise (evaluation)."""
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                               pad=shuffle)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=False, drop_last=False, pin_memory=pin_memory)
