"""The techniques the bench can measure, by name.

Each entry knows how to install the technique on a clone of the base model (through the pack's
own node code, exactly what the node does), which attention calls it makes cheaper (for the
attention share and the ideal ratio) and how to read its run stats.  Only ToDo is registered so
far; further techniques add an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class TechniqueOptions:
    factor: float = 2.0          # ToDo: K/V downsampling factor per side
    level: int = 1               # ToDo: attention level it is applied at (1 = highest resolution)
    method: str = "nearest"      # ToDo: downsampling method


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    label: str
    key: str                                        # the Technique's wrapper key (to find its stats)
    apply: Callable[[Any, TechniqueOptions], Any]   # (ModelPatcher, options) -> patched clone
    describe: Callable[[TechniqueOptions], str]
    # (ModelInfo, options) -> predicate on instrument.AttnCall: the calls the technique shrinks
    selector: Callable[[Any, TechniqueOptions], Callable[[Any], bool]]
    # options -> per-side K/V reduction f of a selected call (cost ∝ Nq·Nk: at best f² cheaper)
    factor: Callable[[TechniqueOptions], float]
    # stats dict -> a problem string if the run shows the technique did nothing, else None
    check: Callable[[dict], Optional[str]]


def todo_factors(level: int, factor: float) -> tuple:
    """ToDoConfig.factors with ``factor`` at attention ``level`` and 1 (off) at the other levels."""
    if level < 1:
        raise ValueError("level must be >= 1")
    return tuple(float(factor) if i == level - 1 else 1.0 for i in range(max(level, 2)))


def _todo_apply(model, opts: TechniqueOptions):
    from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo
    return apply_todo(model, ToDoConfig(factors=todo_factors(opts.level, opts.factor), method=opts.method))


def _todo_selector(info, opts: TechniqueOptions):
    def select(call) -> bool:
        return call.kind == "self" and call.block is not None and info.attention_level(call.block) == opts.level
    return select


def _todo_check(stats: dict) -> Optional[str]:
    if not stats:
        return "ToDo recorded no run (its OUTER_SAMPLE wrapper did not fire)"
    if not stats.get("downsampled_calls"):
        return f"ToDo downsampled no self-attention call (stats: {stats})"
    return None


TECHNIQUES: dict[str, TechniqueSpec] = {
    "todo": TechniqueSpec(
        name="todo", label="ToDo", key="freespeed.todo", apply=_todo_apply,
        describe=lambda o: f"ToDo factor {o.factor:g} at attention level {o.level} ({o.method})",
        selector=_todo_selector, factor=lambda o: float(o.factor), check=_todo_check),
}
