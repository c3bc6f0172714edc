"""The techniques, listed once.  Everything that enumerates them reads this table: the ComfyUI
extension (which nodes to register), the canvas readout (which rule draws a stats dict), the
benchmark's rows and the CLIs (``python -m bench --rows``, ``case``, ``sweep``).

Pure Python: the node code is named by module and attribute, imported only where ComfyUI is present
(:func:`nodes.registry.load`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import stats as S


@dataclass(frozen=True)
class Technique:
    key: str                  # short name: bench row, CLI name
    name: str                 # stats["technique"], log prefix "FreeSpeed <name>"
    label: str                # shown in tables
    paper: str                # arXiv id
    module: str               # the package nodes.<module>: config.py, unet.py, dit.py, node.py (its __init__ exports
                              # the config, apply function and node classes); the wrapper key is freespeed.<module>
    config: str               # frozen config dataclass (its defaults are the node's defaults)
    apply: str                # apply_x(model, config, node_id=None) -> patched clone
    nodes: tuple              # node classes, "package.module.Class" under nodes/
    stats: type               # core.stats dataclass of one run
    paper_sampling: dict = field(default_factory=dict)   # the paper's sampler settings (bench case CLI)

    @property
    def wrapper_key(self) -> str:
        return f"freespeed.{self.module}"


TECHNIQUES: tuple[Technique, ...] = (
    Technique("todo", "ToDo", "FreeSpeed ToDo", "2402.13573", "todo", "ToDoConfig", "apply_todo",
              ("todo.node.ToDoNode",), S.ToDoStats, dict(steps=20, cfg=7.0, sampler="euler", scheduler="normal")),
    Technique("tgate", "T-GATE", "FreeSpeed T-GATE", "2404.02747", "tgate", "TGateConfig", "apply_tgate",
              ("tgate.node.TGateNode",), S.TGateStats, dict(steps=25, cfg=7.0, sampler="euler", scheduler="normal")),
    Technique("encprop", "Encoder Propagation", "FreeSpeed Encoder Propagation", "2312.09608",
              "encoder_propagation", "EncoderPropagationConfig", "apply_encoder_propagation",
              ("encoder_propagation.node.EncoderPropagationNode",), S.EncoderPropagationStats,
              dict(steps=50, cfg=7.5, sampler="ddim", scheduler="ddim_uniform")),
    Technique("mapreuse", "Attention Map Reuse", "FreeSpeed Attention Map Reuse", "2401.01008", "mapreuse",
              "MapReuseConfig", "apply_mapreuse", ("mapreuse.node.MapReuseNode",
              "mapreuse.search.MapReuseSearchNode"), S.MapReuseStats,
              dict(steps=20, cfg=7.0, sampler="euler", scheduler="normal")),
    Technique("atedm", "AT-EDM", "FreeSpeed AT-EDM", "2405.05252", "atedm", "ATEDMConfig", "apply_atedm",
              ("atedm.node.ATEDMNode",), S.ATEDMStats, dict(steps=25, cfg=7.0, sampler="euler", scheduler="normal")),
)

BY_KEY = {t.key: t for t in TECHNIQUES}
BY_NAME = {t.name: t for t in TECHNIQUES}


def get(key: str) -> Technique:
    try:
        return BY_KEY[key]
    except KeyError:
        raise ValueError(f"unknown technique {key!r}; expected one of {', '.join(BY_KEY)}") from None


__all__ = ["Technique", "TECHNIQUES", "BY_KEY", "BY_NAME", "get"]
