"""Helpers shared by the test layers (tests/core, tests/timm, tests/mmdet, tests/detectron2): small real models,
real data written to disk, and the host rigs. Test modules import from here, never from each other."""
