"""Output hashes of every FreeSpeed node at its defaults: run before and after a refactor that must not
change behaviour, and compare (``python tests/host/output_hashes.py > before.json``, refactor, run
again, ``diff``).  Models: the benchmark fixture (the first 4 samples of its bench set), tiny SD1.5 /
SDXL models with peaked attention (20 euler steps, CFG 5) and the tiny DiTs of ``dit_helpers`` (Flux, SD3,
Wan, Qwen-Image, PixArt; 8 steps, CFG 4).  Every technique of ``core.techniques`` at its node's defaults
(plus a few variants and a stack), and the Map Reuse Search node's search (its percents and the sample of
the MODEL it returns).  The hash is SHA-256 of the sampled latent's bytes (float32, CPU), so any change in
any element shows; a node that refuses a model records its error text instead.
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

from comfyui_freespeed.core.schedule import parse_percent_list  # noqa: E402
from comfyui_freespeed.core.techniques import TECHNIQUES as REGISTRY  # noqa: E402
from comfyui_freespeed.nodes import registry  # noqa: E402

STEPS, CFG = 20, 5.0

DIT_STEPS, DIT_CFG = 8, 4.0


def _apply(key, **settings):
    return lambda m: registry.apply(key, m, registry.config(key, **settings))


TECHNIQUES = {"baseline": lambda m: m.clone()}
TECHNIQUES.update({t.key: _apply(t.key) for t in REGISTRY})        # every node at its defaults
TECHNIQUES.update({
    "tgate_self_attention": _apply("tgate", self_attention=True),
    "stacked": lambda m: registry.apply("encprop", registry.apply("tgate", registry.apply("todo", m))),
})


def search_module():
    """The module of the Map Reuse Search node (found through the registry, wherever it lives)."""
    cls = next(c for c in registry.node_classes() if c.__name__ == "MapReuseSearchNode")
    return sys.modules[cls.__module__]


def search_run(model, sample_fn) -> str:
    """The search at budget 2 from the node's default layer settings: its percents and the sample of the
    MODEL the node returns."""
    mod = search_module()
    base = registry.config("mapreuse", schedule="off")
    res = mod.search(model, sample_fn, 2, base)
    percents = tuple(parse_percent_list(res["percents"]))
    m = registry.apply("mapreuse", model, registry.config("mapreuse", schedule="custom", percents=percents))
    return f"{res['percents']}|{digest(sample_fn(m))}"


def guarded(fn) -> str:
    try:
        return fn()
    except Exception as e:            # a node refusing a model: its message is part of its behaviour
        return f"error {type(e).__name__}: {e}"


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def tiny_runs(name: str, tiny) -> dict:
    out = {}
    for tech, apply in TECHNIQUES.items():
        out[tech] = guarded(lambda: digest(sample(apply(tiny.model), tiny, steps=STEPS, cfg=CFG, seed=3, batch=2)))
    out["mapreuse_search"] = guarded(lambda: search_run(
        tiny.model, lambda m: sample(m, tiny, steps=6, cfg=CFG, seed=3, batch=1)))
    return out


def dit_runs(family: str) -> dict:
    import dit_helpers
    model = dit_helpers.tiny(family).model
    out = {}
    for tech, apply in TECHNIQUES.items():
        out[tech] = guarded(lambda: digest(dit_helpers.run(apply(model), family, steps=DIT_STEPS, cfg=DIT_CFG,
                                                            seed=3)))
    out["mapreuse_search"] = guarded(lambda: search_run(
        model, lambda m: dit_helpers.run(m, family, steps=6, cfg=DIT_CFG, seed=3)))
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
    for family in ("flux", "sd3", "wan", "qwen", "pixart"):
        doc[family] = dit_runs(family)
    try:
        doc["fixture"] = fixture_runs()
    except (ImportError, FileNotFoundError) as e:      # the fixture moved or is not trained
        doc["fixture"] = {"error": str(e)}
    print(json.dumps(doc, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
