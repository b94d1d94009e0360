"""timm host tests: skipped as a whole where the timm extra (timm, pluggy) is not installed."""

import pytest

pytest.importorskip("timm.models")  # the real package: tests/timm is a namespace package on the path
pytest.importorskip("pluggy")
