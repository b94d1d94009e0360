"""``SwapPlan``: a swap config resolved against detectron2's catalogs (class sets, datasets, label tables).

Every dataset keeps the label ids it was registered with. Labels are moved into the swapped model's joint label
space by class name (``stuff_classes``), never by an offset: pretrained classes keep their ids, the learn
classes come after them. Training ignores the pixels of classes outside a loss role's target classes; scoring
counts every labelled pixel (``SwapPlan.score_table``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager
from PIL import Image

from kswap import SETS, LabelSpace, Phase, SwapConfig, SwapConfigError, plan_phases

from .config import swap_config_from_cfg

SOURCE_KEY = "swap_source"


def swap_dataset_name(name: str, sources: tuple[str, ...]) -> str:
    """The name under which a dataset is registered again for the loss role fed by the sets ``sources``."""
    return f"{name}@swap:{'+'.join(sources)}"


@dataclass(frozen=True)
class SwapPlan:
    """What a swap trains on and scores, checked before anything is built.

    Args:
        config: the framework-free swap config.
        space: the joint label space (pretrained classes, then the learn classes).
        train: per set, its training dataset names.
        test: per set, the dataset names it is scored on.
        ignore_value: the label of ignored pixels in training targets (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``).
    """

    config: SwapConfig
    space: LabelSpace
    train: Mapping[str, tuple[str, ...]]
    test: Mapping[str, tuple[str, ...]]
    ignore_value: int = 255

    def __post_init__(self) -> None:
        self.space.resolve(self.config)  # unknown or overlapping classes fail here
        self.config.refuse_timm_only_terms("detectron2_swap (cfg.SWAP.*_LOSS)")
        for kind, by_set in (("train", self.train), ("test", self.test)):
            for name in SETS:
                if not by_set.get(name):
                    key = name.upper() + ("_TEST" if kind == "test" else "")
                    raise SwapConfigError(f"No {kind} dataset for the {name} set: set cfg.SWAP.DATASETS.{key}.")
                for dataset in by_set[name]:
                    _check_registered(dataset, f"the {name} {kind} set")
        for name in ("forget", "learn"):
            wanted = {self.space.names[i] for i in self.sets[name]}
            seen = {c for d in (*self.train[name], *self.test[name]) for c in _classes_of(d)}
            if missing := sorted(wanted - seen):
                raise SwapConfigError(
                    f"The {name} classes {missing} are in none of the {name} datasets' stuff_classes "
                    f"({sorted(seen)}): register the {name} datasets with these class names."
                )

    @classmethod
    def from_datasets(cls, config: SwapConfig, pretrained_dataset: str, train: Mapping[str, Iterable[str]],
                      test: Mapping[str, Iterable[str]], ignore_value: int = 255) -> SwapPlan:
        """A plan from a ``SwapConfig`` and dataset names (what a LazyConfig instantiates).

        Args:
            config: the swap config (e.g. ``SwapConfig.preset("segmentation", forget=..., learn=...)``).
            pretrained_dataset: the dataset the model was trained on; its ``stuff_classes`` are the pretrained
                classes.
            train: per set (forget, retain, learn), its training dataset names.
            test: per set, the dataset names it is scored on.
            ignore_value: the label of ignored pixels in training targets.
        """
        pretrained = _classes_of(_check_registered(pretrained_dataset, "the pretrained dataset"))
        return cls(config=config, space=LabelSpace.for_config(pretrained, config),
                   train={name: tuple(train.get(name, ())) for name in SETS},
                   test={name: tuple(test.get(name, ())) for name in SETS}, ignore_value=ignore_value)

    @classmethod
    def from_cfg(cls, cfg: CfgNode) -> SwapPlan:
        """Read ``cfg.SWAP``; the pretrained classes are those of ``cfg.DATASETS.TRAIN[0]``."""
        config = swap_config_from_cfg(cfg)
        if not cfg.DATASETS.TRAIN:
            raise SwapConfigError("cfg.DATASETS.TRAIN is empty: name the dataset the model was trained on, whose "
                                  "stuff_classes are the pretrained classes.")
        datasets = cfg.SWAP.DATASETS
        return cls.from_datasets(
            config, cfg.DATASETS.TRAIN[0],
            train={name: datasets[name.upper()] for name in SETS},
            test={name: datasets[f"{name.upper()}_TEST"] for name in SETS},
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )

    @cached_property
    def sets(self) -> dict[str, tuple[int, ...]]:
        """Per set, its label ids in the joint space."""
        return self.space.resolve(self.config).as_dict()

    @cached_property
    def phases(self) -> list[Phase]:
        return plan_phases(self.config)

    def kept_ids(self, sets: Iterable[str]) -> dict[str, int]:
        """Class name to joint id, for the classes of ``sets``."""
        return {self.space.names[i]: i for name in sets for i in self.sets[name]}

    def label_table(self, dataset: str, sets: Iterable[str], ignore: int) -> np.ndarray:
        """A lookup table from ``dataset``'s label ids to joint ids; other classes and its ignore label give
        ``ignore``."""
        return label_table(_classes_of(dataset), self.kept_ids(sets), _ignore_of(dataset), ignore)

    def score_table(self, dataset: str) -> np.ndarray:
        """A lookup table from ``dataset``'s label ids to joint ids, for scoring: every class of the joint space
        keeps its pixels, ``num_classes`` marks the labelled pixels of the dataset's other classes (no prediction
        is right there) and ``num_classes + 1`` its ignore label and undefined ids."""
        classes, ignore, n = _classes_of(dataset), _ignore_of(dataset), self.space.num_classes
        table = label_table(classes, {name: i for i, name in enumerate(self.space.names)}, ignore, n + 1)
        table[[i for i, name in enumerate(classes) if name not in self.space.names and i != ignore]] = n
        return table

    @staticmethod
    def target_sets(sources: tuple[str, ...]) -> tuple[str, ...]:
        """The sets whose classes a loss role's training targets keep.

        The forget role keeps only the forget classes (its loss is pushed up). Every other role keeps the retain
        and learn classes wherever they are labelled: a learn image's pixels of a retained class (its
        background, say) still teach that class, and forget-class pixels are never trained towards.
        """
        return ("forget",) if sources == ("forget",) else ("retain", "learn")

    def register_role_datasets(self, sources: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Register the training datasets of a loss role fed by ``sources`` again, for the user's train loader.

        Each alias (``swap_dataset_name(name, sources)``) has its dataset's metadata and only the records with at
        least one pixel of the role's target classes (a batch of ignored pixels only has no loss), tagged with
        their source dataset (whose label table applies after the user's mapper).

        Returns:
            Per source dataset, in order, its label table into the role's target classes (``ignore_value`` else).
        """
        tables = {}
        for name in dict.fromkeys(d for s in sources for d in self.train[s]):
            tables[name] = table = self.label_table(name, self.target_sets(sources), self.ignore_value)
            alias = swap_dataset_name(name, sources)
            if alias not in DatasetCatalog.list():
                register_alias(name, alias,
                               lambda name=name, table=table: _role_records(name, table, self.ignore_value))
        return tables


