"""detectron2 tests: skipped as a whole where detectron2 is not installed; the glyph sets and pretrained model."""

import pytest

pytest.importorskip("detectron2.config")  # the real package: tests/detectron2 is a namespace package on the path
pytest.importorskip("pycocotools")


@pytest.fixture(scope="session")
def glyph_spec(tmp_path_factory):
    """detectron2's registered glyph segmentation datasets (see ``d2_models.write_glyph_spec``)."""
    from swap_testing.d2_models import write_glyph_spec

    return write_glyph_spec(tmp_path_factory.mktemp("glyph_seg"))


@pytest.fixture(scope="session")
def d2_pretrained(glyph_spec, tmp_path_factory):
    """The pretrained detectron2 SemanticSegmentor on the glyph digits (``d2_models.pretrain_glyph_segmentor``)."""
    from swap_testing.d2_models import pretrain_glyph_segmentor

    return pretrain_glyph_segmentor(tmp_path_factory.mktemp("pretrain"))
