"""Shared helpers for the real-host graph tests (test_graph.py: in-process ``PromptExecutor``;
test_server.py: a headless ``main.py``).

* :func:`write_checkpoint` / :func:`link_checkpoint` -- a tiny SD1.5 checkpoint that ComfyUI's model detection recognises, so
  it loads through ``CheckpointLoaderSimple`` like a real one.  Detection only matches SD15 with
  ``model_channels == 320``, ``context_dim == 768``, conv ``proj_in`` and no ADM; the rest is free.
  The smallest layout that still detects is one level, one res block, a transformer in the input
  block (``context_dim`` is read from it) and in the middle block (20.7 M params, ~41 MB in fp16).
  It has no CLIP and no VAE weights, hence the test conditioning node and ``SaveLatent``.
* :data:`COND_NODE_SOURCE` -- a test-only V3 custom node file emitting random ``[1, 77, 768]``
  conditioning from a seed.  Its ``fingerprint_inputs`` changes on every queue, so the executor
  re-runs it and everything downstream (KSampler, SaveLatent) each time while the MODEL branch
  (CheckpointLoaderSimple -> FreeSpeedToDo) stays cached: exactly a re-queue with a cached
  patched MODEL.
* :func:`build_prompt` -- the API-format graph CheckpointLoaderSimple -> [FreeSpeedToDo] ->
  KSampler -> SaveLatent.
* :func:`read_latent`, :func:`free_port`.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Optional

import torch

CKPT_NAME = "freespeed_tiny_sd15.safetensors"
COND_NODE = "FreeSpeedTestConditioning"
COND_NODE_FILE = "freespeed_test_conditioning.py"
PACK_DIR_NAME = "comfyui-freespeed"
# titles and descriptions of the workflows in the template browser (web/templates.js shows them)
TEMPLATES_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "web", "templates.json")
LATENT_SIZE = 64          # pixels -> 8x8 latent, 64 tokens per self-attention
STEPS = 4

# node ids in build_prompt's graph
CKPT_ID, TODO_ID, POS_ID, NEG_ID, LATENT_ID, SAMPLER_ID, SAVE_ID = "1", "2", "3", "4", "5", "6", "7"

DETECTABLE_SD15 = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "context_dim": 768, "use_linear_in_transformer": False,
    "num_res_blocks": [1], "channel_mult": [1],
    "transformer_depth": [1], "transformer_depth_output": [0, 0], "transformer_depth_middle": 1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

COND_NODE_SOURCE = '''"""Test-only ComfyUI node written by FreeSpeed's host tests: random text conditioning from a seed."""
import itertools

import torch
from typing_extensions import override

from comfy_api.v0_0_2 import ComfyExtension, io

_QUEUED = itertools.count()


class FreeSpeedTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSpeedTestConditioning", display_name="FreeSpeed test conditioning", category="testing",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                    io.Int.Input("dim", default=768, min=1, max=4096)],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def fingerprint_inputs(cls, seed, dim):
        # new on every queue: this node and its consumers re-run, the MODEL branch stays cached
        return next(_QUEUED)

    @classmethod
    def execute(cls, seed, dim):
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(1, 77, dim, generator=g), {}]])


class _Extension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [FreeSpeedTestConditioning]


async def comfy_entrypoint():
    return _Extension()
