"""ComfyUI's own speed-up nodes (EasyCache, ToMe), called through their real node classes -- the one place
that does so, for FreeSpeed Auto's candidates and the benchmark's peer rows."""
from __future__ import annotations

import importlib

# key -> (module, node class, inputs fixed by us; the ladder's settings come on top)
BUILTIN_NODES = {
    "easycache": ("comfy_extras.nodes_easycache", "EasyCacheNode",
                  dict(reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False)),
    "tome": ("comfy_extras.nodes_tomesd", "TomePatchModel", dict(ratio=0.3)),
}


def run_model_node(module: str, cls: str, model, **inputs):
    """``cls.execute(model, **inputs)`` of a ComfyUI node that returns a MODEL first (V3 NodeOutput or a tuple)."""
    node = getattr(importlib.import_module(module), cls)
    out = node.execute(model, **inputs)
    return out.result[0] if hasattr(out, "result") else out[0]       # HyperTile returns a plain tuple


def apply_builtin(key: str, model, **settings):
    """A MODEL with ComfyUI's built-in ``key`` (``BUILTIN_NODES``) at its defaults, ``settings`` overriding them."""
    try:
        module, cls, fixed = BUILTIN_NODES[key]
    except KeyError:
        raise ValueError(f"unknown ComfyUI built-in {key!r}; expected one of {', '.join(BUILTIN_NODES)}") from None
    return run_model_node(module, cls, model, **{**fixed, **settings})


__all__ = ["BUILTIN_NODES", "run_model_node", "apply_builtin"]
