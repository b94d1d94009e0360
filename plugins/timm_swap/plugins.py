"""Find plugins through the ``timm_swap.plugins`` entry-point group and register them with pluggy."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "timm_swap.plugins"


def available_plugins() -> dict[str, str]:
    """Installed plugin names and the objects they point to."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugins(names: Iterable[str]) -> pluggy.PluginManager:
    """A plugin manager with the named plugins registered, in the order given.

    An entry point may name a class (instantiated with no arguments), an instance or a module.

    Raises:
        SystemExit: for a name no installed package provides (the message lists the installed ones).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in names:
        if name not in found:
            installed = ", ".join(sorted(found)) or "none"
            raise SystemExit(
                f"error: unknown plugin {name!r}; installed plugins (entry points in {ENTRY_POINT_GROUP!r}): "
                f"{installed}."
            )
        if pm.has_plugin(name):
            continue
        obj = found[name].load()
        pm.register(obj() if isinstance(obj, type) else obj, name=name)
    return pm
