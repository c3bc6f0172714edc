"""The site layer (nodes/sites.py) on tiny real models: discovery, the foreign-patch rule, the chained
attention override and chained DiT block replaces."""
from __future__ import annotations

import torch

from tiny import sample, tiny_flux, tiny_pixart, tiny_sd3

from comfyui_freespeed.nodes.sites import (add_attention_override, add_block_replace, attention_sites, block_sites,
                                           detect_model, forward_is_patched, patch_forward, transformer_stacks)


def test_unet_attention_sites_cover_every_transformer_block(sd15, sdxl):
    for t in (sd15, sdxl):
        info = detect_model(t.model)
        dm = t.model.model.diffusion_model
        blocks = [n for n, m in dm.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
        sites = attention_sites(t.model, info)
        assert sorted(s.path for s in sites if s.kind == "self") == sorted(f"{b}.attn1" for b in blocks)
        assert sorted(s.path for s in sites if s.kind == "cross") == sorted(f"{b}.attn2" for b in blocks)
        assert {s.level for s in sites} == set(range(1, len(info.attention_levels) + 1))
        for s in sites:
            assert info.attention_level(s.block) == s.level and len(s.key) == 3
    # SDXL has no attention at its first resolution level: its attention level 1 is resolution level 2
    info = detect_model(sdxl.model)
    assert info.family == "sdxl" and info.attention_levels[0] == 2
    stacks = transformer_stacks(sdxl.model, info, (1, 2))
    assert stacks and all(s.level == info.attention_levels[s.att_level - 1] for s in stacks)


def test_dit_families_and_their_blocks():
    flux, sd3, pixart = tiny_flux(), tiny_sd3(), tiny_pixart()
    fi, si, pi = (detect_model(t.model) for t in (flux, sd3, pixart))
    assert (fi.family, si.family, pi.family) == ("flux", "sd3", "pixart")
    fb = block_sites(flux.model, fi)
    dm = flux.model.model.diffusion_model
    assert [b.replace_key for b in fb] == ([("double_block", i) for i in range(len(dm.double_blocks))]
                                           + [("single_block", i) for i in range(len(dm.single_blocks))])
    assert [b.kind for b in block_sites(sd3.model, si)] == ["joint"] * len(sd3.model.model.diffusion_model.joint_blocks)
    pb = block_sites(pixart.model, pi)
    assert pb and all(b.replace_key is None for b in pb)
    # PixArt's attention modules are the T-GATE sites (its attention gets no transformer_options)
    assert {s.kind for s in attention_sites(pixart.model, pi)} == {"self", "cross"}


def test_patch_forward_chains_and_the_foreign_rule(sd15):
    m = sd15.model.clone()
    path = next(s.path for s in attention_sites(m, detect_model(m)) if s.kind == "cross")
    module = m.model.diffusion_model.get_submodule(path)
    assert not forward_is_patched(m.get_model_object(f"diffusion_model.{path}.forward"), module)
    seen = []

    def first(orig):
        def fwd(x, *a, **k):
            seen.append("first")
            return orig(x, *a, **k)
        return fwd

    def second(orig):
        def fwd(x, *a, **k):
            seen.append("second")
            return orig(x, *a, **k)
        return fwd

    assert patch_forward(m, path, first)
    assert forward_is_patched(m.get_model_object(f"diffusion_model.{path}.forward"), module)
    assert not patch_forward(m, path, second, leave_patched=True)     # left to the node that patched it
    assert patch_forward(m, path, second)                              # or wrapped: both run, outer first
    sample(m, sd15, steps=1)
    assert seen[:2] == ["second", "first"]


def test_attention_override_is_chained_to_an_existing_one(sd15):
    m = sd15.model.clone()
    theirs, ours = [], []

    def sage_like(func, *args, **kwargs):          # e.g. a SageAttention patch set before our node
        theirs.append(args[0].shape)
        return func(*args, **kwargs)

    m.model_options["transformer_options"]["optimized_attention_override"] = sage_like

    def mine(call_next, func, *args, **kwargs):
        ours.append(args[0].shape)
        return call_next(func, *args, **kwargs)

    add_attention_override(m, mine)
    out = sample(m, sd15, steps=2)
    assert ours and ours == theirs                  # every call went through ours, then theirs
    assert torch.equal(out, sample(sd15.model, sd15, steps=2))


def test_block_replace_is_chained_to_an_existing_one():
    flux = tiny_flux()
    m = flux.model.clone()
    site = block_sites(m, detect_model(m))[0]
    order = []

    def theirs(args, extra):
        order.append("theirs")
        return extra["original_block"](args)

    def mine(args, extra):
        order.append("mine")
        return extra["original_block"](args)

    m.set_model_patch_replace(theirs, "dit", *site.replace_key)
    add_block_replace(m, site, mine)
    out = sample(m, flux, steps=1)
    assert order[:2] == ["mine", "theirs"]
    assert torch.equal(out, sample(flux.model, flux, steps=1))
