"""compressor: from a trained PyTorch teacher to a measured, deployable edge bundle.

    import compressor
    bundle = compressor.run("quickstart", "runs/qs")       # or a Recipe, a YAML path, a dict
    compressor.verify(bundle)

Heavy libraries load on first use, not on import.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "run": ("compressor.pipeline", "run"),
    "load_recipe": ("compressor.recipe", "load_recipe"),
    "Recipe": ("compressor.recipe", "Recipe"),
    "verify": ("compressor.bundle", "verify"),
    "read_manifest": ("compressor.bundle", "read_manifest"),
    "DistillModule": ("compressor.distill.module", "DistillModule"),
    "LOSSES": ("compressor.distill", "LOSSES"),
    "UserError": ("compressor.errors", "UserError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = list(_LAZY)
