"""mmdet tests: skipped as a whole where the OpenMMLab stack (mmengine, mmcv with its ops, mmdet) is not installed."""

import pytest

pytest.importorskip("mmengine")
pytest.importorskip("mmcv.ops")
pytest.importorskip("mmdet.registry")  # the real package: tests/mmdet is a namespace package on the path
pytest.importorskip("pycocotools")
