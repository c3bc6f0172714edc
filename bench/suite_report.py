"""Reports of the benchmark suite (:mod:`bench.suite`): terminal table, markdown, JSON, and the
cost-vs-fidelity plot (PNG, x = counted FLOPs ratio, one point per row, the fewer-steps curve drawn through).  Pure
functions of the result document; no torch work."""
from __future__ import annotations

import math
import os
from typing import Optional

from .report import table, to_json

COLUMNS = ("row", "steps", "GFLOPs/sample", "FLOPs ratio", "median s", "time ratio", "PSNR dB", "SSIM", "acc", "FD",
           "vs fewer steps at equal FLOPs", "vs fewer steps at equal time", "node stats")


def _psnr(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "ref"
    return f"{v:.2f}"


def _time_ratio(r: dict) -> str:
    if r.get("time_ratio") is None:
        return "-"
    rng = r.get("time_ratio_range")
    return f"{r['time_ratio']:.2f}x" + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else "")


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def rows(doc: dict, readout_width: int = 70) -> list[list[str]]:
    out = []
    for r in doc["rows"]:
        if r.get("flops") is None:
            out.append([r["label"], str(r["steps"]), *["-"] * 8, "", "", f"not run: {(r.get('error') or '')[:readout_width]}"])
            continue
        ro = r.get("readout") or ""
        if r.get("error"):
            ro = r["error"]
        if len(ro) > readout_width:
            ro = ro[:readout_width - 1] + "…"
        fd = "-" if r.get("fd") is None else f"{r['fd']:.2f}±{r.get('fd_spread') or 0:.2f}"
        out.append([r["label"], str(r["steps"]), f"{r['flops'] / 1e9:.2f}", f"{r['flops_ratio']:.2f}x",
                    _num(r.get("median_s"), ".3f"), _time_ratio(r), _psnr(r["psnr"]), f"{r['ssim']:.3f}",
                    _num(r.get("prompt_accuracy"), ".3f"), fd, r.get("verdict_flops") or "",
                    r.get("verdict_time") or "", ro])
    return out


def headline(doc: dict) -> str:
    c, e = doc["config"], doc["environment"]
    dev = e.get("device_name") or e.get("device", "")
    return (f"FreeSpeed benchmark: {c['model_label']}, {c['width']}x{c['height']} (latent "
            f"{'x'.join(str(v) for v in c['latent'][2:])}), {c['batch']} samples, {c['steps']} steps {c['sampler']}/"
            f"{c['scheduler']}, CFG {c['cfg']:g}, {c['dtype']}, attention {c['attention']}, {dev}; timed: "
            f"{c['rounds']} interleaved round(s) of {c.get('timing_batch', c['batch'])} sample(s)")


def timing_line(doc: dict) -> str:
    t = doc.get("timing") or {}
    if t.get("ok"):
        return f"timing: consistent ({t.get('why')}): time verdicts given"
    return f"timing inconclusive: {t.get('why')} -- no time verdict; the FLOPs verdicts stand"


def goal_lines(doc: dict) -> list[str]:
    """Each technique and peer against fewer steps: at equal counted FLOPs, then at equal wall time."""
    out = []
    for r in doc["rows"]:
        if r.get("kind") in ("baseline", "fewer_steps") or r.get("flops") is None:
            continue
        line = f"{r['label']}: FLOPs {r['flops_ratio']:.2f}x, {r.get('verdict_flops')}"
        if r.get("verdict_time") == "inconclusive":
            line += "; time: inconclusive"
        elif r.get("time_ratio") is not None:
            line += f"; time {_time_ratio(r)}, {r.get('verdict_time')}"
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
    n.append("FLOPs = counted per sample over the whole sampling run (torch.utils.flop_counter with the attention "
             "kernels registered, FreeSpeed's own maps, PageRank and gathers included; core/flops.py); ratios = "
             "baseline / row, > 1 is cheaper; 'vs fewer steps': the baseline with the most steps not costlier than "
             "the row on that axis (FLOPs: the same on every machine and run)")
    n.append("time: medians of interleaved rounds (in brackets: the range of the per-round ratios); a time verdict "
             "needs >= 3 rounds and a step-count curve that passes the self-check (core.measure.timing_check)")
    n.append("PSNR/SSIM of the final latent vs the baseline's (same noise and prompts, the counted pass)")
    if doc["config"].get("quality"):
        n.append("acc = prompt accuracy (attributes read back from each sample); FD = fixture FD against true renders "
                 "of the same prompts (± bootstrap spread); quality 'better' = FD lower by more than the larger "
                 "spread with prompt accuracy no more than 0.02 lower")
    return n


