"""Reports of the benchmark suite (:mod:`bench.suite`): terminal table, markdown, JSON, and the
speed-vs-fidelity plot (PNG, one point per row, the fewer-steps curve drawn through).  Pure
functions of the result document; no torch work."""
from __future__ import annotations

import math
import os
from typing import Optional

from .report import table, to_json

COLUMNS = ("row", "steps", "median s", "ratio", "PSNR dB", "SSIM", "acc", "FD", "peak MB", "vs fewer steps",
           "node stats")


def _psnr(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "ref"
    return f"{v:.2f}"


def _word(v) -> str:
    return {True: "better", False: "worse", None: "?"}[v]


def _versus(r: dict) -> str:
    if r.get("kind") in ("baseline", "fewer_steps"):
        return ""
    if "fewer_steps_match" not in r:
        return "n/a"
    m = r["fewer_steps_match"]
    if m is None:
        return "faster than all"
    if m.get("baseline"):
        return "not faster than baseline"
    text = f"{m['steps']} st: closeness {_word(r.get('beats_fewer_steps'))}"
    if "beats_fewer_steps_quality" in r:
        text += f", quality {_word(r.get('beats_fewer_steps_quality'))}"
    return text


def _ratio(r: dict) -> str:
    rng = r.get("ratio_range")
    return f"{r['ratio']:.2f}x" + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else "")


def rows(doc: dict, readout_width: int = 70) -> list[list[str]]:
    out = []
    for r in doc["rows"]:
        if "error" in r:
            out.append([r["label"], str(r["steps"]), "-", "-", "-", "-", "-", "-", "-", "",
                        f"not run: {r['error'][:readout_width]}"])
            continue
        ro = r.get("readout") or ""
        if len(ro) > readout_width:
            ro = ro[:readout_width - 1] + "…"
        acc = "-" if r.get("prompt_accuracy") is None else f"{r['prompt_accuracy']:.3f}"
        fd = "-" if r.get("fd") is None else f"{r['fd']:.2f}±{r.get('fd_spread') or 0:.2f}"
        out.append([r["label"], str(r["steps"]), f"{r['median_s']:.3f}", _ratio(r), _psnr(r["psnr_db"]),
                    f"{r['ssim']:.3f}", acc, fd, "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}",
                    _versus(r), ro])
    return out


def headline(doc: dict) -> str:
    c, e = doc["config"], doc["environment"]
    dev = e.get("device_name") or e.get("device", "")
    return (f"FreeSpeed benchmark: {c['model_label']}, {c['width']}x{c['height']} (latent "
            f"{'x'.join(str(v) for v in c['latent'][2:])}), batch {c['batch']}, {c['steps']} steps {c['sampler']}/"
            f"{c['scheduler']}, CFG {c['cfg']:g}, {c['dtype']}, attention {c['attention']}, {dev}, "
            f"{c['rounds']} interleaved round(s)")


def goal_lines(doc: dict) -> list[str]:
    """The issue's goal as measured: each technique at its default beats fewer steps at equal time."""
    out = []
    for r in doc["rows"]:
        if r.get("kind") not in ("freespeed", "stacked") or "median_s" not in r:
            continue
        v = r.get("beats_fewer_steps")
        if "fewer_steps_match" not in r:
            out.append(f"{r['label']}: {r['ratio']:.2f}x (no fewer-steps runs to compare with)")
            continue
        m = r.get("fewer_steps_match")
        if m and m.get("baseline"):
            out.append(f"{r['label']}: {r['ratio']:.2f}x, not faster than the baseline")
            continue
        if m is None:
            out.append(f"{r['label']}: {r['ratio']:.2f}x, faster than every fewer-steps run measured")
            continue
        verdict = {True: "beats", False: "does not beat"}
        line = f"{r['label']}: {r['ratio']:.2f}x, {verdict[bool(v)]} {m['steps']} steps on closeness"
        if "beats_fewer_steps_quality" in r:
            line += f", {verdict[bool(r['beats_fewer_steps_quality'])]} it on quality"
        out.append(line)
    return out


