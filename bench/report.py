"""Output of the bench: a terminal table, a JSON document and a markdown table.

The JSON document is :func:`bench.results.document`'s (schema ``freespeed-bench/speed/1``); the
terminal table and the markdown table show, per attention kernel, the columns of :data:`COLUMNS`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

from .results import RESULT_KEYS, TOP_KEYS  # noqa: F401  (the pinned document format)

COLUMNS = ("attention", "runs", "base s", "patched s", "attn share", "touched share", "ideal x", "measured x",
           "of ideal")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rows(doc: dict) -> list[list[str]]:
    """One row of :data:`COLUMNS` per kernel."""
    out = []
    for r in doc["results"]:
        out.append([r["kernel_label"], str(r["repeats"]), f"{r['base_median_s']:.2f}", f"{r['patched_median_s']:.2f}",
                    _pct(r["attention_share"]), _pct(r["selected_share"]), f"{r['ideal_ratio']:.2f}",
                    f"{r['measured_ratio']:.2f}", _pct(r["fraction_of_ideal"])])
    return out


def headline(doc: dict) -> str:
    c = doc["config"]
    env = doc["environment"]
    where = env.get("gpu") or env.get("cpu") or env["device"]
    what = "one model evaluation" if c["steps"] == 1 else f"{c['steps']} steps ({c['sampler']})"
    return (f"{doc['technique_label']} vs unpatched — {c['model_label']}, {c['width']}x{c['height']} "
            f"(latent {c['latent'][1]}x{c['latent'][0]}), {what}, UNet batch {c['unet_batch']} (cfg {c['cfg']:g}), "
            f"{c['dtype']} on {c['device']} [{where}, {env['threads']} threads]")


def notes(doc: dict) -> list[str]:
    out = ["base/patched s: median model time (time inside the UNet forward) of interleaved runs; "
           "measured x = median(base) / median(patched).",
           "attn share: attention kernel time / model time in the base model; touched share: the same for the "
           "calls the technique shrinks.",
           f"ideal x assumes: {doc['ideal_assumes']}.", ]
    for r in doc["results"]:
        if not r["batched_cfg"]:
            out.append(f"{r['kernel_label']}: ComfyUI split the CFG batch (UNet batch {r['unet_batch']}, "
                       f"expected {r['unet_batch_expected']}); model time covers all chunks.")
        if r["repeats"] < 2:
            out.append(f"{r['kernel_label']}: a single timed round (time budget); treat the ratio as indicative.")
    return out


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), line, *(fmt(r) for r in body)])


def terminal(doc: dict) -> str:
    extra = []
    for r in doc["results"]:
        st = r.get("technique_stats") or {}
        toks = ", ".join(f"{k} {v}" for k, v in (st.get("kv_tokens") or {}).items())
        extra.append(f"{r['kernel_label']}: wall-time ratio {r['wall_ratio']:.2f}, touched attention "
                     f"{r['selected_attention_speedup']:.2f}x faster, {st.get('downsampled_calls', 0)} calls "
                     f"downsampled" + (f" ({toks})" if toks else ""))
    return "\n".join([headline(doc), "", table(list(COLUMNS), rows(doc)), "", *extra, *notes(doc),
                      f"total wall time {doc['wall_s']:.0f} s"])


def markdown(doc: dict) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"
    body = ["| " + " | ".join(r) + " |" for r in rows(doc)]
    return "\n".join([f"**{headline(doc)}**", "", head, sep, *body, "", *(f"- {n}" for n in notes(doc)), ""])


def _clean(obj: Any) -> Any:
    """JSON-safe copy (tuples → lists, NaN/inf → None)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(doc: dict) -> str:
    return json.dumps(_clean(doc), indent=2)


def emit_json(doc, path: Optional[str] = None) -> int:
    """What the small measurement CLIs end with: the document as JSON on stdout and, given ``path``, in
    that file too; returns the exit status (0)."""
    text = json.dumps(doc, indent=1, default=str)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return 0


def write(doc: dict, json_path: Optional[str], md_path: Optional[str]) -> list[str]:
    """Write the JSON and markdown files (parent folders created); returns the paths written."""
    written = []
    for path, text in ((json_path, to_json(doc)), (md_path, markdown(doc))):
        if not path:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        written.append(path)
    return written
