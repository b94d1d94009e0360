"""The swapped model's test sets, for scoring it with detectron2's stock tools, without detectron2_swap.

detectron2's ``SemSegEvaluator`` reads each image's label PNG as it is, so ``export_test_sets`` writes, next to
``model_swapped.pth``, every set's test labels in the joint label space (``swapped_labels/``) and
``swapped_datasets.json``: per set, a dataset name, its classes and its records. A few lines of plain detectron2
register them (docs/detectron2.md); ``SemSegEvaluator`` and ``inference_on_dataset`` on ``config_swapped.yaml``
then give the per-class IoU of the swap report, and a set's score is the mean over its classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog
from PIL import Image

from kswap import atomic_write_text

from .plan import SETS, SwapPlan, read_label_ids

SWAPPED_DATASETS_FILE = "swapped_datasets.json"
# The class of labelled pixels that belong to no joint class (e.g. a learn dataset's other classes): every
# prediction there is wrong, as in the swap's own scoring. Listed only when a test dataset has such classes.
OUTSIDE_CLASS = "(outside the swapped classes)"
RECORD_KEYS = ("file_name", "height", "width", "image_id")


def swapped_test_datasets() -> tuple[str, ...]:
    """The names of the sets' joint-label test datasets (forget, retain, learn): ``DATASETS.TEST`` of the swapped
    config."""
    return tuple(f"swapped_{name}_test" for name in SETS)


def export_test_sets(plan: SwapPlan, out_dir: Path) -> Path:
    """Write the sets' test labels in the joint label space and ``swapped_datasets.json`` under ``out_dir``.

    Returns:
        The JSON file's path.
    """
    n = plan.space.num_classes
    ignore, dtype = (255, np.uint8) if n < 255 else (65535, np.uint16)  # above every class id, outside included
    records: dict[str, list[dict]] = {}
    outside = False
    for dataset in dict.fromkeys(d for name in SETS for d in plan.test[name]):
        table = plan.score_table(dataset)
        outside |= bool((table == n).any())
        table[table == n + 1] = ignore
        folder = out_dir / "swapped_labels" / re.sub(r"[^\w.@+-]+", "_", dataset)
        folder.mkdir(parents=True, exist_ok=True)
        records[dataset] = []
        for i, record in enumerate(DatasetCatalog.get(dataset)):
            path = (folder / f"{i:06d}.png").resolve()
            Image.fromarray(read_label_ids(record["sem_seg_file_name"], table).astype(dtype)).save(path)
            records[dataset].append({**{k: record[k] for k in RECORD_KEYS if k in record},
                                     "sem_seg_file_name": str(path)})
    spec = {
        "stuff_classes": list(plan.space.names) + ([OUTSIDE_CLASS] if outside else []),
        "ignore_label": ignore,
        "datasets": {
            dataset_name: {"set": name, "classes": [plan.space.names[i] for i in plan.sets[name]],
                           "records": [r for d in plan.test[name] for r in records[d]]}
            for name, dataset_name in zip(SETS, swapped_test_datasets(), strict=True)
        },
    }
    return atomic_write_text(out_dir / SWAPPED_DATASETS_FILE, json.dumps(spec, indent=1))
