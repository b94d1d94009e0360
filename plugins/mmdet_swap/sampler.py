"""A data sampler mmengine can build from a config, whose position a swap checkpoint restores exactly."""

from __future__ import annotations

from collections.abc import Sized

from mmengine.dist import get_dist_info, sync_random_seed
from mmengine.registry import DATA_SAMPLERS

from kswap import ResumableSampler


@DATA_SAMPLERS.register_module()
class SwapSampler(ResumableSampler):
    """``kswap.ResumableSampler`` with mmengine's ``DefaultSampler`` arguments (rank and world size from the
    process group, one seed shared by all ranks)."""

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int | None = None) -> None:
        rank, world_size = get_dist_info()
        super().__init__(len(dataset), shuffle=shuffle, seed=sync_random_seed() if seed is None else seed,
                         rank=rank, world_size=world_size)