def terminal(doc: dict) -> str:
    checks = check_lines(doc)
    return "\n".join([headline(doc), *doc.get("scope", []), timing_line(doc), "", *goal_lines(doc), "",
                      *(["fixture checks:", *(f"  {x}" for x in checks), ""] if checks else []),
                      table(list(COLUMNS), rows(doc)), "",
                      *(f"note: {x}" for x in notes(doc)), f"total wall time {doc['wall_s']:.0f} s"])


def markdown(doc: dict) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * 9 + ["---"] * 3) + "|"
    body = ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(doc, readout_width=90)]
    checks = check_lines(doc)
    return "\n".join([f"**{headline(doc)}**", "", *(f"> {x}" for x in doc.get("scope", [])), "",
                      f"**{timing_line(doc)}**", "", *(f"- {g}" for g in goal_lines(doc)), "",
                      *(["Fixture checks:", *(f"- {x}" for x in checks), ""] if checks else []),
                      head, sep, *body, "", *(f"- {x}" for x in notes(doc)), ""])


def readme_table(doc: dict) -> str:
    """The compact table the README shows (regenerate it from a run's ``suite.json``:
    ``python -c "import json, bench.suite_report as r; print(r.readme_table(json.load(open(PATH))))"``)."""
    out = ["| row | FLOPs ratio | time ratio (per-round range) | PSNR dB | acc | FD | vs fewer steps at equal FLOPs "
           "| at equal time |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in doc["rows"]:
        if r.get("flops") is None:
            out.append(f"| {r['label']} | — | — | — | — | — | not run: {(r.get('error') or '')[:60]} | |")
            continue
        fd = "-" if r.get("fd") is None else f"{r['fd']:.1f} ± {r.get('fd_spread') or 0:.1f}"
        label = r["label"] + (f" ({r['steps']} steps)" if r["kind"] == "baseline" else "")
        out.append(f"| {label} | {r['flops_ratio']:.2f}x | {_time_ratio(r)} | {_psnr(r['psnr'])} | "
                   f"{_num(r.get('prompt_accuracy'), '.3f')} | {fd} | {r.get('verdict_flops') or ''} | "
                   f"{r.get('verdict_time') or ''} |")
    return "\n".join(out)


def _panel(doc: dict, metric: str, label: str, title: str):
    from comfyui_freespeed.core.charts import speed_fidelity_plot
    pts, curve = [], []
    for r in doc["rows"]:
        if r.get("flops_ratio") is None or r.get(metric) is None:
            continue
        y = r[metric]
        if r["kind"] in ("fewer_steps", "baseline"):
            curve.append((r["flops_ratio"], y, f"{r['steps']} st"))
        else:
            pts.append({"label": r["name"], "x": r["flops_ratio"], "y": y})
    curve = [p for p in curve if math.isfinite(p[1])]
    return speed_fidelity_plot(pts, curve, title=title, y_label=label,
                               x_label="counted FLOPs ratio vs baseline (×, higher is cheaper)")


def plot(doc: dict, title: Optional[str] = None):
    """Cost (counted FLOPs: the deterministic axis) vs closeness and, with quality metrics, vs quality, as a PIL image."""
    from comfyui_freespeed.core.charts import stack_images
    c = doc["config"]
    head = title or f"{c['model_label']}, {c['width']}x{c['height']}, {c['steps']} steps {c['sampler']}, CFG {c['cfg']:g}"
    panels = [_panel(doc, "psnr", "PSNR vs the full run (dB)", head + ": closeness")]
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