def check_lines(doc: dict) -> list[str]:
    """The fixture's realism figures against their targets."""
    c = doc.get("fixture_checks")
    if not c:
        return []
    out = []
    for k, target in c.get("targets", {}).items():
        if c.get(k) is None:
            out.append(f"{k}: not measured (target {target})")
            continue
        met = c.get("targets_met", {}).get(k)
        out.append(f"{k}: {c[k]:g} (target {target}: {'met' if met else 'NOT met'})")
    return out


def notes(doc: dict) -> list[str]:
    n = list(doc.get("notes", []))
    if not doc["config"].get("fidelity_meaningful", True):
        n.append("fidelity columns not meaningful for random weights")
    if doc["config"].get("rounds", 0) < 3:
        n.append(f"only {doc['config'].get('rounds')} timing round(s): on a shared machine a verdict that rests on a "
                 "few percent of speed can turn; use --repeats 3 (or a larger --budget) before trusting one")
    if not any(r.get("peak_mem_mb") is not None for r in doc["rows"]):
        n.append("peak memory is measured on CUDA only")
    n.append("ratio = baseline median / row median, same interleaved rounds (in brackets: the range of the "
             "per-round ratios); PSNR/SSIM of the final latent vs the baseline's (same noise and prompts); "
             "'vs fewer steps': the baseline with the most steps that is not slower than the row")
    if doc["config"].get("quality"):
        n.append("acc = prompt accuracy (attributes read back from each sample); FD = fixture FD against true renders "
                 "of the same prompts (± bootstrap spread); quality 'better' = FD lower by more than the larger "
                 "spread with prompt accuracy no more than 0.02 lower")
    return n


def terminal(doc: dict) -> str:
    checks = check_lines(doc)
    return "\n".join([headline(doc), "", *(["fixture checks:", *(f"  {x}" for x in checks), ""] if checks else []),
                      table(list(COLUMNS), rows(doc)), "", *goal_lines(doc),
                      *(f"note: {x}" for x in notes(doc)), f"total wall time {doc['wall_s']:.0f} s"])


def markdown(doc: dict) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * 8 + ["---", "---"]) + "|"
    body = ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(doc, readout_width=90)]
    checks = check_lines(doc)
    return "\n".join([f"**{headline(doc)}**", "", *(["Fixture checks:", *(f"- {x}" for x in checks), ""] if checks else []),
                      head, sep, *body, "", *(f"- {g}" for g in goal_lines(doc)),
                      *(f"- {x}" for x in notes(doc)), ""])


def _panel(doc: dict, metric: str, label: str, title: str):
    from comfyui_freespeed.core.charts import speed_fidelity_plot
    pts, curve = [], []
    for r in doc["rows"]:
        if "median_s" not in r or r.get(metric) is None:
            continue
        y = r[metric]
        if r["kind"] in ("fewer_steps", "baseline"):
            curve.append((r["ratio"], y, f"{r['steps']} st"))
        else:
            pts.append({"label": r["name"], "x": r["ratio"], "y": y})
    curve = [p for p in curve if math.isfinite(p[1])]
    return speed_fidelity_plot(pts, curve, title=title, y_label=label)


def plot(doc: dict, title: Optional[str] = None):
    """The speed-vs-closeness plot and, with quality metrics, the speed-vs-quality plot, as a PIL image."""
    from comfyui_freespeed.core.charts import stack_images
    c = doc["config"]
    head = title or f"{c['model_label']}, {c['width']}x{c['height']}, {c['steps']} steps {c['sampler']}, CFG {c['cfg']:g}"
    panels = [_panel(doc, "psnr_db", "PSNR vs the full run (dB)", head + ": closeness")]
    if c.get("quality"):
        panels.append(_panel(doc, "fd", "fixture FD (lower is better)", head + ": quality"))
    return panels[0] if len(panels) == 1 else stack_images(panels)


def write(doc: dict, out_dir: str, stem: str = "suite") -> list[str]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext, text in (("json", to_json(doc)), ("md", markdown(doc))):
        p = os.path.join(out_dir, f"{stem}.{ext}")
        with open(p, "w") as fh:
            fh.write(text)
        paths.append(p)
    p = os.path.join(out_dir, f"{stem}.png")
    plot(doc).save(p)
    paths.append(p)
    return paths
