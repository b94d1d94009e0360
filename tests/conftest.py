"""Shared fixtures: real small data (sklearn digits) and tiny timm models built in the test (no download)."""

from __future__ import annotations

import pytest
import torch

from swap_testing.data import load_digits, write_digit_folders


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 real 8x8 handwritten digits (UCI optdigits), scaled to [0, 1], shape (N, 1, 8, 8)."""
    return load_digits()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digit_folders(tmp_path_factory, digits):
    """Real handwritten digits as timm ImageFolders: ``old`` holds digits 0-7 (folders "0".."7"), ``new`` holds
    8 and 9 as "eight" and "nine"."""
    root = tmp_path_factory.mktemp("digits")
    write_digit_folders(root, *digits)
    return root
