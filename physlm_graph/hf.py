"""Hugging Face ``transformers`` integration: ``AutoModelForCausalLM`` opens a physlm checkpoint.

    import physlm_graph                      # registers model_type "physlm" (no trust_remote_code)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/baby/last")
    tok = AutoTokenizer.from_pretrained("runs/baby/last", subfolder="tokenizer")
    out = model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=50, do_sample=False)

The classes (``PhysLMConfig``, ``PhysLMForCausalLM``) live in ``_hf`` and import transformers,
which takes seconds. ``import physlm_graph`` must not pay that, so this module only installs an
import hook: when transformers' ``configuration_auto`` / ``modeling_auto`` modules finish
loading (or right away, if they already have), the classes are registered with ``AutoConfig``
and ``AutoModelForCausalLM``. Without transformers installed, nothing happens.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

__all__ = ["PhysLMConfig", "PhysLMForCausalLM", "register_with_transformers", "install_import_hook"]

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
_done: set[str] = set()


def _register(which: str) -> None:
    if which in _done:
        return
    half = sys.modules.get("physlm_graph._hf")
    if half is not None and not hasattr(half, "register_model"):
        return  # _hf is importing transformers right now; it registers when it has finished (its last line)
    _done.add(which)
    try:
        from physlm_graph import _hf

        if which == _CONFIG_AUTO:
            _hf.register_config()
        else:
            _hf.register_model()
    except ImportError as exc:
        if "partially initialized" not in str(exc):
            warnings.warn(f"physlm-graph could not register its transformers classes: {exc}", stacklevel=2)
        _done.discard(which)  # transformers is halfway through importing itself: _hf's last line registers
    except Exception as exc:  # never break someone's `import transformers`
        warnings.warn(f"physlm-graph could not register its transformers classes: {exc}", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_register`` right after one of transformers' auto modules has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (_CONFIG_AUTO, _MODEL_AUTO) or fullname in _done:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register(fullname)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # one loader per spec
        return spec


def install_import_hook() -> None:
    """Register now for whatever part of transformers is loaded; hook the rest. Costs ~nothing."""
    for name in (_CONFIG_AUTO, _MODEL_AUTO):
        if name in sys.modules:
            _register(name)
    if len(_done) < 2 and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def register_with_transformers() -> None:
    """Register both classes now (imports transformers)."""
    import transformers.models.auto.configuration_auto  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    _register(_CONFIG_AUTO)
    _register(_MODEL_AUTO)


def __getattr__(name: str) -> Any:
    if name in ("PhysLMConfig", "PhysLMForCausalLM"):
        from physlm_graph import _hf

        return getattr(_hf, name)
    raise AttributeError(f"module 'physlm_graph.hf' has no attribute {name!r}")
