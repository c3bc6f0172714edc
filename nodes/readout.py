"""What a FreeSpeed node did in its last run, for the canvas: a compact readout line and the
schedule segments the web extension draws as a bar over the denoising range.

Pure Python on purpose (no torch, no ComfyUI): the input is the JSON-able stats dict a
:class:`~nodes.hooks.Technique` publishes after each run (``Technique.stats``), the output is
plain text and plain dicts, so every rule here is unit-tested without a host
(tests/core/test_readout.py) and a bug here can never reach sampling (``hooks.publish`` calls
:func:`annotate` inside a ``try``).

Segments are ``{"start", "end", "kind", "label"}`` with ``start``/``end`` fractions of the run
(0 = first step, 1 = end of denoising).  Step-based techniques (T-GATE, Encoder Propagation) give
step ``i`` of ``n`` the span ``[i/n, (i+1)/n]``; ToDo's window is given in percent of denoising
and is drawn at those percents, as is AT-EDM's DSAP phase.  Kinds, as the web extension colours them:

* ``"full"``   -- the model runs as usual (before T-GATE's gate, outside ToDo's window);
* ``"active"`` -- the technique is saving work there (gated, downsampled, decoder-only);
* ``"key"``    -- a step the technique needs in full to work (Encoder Propagation's key steps,
  T-GATE's cache step).

The speed-up in a readout is an *estimate* from what the run did, labelled "est." and rounded to
0.1: T-GATE counts UNet branch evaluations (CFG dropped after the gate halves them) and takes
cross-attention as ~10% of a branch; Encoder Propagation takes the encoder (input + middle blocks)
as ~40% of a UNet call at the steps that ran decoder-only.  Measured speed-ups are the
benchmark's job; these numbers only say roughly what a setting buys.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

# assumptions behind the estimates (see the module docstring)
CROSS_ATTENTION_SHARE = 0.10     # of one UNet branch evaluation (SD1.5/SDXL at their native sizes)
ENCODER_SHARE = 0.40             # input + middle blocks, of one UNet call
SEP = " · "

Segment = dict


def _num(s: dict, key: str, default: float = 0) -> float:
    v = s.get(key, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float(default)


def _int(s: dict, key: str, default: int = 0) -> int:
    return int(round(_num(s, key, default)))


def _pct(v: float) -> str:
    return f"{v:g}%"


def _x(v: float) -> str:
    return f"{v:.1f}×"


def _seg(start: float, end: float, kind: str, label: str) -> Segment:
    lo = min(max(float(start), 0.0), 1.0)
    hi = min(max(float(end), 0.0), 1.0)
    return {"start": round(lo, 4), "end": round(max(lo, hi), 4), "kind": kind, "label": label}


def merge_steps(kinds: list[tuple[str, str]], total: int) -> list[Segment]:
    """One segment per run of consecutive steps with the same (kind, label)."""
    out: list[Segment] = []
    if total <= 0:
        return out
    start = 0
    for i in range(1, total + 1):
        if i == total or kinds[i] != kinds[start]:
            kind, label = kinds[start]
            out.append(_seg(start / total, i / total, kind, label))
            start = i
    return out


# ------------------------------------------------------------------------------------------------
# ToDo
# ------------------------------------------------------------------------------------------------
def _todo(s: dict) -> tuple[str, list[Segment], Optional[float]]:
    factors = [float(f) for f in (s.get("factors") or [])]
    win = s.get("window_pct") or [0.0, 100.0]
    lo, hi = float(win[0]), float(win[1])
    done = _int(s, "downsampled_calls")
    parts = []
    active = [(i + 1, f) for i, f in enumerate(factors) if f > 1.0]
    toks = s.get("kv_tokens") or {}
    if not active:
        parts.append("factors 1: nothing downsampled")
    else:
        lv = []
        for level, f in active:
            t = toks.get(f"level{level}")
            lv.append(f"K/V ÷{f:g} at level {level}" + (f" ({t.replace('->', '→')} tok)" if t else ""))
        parts.append(", ".join(lv))
    parts.append(f"{done} attn calls downsampled")
    if done and "kv_tokens_kept_pct" in s:
        parts.append(f"K/V kept {_pct(_num(s, 'kv_tokens_kept_pct', 100))}")
    if (lo, hi) != (0.0, 100.0):
        parts.append(f"window {lo:g}–{hi:g}%")
    if active and done == 0:
        parts.append("no 2-D token grid hit" if _int(s, "outside_window_calls") == 0 else "window missed every step")
    segs: list[Segment] = []
    if hi < lo or not active:
        segs.append(_seg(0, 1, "full", "full attention"))
    else:
        if lo > 0:
            segs.append(_seg(0, lo / 100, "full", "full attention"))
        segs.append(_seg(lo / 100, hi / 100, "active", "K/V downsampled"))
        if hi < 100:
            segs.append(_seg(hi / 100, 1, "full", "full attention"))
    return SEP.join(parts), segs, None


# ------------------------------------------------------------------------------------------------
# T-GATE
# ------------------------------------------------------------------------------------------------
def tgate_speedup(steps: int, before: int, cfg: bool, cfg_dropped: bool,
                  cross_share: float = CROSS_ATTENTION_SHARE) -> Optional[float]:
    """Estimated speed-up of a T-GATE run: UNet branch evaluations, cross-attention skipped after the gate."""
    if steps <= 0:
        return None
    after = max(steps - before, 0)
    branches = 2 if cfg else 1
    after_branches = 1 if (cfg and cfg_dropped) else branches
    base = steps * branches
    cost = before * branches + after * after_branches * (1.0 - cross_share)
    return base / cost if cost > 0 else None


def _tgate(s: dict) -> tuple[str, list[Segment], Optional[float]]:
    n = _int(s, "steps")
    before = _int(s, "steps_before_gate", n)
    after = _int(s, "steps_after_gate", max(n - before, 0))
    off = s.get("gate_sigma") is None
    skipped = _int(s, "uncond_evaluations_skipped")
    with_uncond = _int(s, "uncond_evaluations")
    cfg = skipped > 0 or with_uncond > 0
    parts = []
    if off:
        parts.append(f"gate off ({_pct(_num(s, 'gate_pct', 100))})")
    elif before == 0:
        parts.append(f"gate at step 0/{n}: gated from the start")
    else:
        parts.append(f"gate at step {before}/{n}")
    reused = _int(s, "attn2_calls_skipped")
    if not off:
        parts.append(f"cross-attn reused {after} steps ({reused} calls)")
        if s.get("keep_cfg"):
            parts.append("CFG kept")
        elif skipped:
            parts.append("CFG off after gate")
        elif not cfg:
            parts.append("no CFG (cfg 1)")
    sa = _int(s, "attn1_calls_skipped")
    if sa:
        parts.append(f"self-attn reused {sa} calls")
    est = None if off else tgate_speedup(n, before, cfg, skipped > 0)
    if est is not None and est >= 1.05:
        parts.append(f"~{_x(est)} est.")
    kinds = []
    cache_step = s.get("cache_step")
    for i in range(n):
        if off or i < before:
            kinds.append(("key", "cache step") if (not off and cache_step == i) else ("full", "before gate"))
        else:
            kinds.append(("active", "gated" + ("" if s.get("keep_cfg") or not cfg else ", CFG off")))
    return SEP.join(parts), merge_steps(kinds, n), est


# ------------------------------------------------------------------------------------------------
# Encoder Propagation
# ------------------------------------------------------------------------------------------------
def propagation_speedup(steps: int, full_steps: int, encoder_share: float = ENCODER_SHARE) -> Optional[float]:
    """Estimated speed-up of encoder propagation: the encoder is skipped at the decoder-only steps."""
    if steps <= 0:
        return None
    full_steps = min(max(full_steps, 0), steps)
    cost = full_steps + (steps - full_steps) * (1.0 - encoder_share)
    return steps / cost if cost > 0 else None


def _propagation(s: dict) -> tuple[str, list[Segment], Optional[float]]:
    n = _int(s, "steps")
    keys = sorted({int(k) for k in (s.get("planned_key_steps") or []) if 0 <= int(k) < max(n, 1)})
    full = _int(s, "key_steps", len(keys))
    dec = _int(s, "decoder_only_steps")
    par = _int(s, "parallel_steps")
    parts = [f"{full} key steps/{n}", f"{dec} decoder-only" + (f" ({par} batched)" if par else "")]
    inj = _num(s, "noise_injection")
    if inj > 0 and _int(s, "injected_steps"):
        parts.append(f"noise {inj:g}·z_T at {_int(s, 'injected_steps')} steps")
    cn = _int(s, "controlnet_skipped_evaluations")
    if cn:
        parts.append(f"ControlNet skipped {cn}×")
    est = propagation_speedup(n, n - dec) if dec else None
    if est is not None and est >= 1.05:
        parts.append(f"~{_x(est)} est.")
    kinds = [("key", "key step") if i in keys else ("active", "decoder only") for i in range(n)]
    if dec == 0:
        kinds = [("full", "full UNet")] * n
    return SEP.join(parts), merge_steps(kinds, n), est


# ------------------------------------------------------------------------------------------------
# Attention Map Reuse
# ------------------------------------------------------------------------------------------------
def _mapreuse(s: dict) -> tuple[str, list[Segment], Optional[float]]:
    n = _int(s, "steps")
    reuse = sorted({int(k) for k in (s.get("reuse_steps") or []) if 0 <= int(k) < max(n, 1)})
    keep = sorted({int(k) for k in (s.get("keep_steps") or []) if 0 <= int(k) < max(n, 1)})
    parts = [f"{len(reuse)} reuse steps/{n}" if reuse else f"no reuse step ({s.get('schedule', 'off')})"]
    if keep:
        parts.append("maps kept at " + ",".join(str(k) for k in keep[:6]) + ("…" if len(keep) > 6 else ""))
    parts.append(f"{_int(s, 'reuse_calls')} layer calls reused a map")
    left = _int(s, "layers_left_alone_budget")
    if left:
        parts.append(f"{left} layers over the cache budget")
    if _num(s, "cache_peak_mb"):
        parts.append(f"maps {_num(s, 'cache_peak_mb'):g} MB")
    kinds = [("active", "map reused") if i in reuse else ("key", "maps kept") if i in keep else ("full", "computed")
             for i in range(n)]
    return SEP.join(parts), merge_steps(kinds, n), None


# ------------------------------------------------------------------------------------------------
# AT-EDM
# ------------------------------------------------------------------------------------------------
def _atedm(s: dict) -> tuple[str, list[Segment], Optional[float]]:
    ratio = _num(s, "ratio")
    pruned = _int(s, "stack_calls_pruned")
    dsap = _num(s, "dsap_end_pct")
    parts = []
    if ratio <= 0:
        parts.append("ratio 0: nothing pruned")
    else:
        toks = s.get("kept_tokens") or {}
        lv = ", ".join(f"{k.replace('level', 'L')} {v.replace('->', '→')}" for k, v in sorted(toks.items()))
        parts.append(f"prune {ratio * 100:g}%" + (f" ({lv} tok)" if lv else ""))
        parts.append(f"{pruned} stack calls pruned")
        if pruned:
            parts.append(f"tokens kept {_pct(_num(s, 'tokens_kept_pct', 100))}")
            parts.append(f"FLOPs −{_pct(_num(s, 'flops_saved_pct'))}")
        left = (_int(s, "stack_calls_left_kv_changed") + _int(s, "stack_calls_left_foreign_attn1")
                + _int(s, "stack_calls_left_no_map") + _int(s, "stack_calls_left_map_budget"))
        if left:
            parts.append(f"{left} left alone")
        if dsap > 0:
            parts.append(f"DSAP to {dsap:g}%")
    segs: list[Segment] = []
    if ratio <= 0:
        segs.append(_seg(0, 1, "full", "not pruned"))
    else:
        if dsap > 0:
            segs.append(_seg(0, dsap / 100, "active", "DSAP: pruning less"))
        if dsap < 100:
            segs.append(_seg(dsap / 100, 1, "active", "pruned"))
    return SEP.join(parts), segs, None


# ------------------------------------------------------------------------------------------------
# anything else (a technique without a rule here yet)
# ------------------------------------------------------------------------------------------------
_SKIP = {"technique", "model", "evaluations", "extra_evaluations", "steps", "wall_s"}


def _generic(s: dict) -> tuple[str, list[Segment], Optional[float]]:
    parts = []
    n = _int(s, "steps")
    if n:
        parts.append(f"{n} steps")
    counts = [(k, v) for k, v in s.items()
              if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and v]
    for k, v in counts[:3]:
        parts.append(f"{k.replace('_', ' ')} {v:g}")
    if not parts:
        parts.append(f"{_int(s, 'evaluations')} model calls")
    return SEP.join(parts), [], None


RULES: dict[str, Callable[[dict], tuple[str, list[Segment], Optional[float]]]] = {
    "ToDo": _todo,
    "T-GATE": _tgate,
    "Encoder Propagation": _propagation,
    "Attention Map Reuse": _mapreuse,
    "AT-EDM": _atedm,
}


def annotate(stats: dict[str, Any]) -> dict[str, Any]:
    """``{"readout": str, "segments": [...], "speedup_est": float | None}`` for one run's stats."""
    s = stats if isinstance(stats, dict) else {}
    rule = RULES.get(str(s.get("technique", "")), _generic)
    text, segs, est = rule(s)
    if "wall_s" in s:
        text = f"{text}{SEP}{_num(s, 'wall_s'):.2f} s"
    return {"readout": text, "segments": segs, "speedup_est": None if est is None else round(est, 2)}


def readout(stats: dict[str, Any]) -> str:
    return annotate(stats)["readout"]


def segments(stats: dict[str, Any]) -> list[Segment]:
    return annotate(stats)["segments"]


__all__ = ["annotate", "readout", "segments", "tgate_speedup", "propagation_speedup", "merge_steps",
           "CROSS_ATTENTION_SHARE", "ENCODER_SHARE"]
