"""The compatibility matrix: its rows and columns, the results file the host tests write, and the README
block generated from it.  Pure Python (no ComfyUI, no torch): ``python -m tests.host.compat_report`` rewrites
README's block between the markers from ``tests/host/compat_results.json``; ``--check`` only compares.

A cell is one FreeSpeed node next to one other node, sampler route or FreeSpeed node.  The tests in
``tests/host/test_compat_matrix.py`` (UNets) and ``tests/host/test_compat_dit.py`` (DiTs) classify each cell
and record it here; ``tests/host/test_compat_readme.py`` checks that README shows exactly what they recorded.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "compat_results.json")
README = os.path.join(REPO, "README.md")
BEGIN, END = "<!-- compat:begin -->", "<!-- compat:end -->"

WORKS, REFUSED, WRONG = "works", "refused", "wrong"
STATUSES = (WORKS, REFUSED, WRONG)

# the five FreeSpeed technique nodes, in README order (core.techniques keys)
NODES = (("todo", "ToDo"), ("tgate", "T-GATE"), ("encprop", "Encoder Propagation"),
         ("mapreuse", "Attention Map Reuse"), ("atedm", "AT-EDM"))
NODE_LABEL = dict(NODES)

# (key, label, models the cell is tested on); the order is README's row order
COLUMNS = (
    # other FreeSpeed nodes (both orders)
    ("with_todo", "stacked with FreeSpeed ToDo (both orders)", "SD1.5, SDXL"),
    ("with_tgate", "stacked with FreeSpeed T-GATE (both orders)", "SD1.5, SDXL"),
    ("with_encprop", "stacked with FreeSpeed Encoder Propagation (both orders)", "SD1.5, SDXL"),
    ("with_mapreuse", "stacked with FreeSpeed Attention Map Reuse (both orders)", "SD1.5, SDXL"),
    ("with_atedm", "stacked with FreeSpeed AT-EDM (both orders)", "SD1.5, SDXL"),
    # model patches and conditioning
    ("lora_before", "LoRA before the node (`LoraLoaderModelOnly`)", "SD1.5, SDXL"),
    ("lora_after", "LoRA after the node (`LoraLoaderModelOnly`)", "SD1.5"),
    ("controlnet", "ControlNet (`ControlNetApplyAdvanced`)", "SD1.5, SDXL"),
    ("ipadapter", "IP-Adapter-style `attn2` replace patches (both orders)", "SD1.5"),
    ("sag", "Self-Attention Guidance (SAG), node after it", "SD1.5"),
    ("pag", "Perturbed-Attention Guidance (PAG), node after it", "SD1.5, SDXL"),
    ("perpneg", "PerpNeg (`PerpNegGuider`)", "SD1.5"),
    ("rescalecfg", "RescaleCFG, node after it", "SD1.5"),
    ("cfgnorm", "CFGNorm (post-CFG), node after it", "SD1.5"),
    ("apg", "Adaptive Projected Guidance (APG, pre-CFG), node after it", "SD1.5"),
    ("tcfg", "Tangential Damping CFG (TCFG, pre-CFG), node after it", "SD1.5"),
    ("freeu", "FreeU_V2 (both orders)", "SD1.5, SDXL"),
    ("tome", "TomePatchModel (both orders)", "SD1.5"),
    ("hypertile", "HyperTile (both orders)", "SD1.5, SDXL"),
    ("easycache", "EasyCache (both orders)", "SD1.5"),
    ("lazycache", "LazyCache (both orders)", "SD1.5"),
    ("diffdiff", "Differential Diffusion + inpaint mask, node after it", "SD1.5"),
    ("vpred", "`ModelSamplingDiscrete` v-prediction + zsnr (both orders)", "SD1.5"),
    ("torch_compile", "`TorchCompileModel` after the node", "SD1.5"),
    ("lowvram", "lowvram partial loading (+ LoRA)", "SD1.5"),
    # sampler routes
    ("img2img", "img2img, denoise 0.3", "SD1.5"),
    ("hires", "hires second pass at 1.5x, same patched MODEL", "SD1.5, SDXL"),
    ("ksampler_advanced", "`KSamplerAdvanced` split run (`return_with_leftover_noise`)", "SD1.5"),
    ("custom_sigmas", "Align Your Steps sigmas through `SamplerCustom`", "SD1.5"),
    ("sde_ancestral", "`euler_ancestral` and `dpmpp_2m_sde` samplers", "SD1.5"),
    # hygiene
    ("bypass", "input MODEL unchanged (bypass): plain sampling after the patched one", "SD1.5"),
    ("requeue", "re-queue: the cached patched MODEL sampled again", "SD1.5"),
    ("step_change", "another step count in between leaves nothing behind", "SD1.5"),
    # DiTs
    ("dit_lora", "Flux: LoRA (both orders)", "Flux"),
    ("dit_controlnet", "Flux: ControlNet", "Flux"),
    ("dit_kontext", "Flux Kontext: reference latents (`ReferenceLatent`)", "Flux"),
    ("dit_redux", "Flux: Redux-style image tokens in the conditioning (`StyleModelApply`)", "Flux"),
    ("dit_shift", "`ModelSamplingFlux` / `ModelSamplingSD3` shift (both orders)", "Flux, SD3"),
    ("dit_wan_i2v", "Wan image-to-video (`WanImageToVideo`)", "Wan 2.1"),
    ("dit_easycache", "EasyCache on a DiT (both orders)", "Flux"),
)
COLUMN_LABEL = {k: label for k, label, _ in COLUMNS}
COLUMN_MODELS = {k: models for k, _, models in COLUMNS}


def cell_key(node: str, column: str) -> str:
    return f"{node}|{column}"


def load(path: str = RESULTS) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("cells", {})


def dump(cells: dict) -> str:
    known = {cell_key(n, c) for n, _ in NODES for c, _, _ in COLUMNS}
    ordered = {k: cells[k] for k in sorted(cells) if k in known}
    return json.dumps({"cells": ordered}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def save(cells: dict, path: str = RESULTS) -> bool:
    """Write the results (deterministically); False when the file already held exactly this."""
    text = dump(cells)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def missing(cells: dict) -> list[str]:
    return [cell_key(n, c) for n, _ in NODES for c, _, _ in COLUMNS if cell_key(n, c) not in cells]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).replace("|", "/").strip()


def short_label(label: str) -> str:
    """A column's label without its qualifiers (for the notes)."""
    return re.split(r" \(|, node after", label)[0]


