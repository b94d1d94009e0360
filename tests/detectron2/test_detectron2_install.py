"""The detectron2 that the offline install route builds runs an unmodified train_net.py's set-up."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("detectron2")


def test_collect_env_info_reports_the_pure_python_build():
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "not built (pure-Python detectron2 build)" in info


def test_default_setup_as_train_net_calls_it(tmp_path):
    from detectron2.config import get_cfg
    from detectron2.engine import default_argument_parser, default_setup

    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.MODEL.DEVICE = "cpu"
    args = default_argument_parser().parse_args([])
    assert isinstance(args, argparse.Namespace)
    default_setup(cfg, args)  # collects the environment, logs it, writes the config: as every train_net.py does
    assert (tmp_path / "out" / "config.yaml").is_file()
