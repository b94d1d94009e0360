"""Run by test_mmdet_swap.py under ``torch.distributed.run``: the swap of the tiny DINO on 2 CPU processes.

mmengine 0.10.7's ``pytorch`` launcher calls ``torch.cuda.set_device``; on CPU the gloo process group is
created first, which mmengine then uses as it is.
"""

import sys
from pathlib import Path

import torch.distributed as dist
from mmengine.runner import Runner

sys.path.insert(0, str(Path(__file__).parents[1]))
import mmdet_swap  # noqa: E402,F401  (custom_imports is applied by Config.fromfile, not by a Config built in code)

from swap_testing.tiny_dino import swap_cfg  # noqa: E402

glyphs, checkpoint, work = (Path(a) for a in sys.argv[1:4])
cfg = swap_cfg(glyphs, checkpoint, work)
cfg.custom_hooks[0].update(learn_length="10steps", forget_length="10steps")
cfg.launcher = "pytorch"
cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", broadcast_buffers=False, device_ids=None)  # CPU
dist.init_process_group(backend="gloo")
Runner.from_cfg(cfg).train()
