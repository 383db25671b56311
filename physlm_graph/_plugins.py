"""Third-party components: packages register through the ``physlm_graph.components`` entry point.

An entry point names a module (or a callable taking no arguments); importing or calling it
registers components with ``physlm_graph.register``.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any

GROUP = "physlm_graph.components"


def load_entry_points(registry: Any) -> list[str]:
    """Load every installed plugin; a broken plugin is reported as a warning, never fatal."""
    loaded = []
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
            loaded.append(ep.name)
        except Exception as exc:  # a plugin's bug must not break the compiler
            warnings.warn(f"physlm-graph plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
    return loaded
