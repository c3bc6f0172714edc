"""The compatibility matrix (issue 17), DiT part: the FreeSpeed nodes that accept DiTs next to LoRA, a Flux
ControlNet, Kontext reference latents, Redux image tokens, the Flux/SD3 sampling shift, Wan image-to-video and
EasyCache, on tiny real Flux / SD3 / Wan 2.1 models with peaked attention (``tiny.py``).

Same classification as ``test_compat_matrix.py`` (``compat_harness.check_works``).  A node that refuses a DiT
family at the time the test runs must do so with an error naming the model class and why: that cell is recorded
as a clear refusal (the DiT support is being extended; the test follows what the node does).
"""
from __future__ import annotations

import types

import pytest
import torch

import nodes as comfy_nodes

import compat_harness as H
import compat_report as R
from tiny import Tiny, init_weights, patcher, peak_dit_attention, tiny_flux_deep, tiny_sd3_deep

from comfyui_freespeed.nodes.sites import UnsupportedModelError

NODES = H.NODES
CFG = 4.0


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    H.RECORDER.flush()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_deep()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_deep()


def run_on(tiny: Tiny, **kw):
    return lambda m: H.ksampler(m, tiny, cfg=CFG, **kw)


def refused(node: str, model) -> str | None:
    """The node's error for this model family, or None when it accepts it."""
    try:
        H.fs(node, model)
    except UnsupportedModelError as e:
        msg = str(e)
        assert H.BY_KEY[node].name in msg and "is not supported" in msg and "comfy.model_base." in msg, msg
        return msg
    return None


def classify(node: str, column: str, cells: list) -> None:
    """Record the cell: a clear refusal when the node refuses the model, else every check must pass."""
    with H.RECORDER.cell(node, column):
        for cell, key in cells:
            why = refused(node, cell.base)
            if why is not None:
                H.RECORDER.refused(node, column, why.split(". ", 1)[-1].split(" Supported:")[0])
                return
        notes = []
        for cell, key in cells:
            m = H.check_works(cell, memo_key=key, route_key=key[:1] + ("route",) + key[2:])
            for s in (m.get("stats") or {}).values():
                n = H.aside_note(node, s, m["alone_stats"])
                if n and n not in notes:
                    notes.append(n)
        H.RECORDER.works(node, column, "; ".join(notes))


# ------------------------------------------------------------------------------------------------
# partners
# ------------------------------------------------------------------------------------------------
def flux_controlnet(tiny: Tiny, seed: int = 7):
    """A tiny in-process Flux ControlNet (XLabs layout: hint image through its conv stem, one double block)."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management as mm
    import comfy.ops
    cfg = dict(tiny.model.model.model_config.unet_config)
    for k in ("image_model", "dtype", "device", "operations"):
        cfg.pop(k, None)
    cfg.update(depth=1, depth_single_blocks=0)          # XLabs-like: residuals for the first double block only
    cm = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                                  **cfg)
    init_weights(cm, seed=seed)
    return comfy.controlnet.ControlNet(cm, load_device=mm.get_torch_device(), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


def reference_latent(cond, tiny: Tiny, seed: int = 9):
    """``ReferenceLatent`` (Flux Kontext): a reference image latent appended to the conditioning."""
    from comfy_extras.nodes_edit_model import ReferenceLatent
    ref = torch.randn(1, tiny.latent_channels, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8
    return H.v3(ReferenceLatent, cond, {"samples": ref})


def redux(cond, seed: int = 13):
    """``StyleModelApply`` with a tiny Redux encoder: image tokens appended to the text tokens."""
    from comfy.ldm.flux.redux import ReduxImageEncoder
    import comfy.sd
    enc = ReduxImageEncoder(redux_dim=32, txt_in_features=64)
    init_weights(enc, seed=seed)
    style = comfy.sd.StyleModel(enc)
    vision = types.SimpleNamespace(last_hidden_state=torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(seed)))
    return comfy_nodes.StyleModelApply().apply_stylemodel(cond, style, vision, 1.0, "multiply")[0]


def flux_shift(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    return ModelSamplingFlux().patch(model, 1.15, 0.5, 128, 128)[0]


def sd3_shift(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    return ModelSamplingSD3().patch(model, 6.0)[0]          # SD3's own default is 3


class StubVAE:
    """Stands in for the Wan VAE in ``WanImageToVideo``: pixels [T, H, W, 3] -> a latent [1, 16, (T-1)//4+1, H/8,
    W/8] that depends on the image (8x8 pooled colours through a fixed projection)."""

    def __init__(self, seed: int = 17):
        self.proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed))

    def encode(self, pixels):
        x = pixels.movedim(-1, 1).float()                                   # [T, 3, H, W]
        x = torch.nn.functional.avg_pool2d(x, 8)                            # [T, 3, h, w]
        frames = [x[0]] + [x[i:i + 4].mean(0) for i in range(1, x.shape[0], 4)]
        z = torch.stack(frames, 1)                                          # [3, t, h, w]
        return torch.einsum("oc,cthw->othw", self.proj, z).unsqueeze(0)


def tiny_wan_i2v(seed: int = 0) -> Tiny:
    """Wan 2.1 image-to-video (in_dim 36: noise + mask + image latent) with peaked attention."""
    import comfy.supported_models
    cfg = {"image_model": "wan2.1", "model_type": "i2v", "dim": 64, "out_dim": 16, "num_heads": 4, "ffn_dim": 128,
           "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
           "cross_attn_norm": True, "eps": 1e-6, "in_dim": 36, "text_dim": 64}
    mc = comfy.supported_models.WAN21_I2V(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed)
    peak_dit_attention(model.diffusion_model)
    t = Tiny("wan", patcher(model), 64, 16)
    t.frames = 2
    return t


def wan_i2v_runs(tiny: Tiny):
    """``WanImageToVideo`` without and with a start image (what the image adds is the partner's effect)."""
    from comfy_extras.nodes_wan import WanImageToVideo
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(19))

    def route(start_image):
        out = WanImageToVideo.execute(tiny.cond(1), tiny.cond(2), StubVAE(), 128, 128, 5, 1, start_image=start_image)
        pos, neg, latent = out.result if hasattr(out, "result") else out
        return lambda m: H.ksampler(m, tiny, cfg=CFG, latent=latent["samples"], positive=pos, negative=neg)
    return route(None), route(image)


