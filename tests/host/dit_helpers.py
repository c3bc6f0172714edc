"""Shared pieces of the DiT host tests (tests/host/test_dit_*.py): one tiny model per family (built once per
process), sampling with the family's conditioning, and spies on the attention kernel and on blocks.

A *kernel spy* is an attention override installed on a clone *before* a technique: the technique's override
is chained in front of it, so the spy only sees the kernel calls that really run (a reused attention output or
a stripped text stream never reaches it).  Each record holds the call's sigma, block (when a FreeSpeed node
tagged it), the q/k token counts and the layout FreeSpeed put in ``transformer_options``.
"""
from __future__ import annotations

import functools

import torch

import comfy.samplers

from tiny import (sample, tiny_chroma, tiny_flux_deep, tiny_pixart_peaked, tiny_qwen, tiny_sd3_deep,  # noqa: F401
                  tiny_wan)

from comfyui_freespeed.nodes.dit import BLOCK_KEY, LAYOUT_KEY, parse_attention, role_of
from comfyui_freespeed.nodes.sites import add_attention_override

BUILDERS = {"flux": tiny_flux_deep, "sd3": tiny_sd3_deep, "wan": tiny_wan, "qwen": tiny_qwen,
            "pixart": tiny_pixart_peaked, "chroma": tiny_chroma}
SIZES = {"pixart": (48, 48)}           # PixArt needs (H + W) / 2 > 32
FAMILIES = ("flux", "sd3", "wan", "qwen", "pixart")
OVERRIDE_FAMILIES = ("flux", "sd3", "wan", "qwen")      # the attention override reaches their kernels


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    return BUILDERS[family]()


def run(model, family: str, steps: int = 4, cfg: float = 4.0, **kw):
    """Sample a (patched) clone of the family's tiny model with its default size and conditioning."""
    t = tiny(family)
    h, w = SIZES.get(family, (16, 16))
    kw.setdefault("h", h)
    kw.setdefault("w", w)
    if family == "pixart":
        kw.setdefault("positive", t.cond(1, tokens=16))
        kw.setdefault("negative", t.cond(2, tokens=16))
    return sample(model, t, steps=steps, cfg=cfg, **kw)


def sigmas(family: str, steps: int, scheduler: str = "normal") -> list[float]:
    ms = tiny(family).model.get_model_object("model_sampling")
    return [float(s) for s in comfy.samplers.calculate_sigmas(ms, scheduler, steps)]


def step_of(sigma: float, sig: list[float]) -> int:
    return min(range(len(sig) - 1), key=lambda i: abs(sig[i] - sigma))


class KernelSpy:
    """Records every attention kernel call that reaches it (install before the technique)."""

    def __init__(self):
        self.calls = []

    def install(self, model):
        m = model.clone()
        add_attention_override(m, self._override)
        return m

    def _override(self, call_next, func, *args, **kwargs):
        a = parse_attention(args, kwargs)
        if a is not None:
            to = a.transformer_options
            sig = to.get("sigmas")
            self.calls.append({"sigma": float(sig.max()) if torch.is_tensor(sig) else None, "block": to.get(BLOCK_KEY),
                               "n_q": a.n_q, "n_k": a.n_k, "layout": to.get(LAYOUT_KEY), "batch": int(a.q.shape[0]),
                               "k": a.k, "q": a.q, "heads": a.heads, "skip": a.skip_reshape,
                               "role": role_of(a), "branches": tuple(to.get("cond_or_uncond") or ())})
        return call_next(func, *args, **kwargs)


def count_calls(module: torch.nn.Module, names: tuple) -> dict:
    """Forward hooks counting calls of every submodule whose name ends with one of ``names`` -> {name: [n]}."""
    counts = {}
    for name, m in module.named_modules():
        if name.endswith(names):
            counts[name] = [0]
            m.register_forward_hook(lambda mod, inp, out, c=counts[name]: c.__setitem__(0, c[0] + 1))
    return counts


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))
