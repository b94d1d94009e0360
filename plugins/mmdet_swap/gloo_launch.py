"""mmdet's own ``tools/train.py`` in the CPU processes ``torchrun`` starts::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m mmdet_swap.gloo_launch tools/train.py CONFIG \\
        --launcher pytorch --cfg-options model_wrapper_cfg.type=MMDistributedDataParallel \\
        model_wrapper_cfg.device_ids=None

mmengine 0.10.7's ``pytorch`` launcher pins each process to a GPU (``torch.cuda.set_device``) before it creates
the process group, which fails on a machine without one; where a process group exists already, the Runner uses
it as it is. So this creates the gloo group from torchrun's environment, then runs the script as
``python SCRIPT ARGS`` would. ``device_ids=None``: mmengine's own DDP wrap otherwise asks for the process's GPU.
"""

from __future__ import annotations

import runpy
import sys

import torch.distributed as dist


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: torchrun --nproc_per_node N -m mmdet_swap.gloo_launch SCRIPT [ARGS ...]")
    dist.init_process_group(backend="gloo")
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
