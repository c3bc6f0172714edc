"""The benchmark's fixture: a small real SD1.x-family UNet trained here, with real (peaked) attention.

Random weights make attention maps nearly uniform, so reusing, gating or pruning them looks free.
This fixture is a genuine ``comfy.model_base.BaseModel`` (the ``comfy.supported_models.SD15``
config with small sizes: cross-attention, attention at two resolution levels, eps prediction, CFG
capable) trained on procedurally generated latents: one coloured shape on a textured background,
placed and sized the way a short "prompt" says (``"large red disc at left"``).  Prompts are token
sequences embedded by a fixed table (stored with the weights), so samples depend on the prompt and
the attention maps are peaked and change over the steps as in real models.

Everything here is deterministic from a seed.  The latent space is the model's own (4 channels, no
VAE): a "colour" is a direction in the 4 channels, so what a sample shows is read off directly
(:func:`read_latent`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "fixture", "fixture_unet.safetensors")

COLOURS = {"red": (1.0, -0.6, -0.6, 0.4), "green": (-0.6, 1.0, -0.6, 0.4), "blue": (-0.6, -0.6, 1.0, 0.4),
           "yellow": (1.0, 1.0, -0.8, 0.4)}
SHAPES = ("square", "disc", "bar")
POSITIONS = {"left": (0.5, 0.27), "right": (0.5, 0.73), "top": (0.27, 0.5), "bottom": (0.73, 0.5),
             "center": (0.5, 0.5)}
SIZES = {"small": 0.16, "large": 0.28}
BACKGROUND = (-0.3, -0.3, -0.3, -0.8)

SPECIAL = ("<pad>", "<bos>", "<eos>", "at")
VOCAB = SPECIAL + tuple(SIZES) + tuple(COLOURS) + SHAPES + tuple(POSITIONS)
SEQ_LEN = 8
CONTEXT_DIM = 64
LATENT_SIZE = 16             # latent side the fixture is trained at (a "128²" image)

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 16, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False,
    "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2],
    "transformer_depth": [1, 1, 0], "transformer_depth_output": [1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM, "num_heads": 4, "num_head_channels": -1,
}


@dataclass(frozen=True)
class Prompt:
    size: str
    colour: str
    shape: str
    position: str

    @property
    def text(self) -> str:
        return f"{self.size} {self.colour} {self.shape} at {self.position}"

    @staticmethod
    def parse(text: str) -> "Prompt":
        words = text.lower().split()
        pick = {}
        for w in words:
            for key, table in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
                if w in table:
                    pick[key] = w
        missing = [k for k in ("size", "colour", "shape", "position") if k not in pick]
        if missing:
            raise ValueError(f"fixture prompt {text!r} lacks {', '.join(missing)}; e.g. 'large red disc at left'")
        return Prompt(**pick)


def all_prompts() -> list[Prompt]:
    return [Prompt(s, c, sh, p) for s in SIZES for c in COLOURS for sh in SHAPES for p in POSITIONS]


def tokens(text: str) -> torch.Tensor:
    """Token ids (SEQ_LEN,) of a prompt; the empty prompt is ``<bos> <eos>`` (the CFG negative)."""
    ids = [VOCAB.index("<bos>")] + [VOCAB.index(w) for w in text.lower().split() if w in VOCAB][:SEQ_LEN - 2]
    ids.append(VOCAB.index("<eos>"))
    ids += [VOCAB.index("<pad>")] * (SEQ_LEN - len(ids))
    return torch.tensor(ids)


def make_embedding(seed: int = 0) -> torch.Tensor:
    """The fixed token+position embedding table (len(VOCAB) + SEQ_LEN, CONTEXT_DIM)."""
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(len(VOCAB) + SEQ_LEN, CONTEXT_DIM, generator=g)


def encode(texts: Sequence[str], table: torch.Tensor) -> torch.Tensor:
    """(B, SEQ_LEN, CONTEXT_DIM) context for the prompts: token embedding + position embedding."""
    ids = torch.stack([tokens(t) for t in texts])
    return table[ids] + table[len(VOCAB):len(VOCAB) + SEQ_LEN][None]


def render(prompts: Sequence[Prompt], size: int = LATENT_SIZE, generator: Optional[torch.Generator] = None,
           jitter: float = 0.04) -> torch.Tensor:
    """(B, 4, size, size) latents: background texture + the shape the prompt describes."""
    g = generator or torch.Generator().manual_seed(0)
    b = len(prompts)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(b, 4, size, size)
    bg = torch.tensor(BACKGROUND).view(4, 1, 1)
    for i, p in enumerate(prompts):
        # smooth background texture: a few low-frequency waves
        ph = torch.rand(4, generator=g) * 2 * math.pi
        fr = 1 + torch.rand(2, generator=g) * 2
        tex = 0.15 * torch.sin(2 * math.pi * (fr[0] * xx + fr[1] * yy) + ph.view(4, 1, 1))
        cy, cx = POSITIONS[p.position]
        cy = cy + (torch.rand((), generator=g).item() - 0.5) * 2 * jitter
        cx = cx + (torch.rand((), generator=g).item() - 0.5) * 2 * jitter
        r = SIZES[p.size] * (1 + (torch.rand((), generator=g).item() - 0.5) * 0.2)
        if p.shape == "square":
            mask = ((yy - cy).abs() <= r * 0.85) & ((xx - cx).abs() <= r * 0.85)
        elif p.shape == "disc":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        else:                                        # bar: wide and flat
            mask = ((yy - cy).abs() <= r * 0.4) & ((xx - cx).abs() <= r * 1.3)
        col = torch.tensor(COLOURS[p.colour]).view(4, 1, 1)
        out[i] = torch.where(mask[None], col, bg) + tex
    return out


def read_latent(latent: torch.Tensor) -> dict:
    """What a (4, H, W) fixture latent shows: the colour closest to the foreground mean and where it is."""
    bg = torch.tensor(BACKGROUND).view(4, 1, 1)
    dist_bg = (latent - bg).norm(dim=0)
    fg = dist_bg > 0.8 * (torch.tensor(COLOURS["red"]) - torch.tensor(BACKGROUND)).norm() / 2
    if fg.sum() == 0:
        return {"colour": None, "centre": None, "area": 0.0}
    mean = latent[:, fg].mean(dim=1)
    colour = min(COLOURS, key=lambda c: (mean - torch.tensor(COLOURS[c])).norm().item())
    h, w = latent.shape[-2:]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    return {"colour": colour, "centre": (ys.float().mean().item() / (h - 1), xs.float().mean().item() / (w - 1)),
            "area": fg.float().mean().item()}


def model_config():
    """The comfy SD15 model config with the fixture's UNet sizes."""
    import comfy.supported_models
    mc = comfy.supported_models.SD15(dict(UNET_CONFIG))
    mc.set_inference_dtype(torch.float32, None)
    return mc