# ------------------------------------------------------------------------------------------------
# the cells
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", NODES)
def test_dit_lora(node, flux, loras):
    name = H.write_lora(flux.model, loras, "freespeed_compat_flux.safetensors")
    classify(node, "dit_lora", [(H.Cell(node, flux.model, run_on(flux), partner=lambda m: H.lora(m, name)),
                                 ("flux", "lora"))])


@pytest.mark.parametrize("node", NODES)
def test_dit_controlnet(node, flux):
    cn = flux_controlnet(flux)

    def with_cn(m):
        pos, neg = H.apply_controlnet(cn, flux.cond(1), flux.cond(2))
        return H.ksampler(m, flux, cfg=CFG, positive=pos, negative=neg)
    cell = H.Cell(node, flux.model, run_on(flux), run_partner=with_cn)
    if node != "atedm":
        classify(node, "dit_controlnet", [(cell, ("flux", "controlnet"))])
        return
    # a Flux ControlNet's residuals go to every double block (ComfyUI repeats them over the model's 19): AT-EDM's
    # default range starts among them, so it stands aside with one warning; a range past them prunes
    with H.RECORDER.cell(node, "dit_controlnet"):
        m = H.fs(node, flux.model)
        with H.warnings_logged() as log:
            got = with_cn(m)
        msgs = [x for x in log.messages() if "AT-EDM" in x]
        assert len(msgs) == 1, log.messages()
        H.assert_clear_refusal(msgs[0], node, ("ControlNet",))
        assert H.activity(node, H.stats(m, node)) == 0 and H.same(got, with_cn(flux.model))
        H.check_works(H.Cell(node, flux.model, run_on(flux), run_partner=with_cn, fs_kwargs=dict(dit_start=0.4,
                                                                                                  dit_end=1.0)),
                      memo_key=("flux", "controlnet"), route_key=("flux", "route"))
        H.RECORDER.refused(node, "dit_controlnet", "a Flux ControlNet adds residuals to every double block, where "
                           "AT-EDM's default block range starts: it leaves such calls unpruned with one warning; with "
                           "dit_range_start past the double blocks it prunes and works")


@pytest.mark.parametrize("node", NODES)
def test_dit_kontext(node, flux):
    def with_ref(m):
        return H.ksampler(m, flux, cfg=CFG, positive=reference_latent(flux.cond(1), flux),
                          negative=reference_latent(flux.cond(2), flux))
    classify(node, "dit_kontext", [(H.Cell(node, flux.model, run_on(flux), run_partner=with_ref),
                                    ("flux", "kontext"))])


@pytest.mark.parametrize("node", NODES)
def test_dit_redux(node, flux):
    def with_redux(m):
        return H.ksampler(m, flux, cfg=CFG, positive=redux(flux.cond(1)), negative=flux.cond(2))
    classify(node, "dit_redux", [(H.Cell(node, flux.model, run_on(flux), run_partner=with_redux),
                                  ("flux", "redux"))])


@pytest.mark.parametrize("node", NODES)
def test_dit_shift(node, flux, sd3):
    classify(node, "dit_shift", [
        (H.Cell(node, flux.model, run_on(flux), partner=flux_shift,
                ms=flux_shift(flux.model).get_model_object("model_sampling")), ("flux", "shift")),
        (H.Cell(node, sd3.model, run_on(sd3), partner=sd3_shift,
                ms=sd3_shift(sd3.model).get_model_object("model_sampling")), ("sd3", "shift"))])


@pytest.fixture(scope="module")
def wan_i2v():
    return tiny_wan_i2v()


@pytest.mark.parametrize("node", NODES)
def test_dit_wan_i2v(node, wan_i2v):
    plain, with_image = wan_i2v_runs(wan_i2v)
    classify(node, "dit_wan_i2v", [(H.Cell(node, wan_i2v.model, plain, run_partner=with_image), ("wan", "i2v"))])


@pytest.mark.parametrize("node", NODES)
def test_dit_easycache(node, flux):
    # EasyCache until 60% (it skips one step there): the late steps where the node acts are still evaluated
    classify(node, "dit_easycache", [(H.Cell(node, flux.model, run_on(flux), partner=lambda m: H.easycache(m, 0.3, 0.0,
                                                                                                          0.6)),
                                      ("flux", "easycache"))])


def test_dit_columns_are_all_here():
    """Every DiT column of the README matrix has a test in this module."""
    dit = [c for c, _, _ in R.COLUMNS if c.startswith("dit_")]
    assert sorted(dit) == sorted(n[len("test_"):] for n in globals() if n.startswith("test_dit_")
                                 and n != "test_dit_columns_are_all_here")
