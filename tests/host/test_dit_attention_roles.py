"""The role of a DiT attention call (self, cross, joint) comes from the module that called the kernel, never from
token counts (issue 21, defect 2).  Wan's text is padded to >= 512 tokens, so an image with as many tokens as the
text is an ordinary case: there, cross-attention's text keys must stay whole (ToDo) and self- and cross-attention
outputs must be kept apart (Map Reuse).  PixArt's modules are patched one by one (their path is the role)."""
from __future__ import annotations

import torch

from dit_helpers import KernelSpy, sigmas, step_of, tiny
from tiny import sample, tiny_sd3_deep

from comfyui_freespeed.nodes.hooks import find
from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, apply_mapreuse
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

TOKENS = 16                     # text tokens == image tokens: one 8x8 latent frame, patch 2x2 -> 4x4 tokens
STEPS = 6                       # Map Reuse late from 50%: step 2 keeps, steps 3-5 reuse


def wan_equal(model, steps: int, **kw):
    t = tiny("wan")
    return sample(model, t, 8, 8, steps=steps, frames=1, positive=t.cond(1, tokens=TOKENS),
                  negative=t.cond(2, tokens=TOKENS), **kw)


def module_outputs(dm, name: str):
    """Forward hooks recording ``blocks.i.<name>`` outputs in call order -> (records, handles)."""
    rec = []
    hs = [getattr(b, name).register_forward_hook(lambda mod, inp, out, i=i: rec.append((i, out.detach().clone())))
          for i, b in enumerate(dm.blocks)]
    return rec, hs


def test_wan_todo_keeps_every_text_key_when_image_tokens_equal_text_tokens():
    t = tiny("wan")
    n_blocks = len(t.model.model.diffusion_model.blocks)
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    out = wan_equal(m, 2)
    assert torch.isfinite(out).all()
    # per block: self-attention (16 image keys -> 2x2 = 4), then cross-attention (all 16 text keys)
    assert [c["n_k"] for c in inner.calls] == [4, TOKENS] * (2 * n_blocks)
    assert [c["role"] for c in inner.calls] == ["self", "cross"] * (2 * n_blocks)
    s = find(m, "freespeed.todo").last_stats
    assert s["downsampled_calls"] == 2 * n_blocks and s["kv_tokens"] == {"image": "16->4"}


def test_wan_map_reuse_keeps_self_and_cross_attention_apart_when_token_counts_are_equal():
    t = tiny("wan")
    dm = t.model.model.diffusion_model
    sig = sigmas("wan", STEPS)
    m = apply_mapreuse(t.model, MapReuseConfig(start=0.5, map_dtype="fp32", dit_refresh_every=0))
    selfs, hs = module_outputs(dm, "self_attn")
    cross, hc = module_outputs(dm, "cross_attn")
    try:
        wan_equal(m, STEPS, cfg=4.0)
    finally:
        for h in hs + hc:
            h.remove()
    n = len(dm.blocks)
    assert len(selfs) == len(cross) == STEPS * n
    for rec in (selfs, cross):          # the o-projection of the kept kernel output: the keep step's output
        for step in (3, 4, 5):
            for i in range(n):
                assert torch.equal(rec[step * n + i][1], rec[2 * n + i][1])
    s = find(m, "freespeed.mapreuse").last_stats
    assert s["reuse_steps"] == [3, 4, 5] and s["reuse_calls"] == 3 * 2 * n


def test_wan_map_reuse_cross_attention_only_reuses_just_the_cross_attention():
    t = tiny("wan")
    n = len(t.model.model.diffusion_model.blocks)
    spy = KernelSpy()
    m = apply_mapreuse(spy.install(t.model), MapReuseConfig(start=0.5, map_dtype="fp32", self_attention=False, dit_refresh_every=0))
    wan_equal(m, STEPS, cfg=4.0)
    sig = sigmas("wan", STEPS)
    late = [c["role"] for c in spy.calls if step_of(c["sigma"], sig) >= 3]
    assert late == ["self"] * (3 * n)           # every self-attention kernel runs, no cross-attention kernel
    assert find(m, "freespeed.mapreuse").last_stats["reuse_calls"] == 3 * n


def test_pixart_map_reuse_keeps_self_and_cross_attention_apart_when_token_counts_are_equal():
    t = tiny("pixart")
    dm = t.model.model.diffusion_model
    m = apply_mapreuse(t.model, MapReuseConfig(start=0.5, map_dtype="fp32", dit_refresh_every=0))
    selfs, hs = module_outputs(dm, "attn")
    cross, hc = module_outputs(dm, "cross_attn")
    try:                                        # 34x34 latent, patch 2 -> 289 image tokens; 289 text tokens
        sample(m, t, 34, 34, steps=STEPS, cfg=4.0, positive=t.cond(1, tokens=289), negative=t.cond(2, tokens=289))
    finally:
        for h in hs + hc:
            h.remove()
    n = len(dm.blocks)
    for rec in (selfs, cross):
        for step in (3, 4, 5):
            for i in range(n):
                assert torch.equal(rec[step * n + i][1], rec[2 * n + i][1])
    assert not torch.equal(selfs[3 * n][1], cross[3 * n][1])


def test_sd35_dual_blocks_name_the_joint_then_the_image_only_attention_and_todo_and_map_reuse_follow():
    """SD3.5's dual blocks make two kernel calls, the joint attention then an image-only self-attention: the block
    names them in that order (any token counts), ToDo downsamples the image keys of both, Map Reuse keeps both."""
    t = tiny_sd3_deep(dual=(0, 1))
    inner = KernelSpy()
    m = apply_todo(inner.install(t.model), ToDoConfig(dit_blocks_from=0.0, factors=(2.0, 1.0)))
    outer = KernelSpy()
    sample(outer.install(m), t, 16, 16, steps=1)
    # blocks 0 and 1 dual, block 2 joint only
    assert [c["role"] for c in outer.calls] == ["joint", "self", "joint", "self", "joint"]
    txt = outer.calls[0]["layout"].txt
    assert [c["n_k"] for c in inner.calls] == [txt + 16, 16, txt + 16, 16, txt + 16]   # 8x8 image tokens -> 4x4
    spy = KernelSpy()
    mr = apply_mapreuse(spy.install(t.model), MapReuseConfig(start=0.5, map_dtype="fp32", dit_refresh_every=0))
    sample(mr, t, 16, 16, steps=STEPS, cfg=4.0)
    s = find(mr, "freespeed.mapreuse").last_stats
    assert s["reuse_calls"] == 3 * 5 and s["keep_calls"] == 5
