"""The component library (``physlm_graph.components``): one component per file, by family.

Importing this package registers every component: each module below is imported once, and
its ``@register`` calls add it to ``physlm_graph.REGISTRY``.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []


def _import_all() -> None:
    for mod in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
        if mod.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(mod.name)


_import_all()
