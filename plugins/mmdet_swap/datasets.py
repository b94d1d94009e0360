"""COCO data in a swap's joint label space."""

from __future__ import annotations

from collections.abc import Sequence

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS


@DATASETS.register_module()
class SwapCocoDataset(CocoDataset):
    """A COCO dataset whose labels are indices in the swap's joint class list, looked up by category name.

    mmdet's ``CocoDataset`` numbers the categories it finds in file order, so a file holding only some classes
    (a learn set, a subset) would be silently re-indexed; here label ``i`` always means ``metainfo['classes'][i]``.

    Args:
        keep_classes: if given, only instances of these class names are kept, and only images holding one.
    """

    def __init__(self, *args, keep_classes: Sequence[str] | None = None, **kwargs) -> None:
        self.keep_classes = tuple(keep_classes) if keep_classes is not None else None
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> list[dict]:
        self._labels_by_name = False
        return super().load_data_list()

    def parse_data_info(self, raw_data_info: dict) -> dict:
        if not self._labels_by_name:
            classes = list(self.metainfo["classes"])
            self.cat2label = {cat: classes.index(self.coco.cats[cat]["name"]) for cat in self.cat_ids}
            self._labels_by_name = True
        info = super().parse_data_info(raw_data_info)
        # The image's own file name, for writing the set back as a COCO file that resolves like this one.
        info["file_name"] = raw_data_info["raw_img_info"]["file_name"]
        if self.keep_classes is not None:
            keep = {list(self.metainfo["classes"]).index(name) for name in self.keep_classes}
            info["instances"] = [i for i in info["instances"] if i["bbox_label"] in keep]
        return info

    def filter_data(self) -> list[dict]:
        data = super().filter_data()
        if self.keep_classes is not None:  # also in test mode: a set is evaluated on the images that show it
            data = [d for d in data if any(not i["ignore_flag"] for i in d["instances"])]
        return data