'''


def write_checkpoint(path: str, seed: int = 0, qk_std: float = 0.2) -> str:
    """Save the detectable tiny SD1.5 UNet (fp16, keys ``model.diffusion_model.*``) to ``path``.

    ``qk_std`` > the default init makes attention maps peaked, so K/V downsampling visibly changes
    the result instead of hiding in near-uniform softmax rows."""
    import comfy.supported_models
    import comfy.utils
    from tiny import init_weights

    cfg = comfy.supported_models.SD15(dict(DETECTABLE_SD15))
    cfg.set_inference_dtype(torch.float16, None)
    model = cfg.get_model({})
    init_weights(model.diffusion_model, seed=seed, qk_std=qk_std)
    model.diffusion_model.half()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    comfy.utils.save_torch_file(model.state_dict_for_saving(), path)
    return path


_SHARED_CHECKPOINT: dict = {}


def link_checkpoint(tmp_path_factory, checkpoints_dir: str) -> str:
    """Put the tiny checkpoint into ``checkpoints_dir`` as a symlink to one copy written once per
    test session (under pytest's base temp dir), so the two host-graph modules share it."""
    base = str(tmp_path_factory.getbasetemp())
    src = _SHARED_CHECKPOINT.get(base)
    if src is None or not os.path.isfile(src):
        src = write_checkpoint(os.path.join(str(tmp_path_factory.mktemp("freespeed_ckpt")), CKPT_NAME))
        _SHARED_CHECKPOINT[base] = src
    os.makedirs(checkpoints_dir, exist_ok=True)
    dst = os.path.join(checkpoints_dir, CKPT_NAME)
    os.symlink(src, dst)
    return dst


def write_cond_node(custom_nodes_dir: str) -> str:
    os.makedirs(custom_nodes_dir, exist_ok=True)
    path = os.path.join(custom_nodes_dir, COND_NODE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(COND_NODE_SOURCE)
    return path


def todo_inputs(factor_level_1: float = 2.0, factor_level_2: float = 1.0, method: str = "nearest",
                start_percent: float = 0.0, end_percent: float = 1.0) -> dict:
    return {"factor_level_1": factor_level_1, "factor_level_2": factor_level_2, "method": method,
            "start_percent": start_percent, "end_percent": end_percent}


def build_prompt(todo: Optional[dict] = None, ckpt_name: str = CKPT_NAME, seed: int = 0, steps: int = STEPS,
                 cfg: float = 5.0, prefix: str = "freespeed_test") -> dict:
    """API-format prompt; ``todo`` = FreeSpeedToDo widget values (None: no ToDo node, the sampler
    takes the checkpoint's MODEL directly)."""
    prompt = {
        CKPT_ID: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        POS_ID: {"class_type": COND_NODE, "inputs": {"seed": 1, "dim": 768}},
        NEG_ID: {"class_type": COND_NODE, "inputs": {"seed": 2, "dim": 768}},
        LATENT_ID: {"class_type": "EmptyLatentImage",
                    "inputs": {"width": LATENT_SIZE, "height": LATENT_SIZE, "batch_size": 1}},
        SAMPLER_ID: {"class_type": "KSampler",
                     "inputs": {"model": [TODO_ID if todo is not None else CKPT_ID, 0], "seed": seed,
                                "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                                "positive": [POS_ID, 0], "negative": [NEG_ID, 0],
                                "latent_image": [LATENT_ID, 0], "denoise": 1.0}},
        SAVE_ID: {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER_ID, 0], "filename_prefix": prefix}},
    }
    if todo is not None:
        prompt[TODO_ID] = {"class_type": "FreeSpeedToDo", "inputs": dict(todo, model=[CKPT_ID, 0])}
    return prompt


def saved_latent_path(output_dir: str, ui_output: dict) -> str:
    """Path of the file SaveLatent reported in its UI output ``{"latents": [{filename, subfolder, type}]}``."""
    (entry,) = ui_output["latents"]
    return os.path.join(output_dir, entry.get("subfolder") or "", entry["filename"])


def read_latent(path: str) -> torch.Tensor:
    """The ``latent_tensor`` SaveLatent wrote (a safetensors file with a ``.latent`` suffix)."""
    import safetensors.torch
    return safetensors.torch.load_file(path, device="cpu")["latent_tensor"]


def template_meta() -> dict:
    """workflow name -> {"title", "description"} (web/templates.json)."""
    with open(TEMPLATES_JSON, encoding="utf-8") as f:
        return json.load(f)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
