"""physlm-graph: a declarative model-assembly compiler for language-model research.

A YAML blueprint becomes a checked ``torch.fx.GraphModule``::

    from physlm_graph import compile_blueprint
    cm = compile_blueprint("blueprints/baby-gpt.yaml", overrides={"params.layers": 2})
    logits = cm.module(tokens)["logits"]
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

# In a source checkout the component library and the runtime live at the top of the
# repository (``components/``, ``runtime/``; pyproject maps them to ``physlm_graph.components``
# and ``physlm_graph.runtime`` in a wheel). Make the same names import from a checkout.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "components")) and _os.path.isfile(
    _os.path.join(_root, "components", "__init__.py")
):
    __path__.append(_root)  # type: ignore[name-defined]

from physlm_graph._errors import (  # noqa: E402
    BuildError,
    CheckpointError,
    ComponentError,
    Diagnostic,
    LoadError,
    Loc,
    PassError,
    PhysLMError,
    ResolveError,
    RuntimeDataError,
    ShapeError,
    TrainingError,
    ValidateError,
)
from physlm_graph._registry import (  # noqa: E402
    REGISTRY,
    ComponentParams,
    Example,
    Inputs,
    TensorSpec,
    register,
    register_function,
)
from physlm_graph._context import DecodeContext, decode_context, decoding  # noqa: E402

try:  # register model_type "physlm" with transformers' Auto classes when transformers loads
    from physlm_graph.hf import install_import_hook as _install_hf_hook

    _install_hf_hook()
except Exception:  # pragma: no cover - a broken transformers must not break the compiler
    pass

if TYPE_CHECKING:
    from physlm_graph._compile import CompiledModel, compile_blueprint

__version__ = "0.1.0"

__all__ = [
    "compile_blueprint",
    "CompiledModel",
    "import_hf",
    "export_hf",
    "register",
    "register_function",
    "REGISTRY",
    "ComponentParams",
    "Example",
    "Inputs",
    "TensorSpec",
    "DecodeContext",
    "decode_context",
    "decoding",
    "PhysLMError",
    "LoadError",
    "ResolveError",
    "ValidateError",
    "ShapeError",
    "BuildError",
    "PassError",
    "RuntimeDataError",
    "CheckpointError",
    "TrainingError",
    "ComponentError",
    "Diagnostic",
    "Loc",
]


def __getattr__(name: str) -> Any:
    if name in ("compile_blueprint", "CompiledModel"):
        from physlm_graph import _compile

        return getattr(_compile, name)
    if name in ("import_hf", "export_hf"):  # Hugging Face families (imports transformers: on demand)
        from physlm_graph import _hf_export, _hf_import

        return getattr(_hf_import if name == "import_hf" else _hf_export, name)
    raise AttributeError(f"module 'physlm_graph' has no attribute {name!r}")