def register_alias(name: str, alias: str, records: Callable[[], list[dict]]) -> None:
    """Register ``records`` as dataset ``alias`` with ``name``'s metadata (the user's mapper reads it), replacing
    an earlier ``alias``."""
    if alias in DatasetCatalog.list():
        DatasetCatalog.remove(alias)
        MetadataCatalog.remove(alias)
    DatasetCatalog.register(alias, records)
    MetadataCatalog.get(alias).set(**{k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k != "name"})


def read_label_ids(path: str, table: np.ndarray) -> np.ndarray:
    """A label PNG's ids (as detectron2's SemSegEvaluator reads them) mapped through ``table``."""
    with PathManager.open(path, "rb") as f:
        labels = np.asarray(Image.open(f), dtype=np.int64)
    return table[np.clip(labels, 0, len(table) - 1)]


def _role_records(name: str, table: np.ndarray, ignore: int) -> list[dict]:
    records = []
    for record in DatasetCatalog.get(name):
        if (read_label_ids(record["sem_seg_file_name"], table) != ignore).any():
            records.append({**record, SOURCE_KEY: name})
    if not records:
        raise SwapConfigError(f"No image of dataset {name!r} has a pixel of the classes it serves here.")
    return records


def label_table(classes: list[str], keep: Mapping[str, int], ignore_in: int, ignore_out: int) -> np.ndarray:
    """``table[local_id] = keep[classes[local_id]]``; every other value (and ``ignore_in``) maps to ``ignore_out``."""
    size = max(256, len(classes), ignore_in + 1)
    table = np.full(size, ignore_out, dtype=np.int64)
    for local_id, name in enumerate(classes):
        if name in keep:
            table[local_id] = keep[name]
    if ignore_in >= 0:
        table[ignore_in] = ignore_out
    return table


def _check_registered(name: str, role: str) -> str:
    if name not in DatasetCatalog.list():
        raise SwapConfigError(
            f"Dataset {name!r} ({role}) is not registered: register it with DatasetCatalog.register and "
            f"MetadataCatalog.get({name!r}).set(stuff_classes=[...], ignore_label=...) before building the trainer."
        )
    return name


def _classes_of(dataset: str) -> list[str]:
    classes = MetadataCatalog.get(dataset).get("stuff_classes")
    if not classes:
        raise SwapConfigError(f"Dataset {dataset!r} has no stuff_classes in its metadata: set "
                              f"MetadataCatalog.get({dataset!r}).stuff_classes to its class names.")
    return list(classes)


def _ignore_of(dataset: str) -> int:
    return int(MetadataCatalog.get(dataset).get("ignore_label", 255))
