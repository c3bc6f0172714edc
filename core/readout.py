"""What a FreeSpeed node did in its last run, for the canvas: a readout line and the schedule segments
the web extension draws over the denoising range.  Pure Python: stats dicts (:mod:`core.stats`) in,
text and dicts out; a bug here never reaches sampling (``publish`` calls :func:`annotate` in a ``try``).

Segments are ``{"start", "end", "kind", "label"}`` in fractions of the run; step ``i`` of ``n`` spans
``[i/n, (i+1)/n]``; kinds: ``full`` (runs as usual), ``active`` (saving work), ``key`` (a step the
technique needs in full).  Speed-ups in a readout are labelled estimates (T-GATE: cross-attention
~10% of a branch; Encoder Propagation: the encoder ~40% of a UNet call); measuring is the benchmark's.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from . import stats as S
from .techniques import TECHNIQUES

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
def _todo(s: S.ToDoStats) -> tuple[str, list[Segment], Optional[float]]:
    factors = [float(f) for f in s.factors]
    lo, hi = (float(s.window_pct[0]), float(s.window_pct[1])) if len(s.window_pct) == 2 else (0.0, 100.0)
    done = s.downsampled_calls
    parts = []
    active = [(i + 1, f) for i, f in enumerate(factors) if f > 1.0]
    dit = "image" in s.kv_tokens
    if dit:                     # a DiT: image K/V only (factors = the factors used), text K/V kept
        t = s.kv_tokens["image"].replace("->", "→")
        parts.append(f"image K/V ÷{'/'.join(f'{f:g}' for f in factors)} ({t} tok)")
        if s.text_kv_tokens:
            parts.append(f"text K/V kept ({s.text_kv_tokens} tok)")
    elif not active:
        parts.append("factors 1: nothing downsampled")
    else:
        lv = []
        for level, f in active:
            t = s.kv_tokens.get(f"level{level}")
            lv.append(f"K/V ÷{f:g} at level {level}" + (f" ({t.replace('->', '→')} tok)" if t else ""))
        parts.append(", ".join(lv))
    parts.append(f"{done} attn calls downsampled")
    if done:
        parts.append(f"K/V kept {_pct(s.kv_tokens_kept_pct)}")
    if (lo, hi) != (0.0, 100.0):
        parts.append(f"window {lo:g}–{hi:g}%")
    if active and done == 0:
        parts.append("no 2-D token grid hit" if s.outside_window_calls == 0 else "window missed every step")
    return SEP.join(parts), window_segments(lo, hi, bool(active)), None


def window_segments(lo: float, hi: float, active: bool, on: str = "K/V downsampled",
                    off: str = "full attention") -> list[Segment]:
    """Segments of a [lo, hi] percent window (ToDo's)."""
    if hi < lo or not active:
        return [_seg(0, 1, "full", off)]
    segs = []
    if lo > 0:
        segs.append(_seg(0, lo / 100, "full", off))
    segs.append(_seg(lo / 100, hi / 100, "active", on))
    if hi < 100:
        segs.append(_seg(hi / 100, 1, "full", off))
    return segs


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


def tgate_step_kinds(n: int, before: int, cache_step: Optional[int], off: bool, active_label: str) -> list:
    """(kind, label) of each step of a T-GATE run (also the schedule preview's)."""
    kinds = []
    for i in range(n):
        if off or i < before:
            kinds.append(("key", "cache step") if (not off and cache_step == i) else ("full", "before gate"))
        else:
            kinds.append(("active", active_label))
    return kinds


def _tgate(s: S.TGateStats) -> tuple[str, list[Segment], Optional[float]]:
    n = s.steps
    before, after = s.steps_before_gate, s.steps_after_gate
    off = s.gate_sigma is None
    skipped = s.uncond_evaluations_skipped
    cfg = skipped > 0 or s.uncond_evaluations > 0
    parts = []
    if off:
        parts.append(f"gate off ({_pct(s.gate_pct)})")
    elif before == 0:
        parts.append(f"gate at step 0/{n}: gated from the start")
    else:
        parts.append(f"gate at step {before}/{n}")
    text_stream = s.mode == "text stream"
    if not off:
        parts.append(f"text stream frozen {after} steps ({s.attn2_calls_skipped} block calls)" if text_stream
                     else f"cross-attn reused {after} steps ({s.attn2_calls_skipped} calls)")
        if s.keep_cfg:
            parts.append("CFG kept")
        elif skipped:
            parts.append("CFG off after gate")
        elif not cfg:
            parts.append("no CFG (cfg 1)")
    if s.attn1_calls_skipped:
        parts.append(f"self-attn reused {s.attn1_calls_skipped} calls")
    # joint DiTs: the frozen text stream's share depends on the prompt length; estimate CFG dropping alone
    est = None if off else tgate_speedup(n, before, cfg, skipped > 0, 0.0 if text_stream else CROSS_ATTENTION_SHARE)
    if est is not None and est >= 1.05:
        parts.append(f"~{_x(est)} est.")
    label = "gated" + ("" if s.keep_cfg or not cfg else ", CFG off")
    return SEP.join(parts), merge_steps(tgate_step_kinds(n, before, s.cache_step, off, label), n), est


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


def _propagation(s: S.EncoderPropagationStats) -> tuple[str, list[Segment], Optional[float]]:
    n = s.steps
    keys = sorted({int(k) for k in s.planned_key_steps if 0 <= int(k) < max(n, 1)})
    dec, par = s.decoder_only_steps, s.parallel_steps
    dit = bool(s.front_blocks)
    skipped = f"{dec} with front {s.front_blocks} blocks skipped" if dit else f"{dec} decoder-only"
    parts = [f"{s.key_steps or len(keys)} key steps/{n}", skipped + (f" ({par} batched)" if par else "")]
    if s.noise_injection > 0 and s.injected_steps:
        parts.append(f"noise {s.noise_injection:g}·z_T at {s.injected_steps} steps")
    if s.controlnet_skipped_evaluations:
        parts.append(f"ControlNet skipped {s.controlnet_skipped_evaluations}×")
    est = propagation_speedup(n, n - dec, s.front_share if dit else ENCODER_SHARE) if dec else None
    if est is not None and est >= 1.05:
        parts.append(f"~{_x(est)} est.")
    kinds = [("key", "key step") if i in keys else ("active", "front skipped" if dit else "decoder only")
             for i in range(n)]
    if dec == 0:
        kinds = [("full", "all blocks" if dit else "full UNet")] * n
    return SEP.join(parts), merge_steps(kinds, n), est


# ------------------------------------------------------------------------------------------------
# Attention Map Reuse
# ------------------------------------------------------------------------------------------------
def reuse_step_kinds(n: int, reuse: set, keep: set) -> list:
    return [("active", "map reused") if i in reuse else ("key", "maps kept") if i in keep else ("full", "computed")
            for i in range(n)]


def _mapreuse(s: S.MapReuseStats) -> tuple[str, list[Segment], Optional[float]]:
    n = s.steps
    reuse = sorted({int(k) for k in s.reuse_steps if 0 <= int(k) < max(n, 1)})
    keep = sorted({int(k) for k in s.keep_steps if 0 <= int(k) < max(n, 1)})
    parts = [f"{len(reuse)} reuse steps/{n}" if reuse else f"no reuse step ({s.schedule or 'off'})"]
    if keep:
        parts.append(f"{'outputs' if s.reuses == 'outputs' else 'maps'} kept at " + ",".join(str(k) for k in keep[:6])
                     + ("…" if len(keep) > 6 else ""))
    what = "attention output" if s.reuses == "outputs" else "map"
    parts.append(f"{s.reuse_calls} layer calls reused a{'n' if what[0] == 'a' else ''} {what}")
    if s.layers_left_alone_budget:
        parts.append(f"{s.layers_left_alone_budget} layers over the cache budget")
    if s.cache_peak_mb:
        parts.append(f"{'outputs' if s.reuses == 'outputs' else 'maps'} {s.cache_peak_mb:g} MB")
    return SEP.join(parts), merge_steps(reuse_step_kinds(n, set(reuse), set(keep)), n), None


# ------------------------------------------------------------------------------------------------
# AT-EDM
# ------------------------------------------------------------------------------------------------
def dsap_segments(ratio: float, dsap_pct: float) -> list[Segment]:
    if ratio <= 0:
        return [_seg(0, 1, "full", "not pruned")]
    segs = []
    if dsap_pct > 0:
        segs.append(_seg(0, dsap_pct / 100, "active", "DSAP: pruning less"))
    if dsap_pct < 100:
        segs.append(_seg(dsap_pct / 100, 1, "active", "pruned"))
    return segs


def _atedm(s: S.ATEDMStats) -> tuple[str, list[Segment], Optional[float]]:
    parts = []
    if s.ratio <= 0:
        parts.append("ratio 0: nothing pruned")
    else:
        lv = ", ".join(f"{k.replace('level', 'L')} {v.replace('->', '→')}" for k, v in sorted(s.kept_tokens.items()))
        parts.append(f"prune {s.ratio * 100:g}%" + (f" in {s.dit_range}" if s.dit_range else "")
                     + (f" ({lv} tok)" if lv else ""))
        parts.append(f"{s.stack_calls_pruned} {'calls' if s.dit_range else 'stack calls'} pruned")
        if s.stack_calls_pruned:
            parts.append(f"tokens kept {_pct(s.tokens_kept_pct)}")
            parts.append(f"FLOPs −{_pct(s.flops_saved_pct)}")
        if s.left_alone:
            parts.append(f"{s.left_alone} left alone")
        if s.dsap_end_pct > 0:
            parts.append(f"DSAP to {s.dsap_end_pct:g}%")
    return SEP.join(parts), dsap_segments(s.ratio, s.dsap_end_pct), None


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


_RULES = {"todo": _todo, "tgate": _tgate, "encprop": _propagation, "mapreuse": _mapreuse, "atedm": _atedm}
# technique name (stats["technique"]) -> (stats class, rule): one per registered technique
RULES: dict[str, tuple[type, Callable]] = {t.name: (t.stats, _RULES[t.key]) for t in TECHNIQUES}


def annotate(stats: dict[str, Any]) -> dict[str, Any]:
    """``{"readout": str, "segments": [...], "speedup_est": float | None}`` for one run's stats."""
    s = stats if isinstance(stats, dict) else {}
    known = RULES.get(str(s.get("technique", "")))
    if known is None and isinstance(s.get("readout"), str):       # nodes that word their own line (FreeSpeed Auto)
        return {"readout": s["readout"], "segments": [], "speedup_est": None}
    text, segs, est = known[1](known[0].from_dict(s)) if known else _generic(s)
    if "wall_s" in s:
        text = f"{text}{SEP}{_num(s, 'wall_s'):.2f} s"
    return {"readout": text, "segments": segs, "speedup_est": None if est is None else round(est, 2)}


def readout(stats: dict[str, Any]) -> str:
    return annotate(stats)["readout"]


__all__ = ["annotate", "readout", "tgate_speedup", "propagation_speedup", "merge_steps", "window_segments",
           "tgate_step_kinds", "reuse_step_kinds", "dsap_segments", "CROSS_ATTENTION_SHARE", "ENCODER_SHARE"]
