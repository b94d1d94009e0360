#!/usr/bin/env python3
"""timm-style training with plugins: ``python train.py --plugin swap ...`` (same as ``timm-swap-train``)."""

from timm_swap.train import main

if __name__ == "__main__":
    main()