def render(cells: dict) -> str:
    """The README block (markers included) for ``cells``: one row per column, one column per node; ✓ = works,
    ⛔ = clear refusal, ✗ = wrong (a failing test), each with a numbered note below the table."""
    head = "| | " + " | ".join(label for _, label in NODES) + " |"
    lines = [BEGIN, "", "Generated by `python -m tests.host.compat_report` from `tests/host/compat_results.json`, which "
             "the host tests `tests/host/test_compat_matrix.py` and `tests/host/test_compat_dit.py` write (every cell "
             "is one test that classifies it). ✓ works: finite output that differs from the partner's own run only "
             "where FreeSpeed acts, FreeSpeed acted, and the partner's effect is still there; ⛔ clear refusal: an "
             "error (or one warning) that names both nodes and says why; ✗ wrong: a failing test.", "",
             head, "|---" * (len(NODES) + 1) + "|"]
    notes: list[str] = []
    symbol = {WORKS: "✓", REFUSED: "⛔", WRONG: "✗"}
    for col, label, models in COLUMNS:
        row = [f"{label} [{models}]"]
        for node, node_label in NODES:
            cell = cells.get(cell_key(node, col))
            if cell is None:
                row.append("not run")
                continue
            mark = symbol.get(cell.get("status"), "?")
            note = _clean(cell.get("note") or "")
            if note:
                notes.append(f"{len(notes) + 1}. {node_label} × {short_label(label)}: {note}")
                mark += f" {len(notes)}"
            row.append(mark)
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines += ["", *notes]
    lines += ["", END]
    return "\n".join(lines)


def readme_block(text: str) -> Optional[str]:
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        return None
    return text[i:j + len(END)]


def update_readme(cells: dict, path: str = README) -> bool:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    old = readme_block(text)
    if old is None:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    new = render(cells)
    if old == new:
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))
    return True


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cells = load()
    gaps = missing(cells)
    if "--check" in argv:
        with open(README, encoding="utf-8") as f:
            ok = readme_block(f.read()) == render(cells)
        print("README compatibility matrix is current" if ok else "README compatibility matrix is out of date")
        if gaps:
            print(f"{len(gaps)} cells have no result: {', '.join(gaps[:8])}{' ...' if len(gaps) > 8 else ''}")
        return 0 if ok and not gaps else 1
    changed = update_readme(cells)
    print("README updated" if changed else "README already current")
    if gaps:
        print(f"{len(gaps)} cells have no result yet (run the host tests): {', '.join(gaps[:8])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
