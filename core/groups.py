"""Discover the group-sparsity groups: one group per transformer block, read from module names."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable


def _numbered_prefixes(name: str) -> list[str]:
    """Prefixes of a dotted name that end with an integer component, shallowest first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit()]


def discover_groups(module_names: Iterable[str], group_by: str | None = None) -> dict[str, list[str]]:
    """Map each group key to the names of the modules in it.

    A block is the deepest numbered prefix (``blocks.3``, ``layers.1.blocks.2``, ``encoder.layers.4``) that has
    a numbered sibling (``blocks.4``) holding modules at the same relative paths: that is what a stack of
    repeated transformer blocks looks like, and it keeps numbered pieces inside one block (mmcv's
    ``ffn.layers.0.0`` / ``ffn.layers.1``) together. A name under no repeated stack falls back to its
    shallowest numbered prefix, or to itself.

    Args:
        module_names: names of the modules holding LoRA.
        group_by: optional regex; when it matches the start of a name, the matched text is the group key.
    """
    names = sorted(set(module_names))
    pattern = re.compile(group_by) if group_by else None
    suffixes: dict[str, set[str]] = defaultdict(set)
    for name in names:
        for prefix in _numbered_prefixes(name):
            suffixes[prefix].add(name[len(prefix) :])

    siblings: dict[str, list[str]] = defaultdict(list)
    for prefix in suffixes:
        siblings[prefix.rpartition(".")[0]].append(prefix)

    def is_repeated(prefix: str) -> bool:
        return any(
            other != prefix and suffixes[other] == suffixes[prefix]
            for other in siblings[prefix.rpartition(".")[0]]
        )

    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        match = pattern.match(name) if pattern else None
        if match:
            key = match.group(0).rstrip(".")
        else:
            prefixes = _numbered_prefixes(name)
            repeated = [p for p in prefixes if is_repeated(p)]
            key = repeated[-1] if repeated else (prefixes[0] if prefixes else name)
        groups[key].append(name)
    return dict(groups)
