"""Reports of the benchmark suite (:mod:`bench.suite`): terminal table, markdown, JSON, and the
speed-vs-fidelity plot (PNG, one point per row, the fewer-steps curve drawn through).  Pure
functions of the result document; no torch work."""
from __future__ import annotations

import math
import os
from typing import Optional

from .report import table, to_json

COLUMNS = ("row", "steps", "median s", "ratio", "PSNR dB", "SSIM", "peak MB", "vs fewer steps", "node stats")


def _psnr(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "ref"
    return f"{v:.2f}"


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
    mark = "better" if r.get("beats_fewer_steps") else "worse"
    return f"{mark} ({m['steps']} st: {_psnr(m['psnr_db'])})"


def rows(doc: dict, readout_width: int = 70) -> list[list[str]]:
    out = []
    for r in doc["rows"]:
        if "error" in r:
            out.append([r["label"], str(r["steps"]), "-", "-", "-", "-", "-", "", f"not run: {r['error'][:readout_width]}"])
            continue
        ro = r.get("readout") or ""
        if len(ro) > readout_width:
            ro = ro[:readout_width - 1] + "…"
        out.append([r["label"], str(r["steps"]), f"{r['median_s']:.3f}", f"{r['ratio']:.2f}x", _psnr(r["psnr_db"]),
                    f"{r['ssim']:.3f}", "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}",
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
        verdict = {True: "beats", False: "does not beat", None: "is faster than every"}[v]
        out.append(f"{r['label']}: {r['ratio']:.2f}x, {verdict} fewer steps at equal time")
    return out


def notes(doc: dict) -> list[str]:
    n = list(doc.get("notes", []))
    if not doc["config"].get("fidelity_meaningful", True):
        n.append("fidelity columns not meaningful for random weights")
    if not any(r.get("peak_mem_mb") is not None for r in doc["rows"]):
        n.append("peak memory is measured on CUDA only")
    n.append("ratio = baseline median / row median, same interleaved rounds; PSNR/SSIM of the final latent vs "
             "the baseline's (same noise and prompts); 'vs fewer steps': the baseline with the most steps that "
             "is not slower than the row")
    return n


def terminal(doc: dict) -> str:
    return "\n".join([headline(doc), "", table(list(COLUMNS), rows(doc)), "", *goal_lines(doc),
                      *(f"note: {x}" for x in notes(doc)), f"total wall time {doc['wall_s']:.0f} s"])


def markdown(doc: dict) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * 6 + ["---", "---"]) + "|"
    body = ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(doc, readout_width=90)]
    return "\n".join([f"**{headline(doc)}**", "", head, sep, *body, "", *(f"- {g}" for g in goal_lines(doc)),
                      *(f"- {x}" for x in notes(doc)), ""])


def plot(doc: dict, title: Optional[str] = None):
    """The speed-vs-fidelity plot as a PIL image."""
    from comfyui_freespeed.core.charts import speed_fidelity_plot
    pts, curve = [], []
    for r in doc["rows"]:
        if "median_s" not in r:
            continue
        y = r["psnr_db"] if r["psnr_db"] is not None else math.inf
        if r["kind"] == "fewer_steps":
            curve.append((r["ratio"], y, f"{r['steps']} st"))
        else:
            pts.append({"label": r["name"], "x": r["ratio"], "y": y})
    c = doc["config"]
    base = next((r for r in doc["rows"] if r.get("kind") == "baseline"), None)
    if base is not None:
        curve.append((1.0, math.inf if base.get("psnr_db") is None else base["psnr_db"], f"{c['steps']} st"))
    curve = [p for p in curve if math.isfinite(p[1])]
    return speed_fidelity_plot(pts, curve, title=title or f"{c['model_label']}, {c['width']}x{c['height']}, "
                                                           f"{c['steps']} steps {c['sampler']}, CFG {c['cfg']:g}")


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