def build_model(device=None):
    """A fresh (untrained) fixture ``BaseModel``: the SD1.5 UNet class with v-prediction, as the SD2.x
    768-v models (``comfy.model_base.BaseModel`` with ``ModelType.V_PREDICTION``, what
    ``supported_models.SD20.get_model`` builds for a v checkpoint).  v-prediction because an
    ε-predicting model this small cannot get the highest-noise steps right: at σ_max ≈ 14.6 an ε error
    is a σ ≈ 15 times larger x0 error, and the first sampling steps then lock a wrong global colour into
    every sample (what the first ε-trained fixture did, whatever the loss weighting)."""
    import comfy.model_base
    mc = model_config()
    return comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.V_PREDICTION, device=device)


def load(path: str = WEIGHTS, device=None):
    """(ModelPatcher of the trained fixture, embedding table) through the real comfy model classes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fixture weights not found at {path}; train them with `python -m bench.train_fixture`")
    sd = load_file(path)
    table = sd.pop("freespeed.embedding").float()
    model = build_model()
    model.diffusion_model.load_state_dict(
        {k[len("diffusion_model."):]: v.float() for k, v in sd.items() if k.startswith("diffusion_model.")},
        strict=True)
    model.eval()
    dev = device or mm.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=mm.unet_offload_device())
    return patcher, table


def conditioning(text: str, table: torch.Tensor, batch: int = 1) -> list:
    """A ComfyUI conditioning list for a fixture prompt."""
    ctx = encode([text], table).repeat(batch, 1, 1)
    return [[ctx, {}]]


def model_space(patcher, latent: torch.Tensor) -> torch.Tensor:
    """A sampled latent (what KSampler returns: the SD1.5 latent format, /0.18215) in the space the
    fixture was trained in (what :func:`render` draws): ``latent_format.process_in``."""
    return patcher.model.process_latent_in(latent)
