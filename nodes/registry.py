"""The node code of every technique of ``core.techniques`` (imported here, where ComfyUI is present)."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional

from ..core.techniques import TECHNIQUES, Technique, get


def module(t: Technique) -> ModuleType:
    return importlib.import_module(f".{t.module}", __package__)


def config(key: str, **settings) -> Any:
    """The technique's config: its defaults (the node's), ``settings`` overriding fields by name (an
    unknown name is an error, not ignored)."""
    import dataclasses
    cls = getattr(module(get(key)), get(key).config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**settings)


def apply(key: str, model, cfg: Optional[Any] = None, node_id: Optional[str] = None):
    """A clone of ``model`` with technique ``key`` installed (``cfg`` default: the node's defaults)."""
    t = get(key)
    return getattr(module(t), t.apply)(model, cfg if cfg is not None else config(key), node_id=node_id)


def node_classes() -> list:
    out = []
    for t in TECHNIQUES:
        for spec in t.nodes:
            mod, cls = spec.rsplit(".", 1)
            out.append(getattr(importlib.import_module(f".{mod}", __package__), cls))
    return out


__all__ = ["module", "config", "apply", "node_classes"]
