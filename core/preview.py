"""The schedule preview the canvas draws before a run: the same schedule code a run uses, on the node's
widget values and the downstream sampler's step count (the web extension asks the server,
``POST /freespeed/preview``; one definition of every schedule, in Python).

Without the model, percent of denoising is taken as the fraction of steps (a linear schedule); a
run resolves percents against its model's own sigmas, so a run may place a boundary one step
apart from its preview.  The run's own segments replace the preview after it (:mod:`core.readout`).
"""
from __future__ import annotations

from typing import Any, Optional

from . import readout as R
from .gating import GatePlan
from .mapreuse import SCHEDULE_LABELS as MAPREUSE_MODES, resolve_plan
from .propagation import SCHEDULE_LABELS as ENCPROP_MODES, key_steps
from .schedule import RunSchedule, parse_percent_list


def preview_schedule(steps: int) -> RunSchedule:
    """A linear schedule of ``steps`` steps where percent p sits at step p * steps."""
    n = max(1, int(steps))
    return RunSchedule([float(n - i) for i in range(n + 1)], lambda p: n * (1.0 - float(p)))


def _f(w: dict, name: str, default: float) -> float:
    try:
        return float(w.get(name, default))
    except (TypeError, ValueError):
        return float(default)


def _percents(text: Any) -> list[float]:
    try:
        return parse_percent_list(str(text or ""))
    except ValueError:
        return []


def _todo(w: dict, n: int) -> dict:
    f1, f2 = _f(w, "factor_level_1", 1), _f(w, "factor_level_2", 1)
    s, e = _f(w, "start_percent", 0), _f(w, "end_percent", 1)
    active = (f1 > 1 or f2 > 1) and e >= s
    if not active:
        return {"segments": R.window_segments(0, 100, False, off="off"), "text": "factors 1: off"}
    lv = ", ".join(x for x in (f"÷{f1:g} at level 1" if f1 > 1 else "", f"÷{f2:g} at level 2" if f2 > 1 else "") if x)
    return {"segments": R.window_segments(100 * s, 100 * e, True),
            "text": f"K/V {lv} · window {round(s * 100)}–{round(e * 100)}%"}


def _tgate(w: dict, n: int) -> dict:
    gate = min(max(_f(w, "gate", 0.4), 0.0), 1.0)
    if gate >= 1:
        return {"segments": R.window_segments(0, 100, False, off="gate off"), "text": "gate off (100%)"}
    plan = GatePlan.from_schedule(preview_schedule(n), gate)
    kinds = R.tgate_step_kinds(n, plan.steps_before, plan.cache_step, False, "gated")
    cfg = "CFG kept" if w.get("keep_cfg") else "CFG off after gate"
    return {"segments": R.merge_steps(kinds, n), "text": f"gate at step {plan.steps_before}/{n} · {cfg}"}


def _encprop(w: dict, n: int) -> dict:
    mode = ENCPROP_MODES.get(str(w.get("schedule", "paper 50ls")), "50ls")
    pct = _percents(w.get("key_percents")) if mode == "custom" else None
    if mode == "custom" and not pct:
        mode = "50ls"
    keys = set(key_steps(preview_schedule(n), mode, max(1, int(_f(w, "every_k", 4))), pct))
    kinds = [("key", "key step") if i in keys else ("active", "decoder only") for i in range(n)]
    return {"segments": R.merge_steps(kinds, n), "text": f"{len(keys)} key steps/{n} · {n - len(keys)} decoder-only"}


def _mapreuse(w: dict, n: int) -> dict:
    mode = MAPREUSE_MODES.get(str(w.get("schedule", "late (paper)")), "late")
    plan = resolve_plan(preview_schedule(n), mode, _f(w, "start", 0.5), max(0, int(_f(w, "refresh_every", 0))),
                        _percents(w.get("custom_percents")))
    reuse, keep = set(plan.reuse_steps), set(plan.keep_steps)
    return {"segments": R.merge_steps(R.reuse_step_kinds(n, reuse, keep), n),
            "text": f"{len(reuse)} reuse steps/{n}" if reuse else "no reuse step"}


def _mapreuse_search(w: dict, n: int) -> dict:
    steps, budget = int(_f(w, "steps", 20)), int(_f(w, "reuse_steps", 10))
    return {"segments": [], "text": f"searches {budget} reuse steps of {steps} ({steps + 2} calibration runs)"}


def _atedm(w: dict, n: int) -> dict:
    ratio, dsap = _f(w, "ratio", 0.7), _f(w, "dsap_end_percent", 0.3)
    text = f"prune {ratio * 100:g}% · DSAP to {dsap * 100:g}%" if ratio > 0 else "ratio 0: off"
    return {"segments": R.dsap_segments(ratio, 100 * dsap), "text": text}


PREVIEWS = {"FreeSpeedToDo": _todo, "FreeSpeedTGate": _tgate, "FreeSpeedEncoderPropagation": _encprop,
            "FreeSpeedAttentionMapReuse": _mapreuse, "FreeSpeedAttentionMapReuseSearch": _mapreuse_search,
            "FreeSpeedATEDM": _atedm}


def preview(node_type: str, widgets: Optional[dict], steps: Optional[int] = None) -> dict:
    """``{"segments": [...], "text": str}`` for a node type and its widget values; never raises."""
    n = int(steps) if isinstance(steps, (int, float)) and steps >= 1 else 20
    fn = PREVIEWS.get(str(node_type))
    if fn is None:
        return {"segments": [], "text": ""}
    try:
        return fn(widgets if isinstance(widgets, dict) else {}, min(n, 10000))
    except Exception as e:          # a preview is a hint: show the problem, never fail
        return {"segments": [], "text": f"no preview ({e})"}


__all__ = ["preview", "preview_schedule", "PREVIEWS"]
