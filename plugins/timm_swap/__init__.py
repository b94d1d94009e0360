"""timm_swap: a timm-style training script with pluggy plugins; ``--plugin swap`` runs a knowledge swap."""

from .hookspecs import hookimpl, hookspec
from .plugins import ENTRY_POINT_GROUP, load_plugins

__all__ = ["ENTRY_POINT_GROUP", "hookimpl", "hookspec", "load_plugins"]
