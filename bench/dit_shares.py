"""FLOPs shares of the full-size DiTs that decide what the DiT paths can save (issues 15-16), from the real block
modules (``nodes.sites.dit_block_shapes`` over the full models, built on the meta device):

* attention share (ToDo's ceiling: ToDo removes part of the attention FLOPs), per resolution;
* the text stream's share (what T-GATE's frozen text stream saves on a joint-attention DiT, besides dropping CFG);
* ToDo's and AT-EDM's ideal speed-ups (Amdahl) at the node defaults;
* RoPE: how much averaging a cell of post-RoPE keys (ToDo avg-pool) shrinks each rotary pair, against 1 for nearest.

Usage: ``python -m bench.dit_shares [--json PATH]`` (CPU, seconds: the models are built on the meta device).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from . import host
from .report import emit_json

# full model -> (comfy.supported_models class, the unet_config ComfyUI's detection builds, text tokens, joint?)
def models() -> dict:
    from .models import FLUX_DEV, SD35_LARGE, SD35_MEDIUM, WAN21_1_3B
    return {"Flux-dev": ("Flux", FLUX_DEV, 512, True),
            "SD3.5 Large": ("SD3", SD35_LARGE, 154, True),
            "SD3.5 Medium": ("SD3", SD35_MEDIUM, 154, True),
            "Qwen-Image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}, 200, True),
            "Wan 2.1 1.3B": ("WAN21_T2V", WAN21_1_3B, 512, False)}


# Flux / Qwen-Image / Wan 2.1 rotary axes of a 128-dim head: (dims per axis, theta); positions step 1 per token
ROPE = {"Flux-dev": ((16, 56, 56), 10000.0), "Qwen-Image": ((16, 56, 56), 10000.0), "Wan 2.1 1.3B": ((44, 42, 42), 10000.0)}


def block_shapes(cls_name: str, unet_config: dict) -> list:
    """[DiTBlockShape] of every block in forward order, read off the real modules built on the meta device (no
    memory: the full 12-20 B models are measured, not slices)."""
    import torch

    import comfy.model_patcher
    import comfy.supported_models

    from comfyui_freespeed.nodes.sites import block_sites, detect_model, dit_block_shapes
    mc = getattr(comfy.supported_models, cls_name)(dict(unet_config))
    mc.set_inference_dtype(torch.bfloat16, None)
    model = mc.get_model({}, device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    info = detect_model(patcher)
    shapes = dit_block_shapes(patcher, info)
    return [shapes[(b.kind, b.index)] for b in block_sites(patcher, info)]


def _flops(s, n_img, n_txt, joint):
    from comfyui_freespeed.core.pruning import dit_block_flops
    return dit_block_flops(s, n_img, n_txt if joint else 0, 0 if joint else n_txt)


def shares(blocks: list, n_img: int, n_txt: int, joint: bool) -> dict:
    total = attn = txt = 0
    for s in blocks:
        lq = n_img + (n_txt if s.joint else 0)
        total += _flops(s, n_img, n_txt, joint)
        attn += (4 * lq * lq * s.dim if s.joint else 0) + s.image_self * 4 * n_img * n_img * s.dim
        txt += (2 * s.txt * n_txt + 4 * n_txt * lq * s.dim) if (joint and s.joint) else 0   # text rows and queries
    return {"tflops_per_sample": round(total / 1e12, 2), "attention_share": round(attn / total, 3),
            "text_stream_share": round(txt / total, 3)}


def todo_ideal(blocks: list, n_img: int, n_txt: int, joint: bool, factor: float) -> float:
    total = saved = 0
    kept = n_img / factor ** 2
    for s in blocks:
        total += _flops(s, n_img, n_txt, joint)
        lq = n_img + (n_txt if s.joint else 0)
        saved += (4 * lq * (n_img - kept) * s.dim if s.joint else 0) + s.image_self * 4 * n_img * (n_img - kept) * s.dim
    return round(1 / (1 - saved / total), 3)


def atedm_ideal(blocks: list, n_img: int, n_txt: int, joint: bool, ratio=0.7, start=0.25, end=0.75) -> dict:
    """Node defaults without DSAP: blocks [start, end) of the forward order; the first ranks, the rest prune."""
    n = len(blocks)
    s0, e0 = int(round(start * n)), int(round(end * n))
    keep = round(n_img * (1 - ratio))
    full = run = 0
    for i, s in enumerate(blocks):
        f = _flops(s, n_img, n_txt, joint)
        full += f
        run += _flops(s, keep, n_txt, joint) if s0 < i < e0 else f
    return {"flops_saved": round(1 - run / full, 3), "ideal_speedup": round(full / run, 3)}


def rope_retention(dims: tuple, theta: float, factor: int = 2) -> dict:
    """Mean amplitude a rotary pair keeps when ``factor`` neighbouring post-RoPE keys of one axis are averaged
    (|sin(fω/2) / (f sin(ω/2))| over the axis' frequencies; 1 = kept, as nearest does), per spatial axis."""
    out = {}
    for name, d in zip(("t", "h", "w"), dims):
        vals = []
        for i in range(d // 2):
            w = theta ** (-2.0 * i / d)
            vals.append(abs(math.sin(factor * w / 2) / (factor * math.sin(w / 2))) if w > 1e-9 else 1.0)
        out[name] = {"mean": round(sum(vals) / len(vals), 3), "min": round(min(vals), 3),
                     "pairs_below_0.9": sum(v < 0.9 for v in vals)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dit_shares", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    host.setup(device="cpu")
    res = {}
    sizes = {"1024²": 64 * 64, "2048²": 128 * 128}
    video = {"832x480x81": 21 * 30 * 52, "1280x720x81": 21 * 45 * 80}       # Wan: 81 frames -> 21 latent frames
    for name, (cls, cfg, n_txt, joint) in models().items():
        blocks = block_shapes(cls, cfg)
        row = {"blocks": len(blocks)}
        for key, n_img in (video if name.startswith("Wan") else sizes).items():
            big = key in ("2048²", "1280x720x81")
            row[key] = {"image_tokens": n_img, "text_tokens": n_txt, **shares(blocks, n_img, n_txt, joint),
                        "todo_ideal_factor2": todo_ideal(blocks, n_img, n_txt, joint, 2.0),
                        "todo_ideal_band": todo_ideal(blocks, n_img, n_txt, joint, 4.0 if big else 2.0),
                        "atedm_defaults": atedm_ideal(blocks, n_img, n_txt, joint)}
        if name in ROPE:
            row["rope_avg_pool_retention_f2"] = rope_retention(*ROPE[name])
        res[name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    return emit_json(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
