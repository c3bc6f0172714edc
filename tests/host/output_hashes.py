"""Output hashes of every FreeSpeed node at its defaults: run before and after a refactor that must not
change behaviour, and compare (``python tests/host/output_hashes.py > before.json``, refactor, run
again, ``diff``).  Models: the benchmark fixture (the first 4 samples of its bench set) and tiny SD1.5 /
SDXL models with peaked attention; 20 euler steps, CFG 5.  The hash is SHA-256 of the sampled
latent's bytes (float32, CPU), so any change in any element shows.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bench import host  # noqa: E402

host.setup(device="cpu")

import torch  # noqa: E402

import comfy.sample  # noqa: E402

from tiny import sample, tiny_sd15, tiny_sdxl  # noqa: E402

from comfyui_freespeed.nodes.atedm import ATEDMConfig, apply_atedm  # noqa: E402
from comfyui_freespeed.nodes.encoder_propagation import EncoderPropagationConfig, apply_encoder_propagation  # noqa: E402
from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, apply_mapreuse  # noqa: E402
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate  # noqa: E402
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo  # noqa: E402

STEPS, CFG = 20, 5.0

TECHNIQUES = {
    "baseline": lambda m: m.clone(),
    "todo": lambda m: apply_todo(m, ToDoConfig()),
    "tgate": lambda m: apply_tgate(m, TGateConfig()),
    "tgate_self_attention": lambda m: apply_tgate(m, TGateConfig(self_attention=True)),
    "encoder_propagation": lambda m: apply_encoder_propagation(m, EncoderPropagationConfig()),
    "mapreuse": lambda m: apply_mapreuse(m, MapReuseConfig()),
    "atedm": lambda m: apply_atedm(m, ATEDMConfig()),
    "stacked": lambda m: apply_encoder_propagation(apply_tgate(apply_todo(m, ToDoConfig()), TGateConfig()),
                                                   EncoderPropagationConfig()),
}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def tiny_runs(name: str, tiny) -> dict:
    out = {}
    for tech, apply in TECHNIQUES.items():
        m = apply(tiny.model)
        out[tech] = digest(sample(m, tiny, steps=STEPS, cfg=CFG, seed=3, batch=2))
    return out


def fixture_runs() -> dict:
    """The default fixture (``bench/fixtures``): the first 4 samples of its bench set."""
    from bench.fixtures.families import load_fixture
    fx = load_fixture("fixture", device="cpu")
    prompts, seeds = fx.bench_set()
    prompts, seeds = prompts[:4], seeds[:4]
    pos, neg, lat, noise = fx.conditioning(prompts), fx.negative(len(prompts)), fx.empty_latent(len(prompts)), fx.noise(seeds)
    out = {}
    for tech, apply in TECHNIQUES.items():
        m = apply(fx.patcher)
        with torch.inference_mode():
            res = comfy.sample.sample(m, noise, STEPS, CFG, "euler", "normal", pos, neg, lat, seed=0,
                                      disable_pbar=True)
        out[tech] = digest(res)
    return out


def main() -> int:
    doc = {"sd15": tiny_runs("sd15", tiny_sd15(qk_std=0.3)), "sdxl": tiny_runs("sdxl", tiny_sdxl(qk_std=0.3))}
    try:
        doc["fixture"] = fixture_runs()
    except (ImportError, FileNotFoundError) as e:      # the fixture moved or is not trained
        doc["fixture"] = {"error": str(e)}
    print(json.dumps(doc, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
