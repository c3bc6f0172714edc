"""The compatibility-matrix harness: FreeSpeed nodes next to ComfyUI's own nodes on tiny real models.

* every FreeSpeed node in two settings: ``late`` (acts only in the second half of denoising, so the first
  steps must be bit-identical to the run without it) and ``off`` (its own "off" setting: with a partner it
  must give exactly the partner's own output);
* partners are applied through ComfyUI's nodes (V3 ``execute`` classmethods, V1 ``FUNCTION`` methods) or
  ``comfy.*`` functions, never copies of their code;
* :func:`check_works` is the one definition of a "works" cell, :class:`Recorder` collects each cell's
  classification for ``compat_report``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

if "nodes" not in sys.modules:
    # as test_graph.py: main.py imports the host's ``utils`` package before nodes.py puts comfy on sys.path
    import utils.install_util  # noqa: F401

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import nodes as comfy_nodes

import compat_report as report
from tiny import Tiny

from comfyui_freespeed.core.techniques import BY_KEY
from comfyui_freespeed.nodes import registry
from comfyui_freespeed.nodes.hooks import find

comfy.utils.PROGRESS_BAR_ENABLED = False        # no tqdm bars from the V1 sampler nodes

STEPS = 5
H = W = 16
CFG = 5.0
PREFIX = 0.3          # steps before this percent of denoising: a "late" node must leave them bit-identical
SHARE = 2.0           # the partner's effect with FreeSpeed, projected on its effect without: within [1/2, 2]x

NODES = tuple(k for k, _ in report.NODES)

# acts from 50% of denoising on; everything before is the unpatched computation
LATE = {
    "todo": dict(factors=(2.0, 2.0), start_percent=0.5),
    "tgate": dict(gate=0.5, dit_gate=0.5),
    "encprop": dict(schedule="custom", key_percents=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), noise_injection=0.003,
                    injection_start=0.5, max_parallel=2, dit_every=0),   # DiTs: the warm-up to 50% is a no-op here
    "mapreuse": dict(schedule="late", start=0.6, map_dtype="fp32", dit_refresh_every=0),   # keeps its maps at 50%, reuses after
    "atedm": dict(ratio=0.5, dsap_end=0.5, early_scale=0.0),
}
# each node's own "off" setting (documented as exactly the unpatched model)
OFF = {
    "todo": dict(factors=(1.0, 1.0)),
    "tgate": dict(gate=1.0, dit_gate=1.0),
    "encprop": dict(schedule="every_k", every_k=1, noise_injection=0.0),
    "mapreuse": dict(schedule="off"),
    "atedm": dict(ratio=0.0),
}


def activity(node: str, s: dict) -> int:
    """What the node's last run says it did (0 = it did nothing)."""
    if node == "todo":
        return s.get("downsampled_calls", 0)
    if node == "tgate":
        return s.get("attn2_calls_skipped", 0) + s.get("uncond_evaluations_skipped", 0) + s.get("text_tokens_frozen", 0)
    if node == "encprop":
        return s.get("decoder_only_steps", 0)
    if node == "mapreuse":
        return s.get("reuse_calls", 0)
    if node == "atedm":
        return s.get("stack_calls_pruned", 0)
    raise KeyError(node)


def label(node: str) -> str:
    return BY_KEY[node].label


def fs(node: str, model, mode: str = "late", **override):
    settings = dict(LATE[node] if mode == "late" else OFF[node])
    settings.update(override)
    return registry.apply(node, model, registry.config(node, **settings))


def technique(model, node: str):
    t = find(model, BY_KEY[node].wrapper_key)
    assert t is not None, f"{node} is not installed"
    return t


def stats(model, node: str) -> dict:
    return technique(model, node).last_stats


# ------------------------------------------------------------------------------------------------
# sampling with a per-step trace
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    out: torch.Tensor
    trace: list = field(default_factory=list)        # (sigma, denoised) per sampler step

    def prefix(self, ms, before: float = PREFIX) -> list:
        """The denoised predictions of the steps before ``before`` percent of denoising (``ms``: model_sampling)."""
        cut = float(ms.percent_to_sigma(before))
        return [d for s, d in self.trace if s > cut * (1 + 1e-4)]


STEP_HOOKS: list = []      # called after every sampler step (compile_counter marks steps with it)


def _tracer(trace: list, sigmas: Optional[torch.Tensor]):
    def cb(i, denoised, x, total):
        sig = float(sigmas[i]) if sigmas is not None and i < len(sigmas) else float("nan")
        trace.append((sig, denoised.detach().clone()))
        for hook in STEP_HOOKS:
            hook(i)
    return cb


def ksampler(model, tiny: Tiny, steps: int = STEPS, cfg: float = CFG, sampler: str = "euler", scheduler: str = "normal",
             denoise: float = 1.0, latent=None, positive=None, negative=None, noise_mask=None, seed: int = 0,
             h: int = H, w: int = W) -> Result:
    """What KSampler runs (``comfy.sample.sample``), with the denoised prediction of every step recorded."""
    latent = tiny.latent(h, w) if latent is None else latent
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler, scheduler=scheduler,
                                 denoise=denoise, model_options=model.model_options)
    trace: list = []
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler,
                                  tiny.cond(1) if positive is None else positive,
                                  tiny.cond(2) if negative is None else negative, latent, denoise=denoise,
                                  noise_mask=noise_mask, callback=_tracer(trace, ks.sigmas), disable_pbar=True, seed=seed)
    return Result(out, trace)


def custom(model, tiny: Tiny, sigmas: torch.Tensor, sampler_name: str = "euler", cfg: float = CFG, latent=None,
           guider=None, seed: int = 0) -> Result:
    """``comfy.sample.sample_custom`` (what SamplerCustom runs) on given sigmas, or ``guider.sample`` (what
    SamplerCustomAdvanced runs) when a guider is given."""
    from comfy_extras.nodes_custom_sampler import KSamplerSelect
    sampler = KSamplerSelect().get_sampler(sampler_name)[0]
    latent = tiny.latent(H, W) if latent is None else latent
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    trace: list = []
    with torch.inference_mode():
        if guider is None:
            out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, tiny.cond(1), tiny.cond(2), latent,
                                             callback=_tracer(trace, sigmas), disable_pbar=True, seed=seed)
        else:
            out = guider.sample(noise, latent, sampler, sigmas, callback=_tracer(trace, sigmas), disable_pbar=True,
                                seed=seed)
    return Result(out, trace)


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------
def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def norm(a: torch.Tensor) -> float:
    return float(a.double().norm())


def same(a: Result, b: Result) -> bool:
    return torch.equal(a.out, b.out)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for float32 rounding (a KSamplerAdvanced split recomputes the sigmas of its second segment)."""
    return bool((a - b).abs().max() <= 1e-6 * b.abs().max())


def assert_same_direction(with_fs: torch.Tensor, without: torch.Tensor, what: str) -> dict:
    """``with_fs`` (an effect measured with FreeSpeed on) keeps the effect ``without``: its component along
    ``without`` is 1/SHARE..SHARE times ``without`` (what FreeSpeed's own approximation adds on top, e.g. other
    tokens pruned, is orthogonal to it and not held against the partner)."""
    w = without.flatten().double()
    share = float(with_fs.flatten().double() @ w / max(float(w @ w), 1e-24))
    assert 1 / SHARE < share < SHARE, f"{what}: {share:.3f} of the partner's own effect (cos {cos(with_fs, without):.3f})"
    return {"share": round(share, 3), "cos": round(cos(with_fs, without), 3)}


# ------------------------------------------------------------------------------------------------
# the "works" definition
# ------------------------------------------------------------------------------------------------
Apply = Callable[[object], object]          # MODEL -> MODEL


@dataclass
class Cell:
    """Everything a "works" check needs for one FreeSpeed node and one partner.  The partner is a model patch
    (``partner``), or part of the route (``run_partner``: conditioning such as a ControlNet, a guider), or
    absent (the column is a sampler route; then only FreeSpeed's own checks apply)."""
    node: str
    base: object                                      # the unpatched MODEL
    run: Callable[[object], Result]                   # how this column samples a MODEL (without the partner)
    partner: Optional[Apply] = None                   # a model patch
    run_partner: Optional[Callable[[object], Result]] = None   # the route with the partner in it
    orders: tuple = ("before", "after")               # where a model-patch partner sits relative to FreeSpeed
    ms: object = None                                 # model_sampling placing the prefix (default: the route's)
    prefix: bool = True                               # check bit-identical steps before PREFIX
    direction: bool = True                            # check the partner's effect keeps its direction and size
    fs_kwargs: dict = field(default_factory=dict)

    @property
    def has_partner(self) -> bool:
        return self.partner is not None or self.run_partner is not None

    def fs(self, model, mode: str):
        return fs(self.node, model, mode, **self.fs_kwargs)

    def build(self, order: str, mode: str):
        if self.partner is None:
            return self.fs(self.base, mode)
        if order == "before":
            return self.fs(self.partner(self.base), mode)
        return self.partner(self.fs(self.base, mode))

    def sample(self, model, with_partner: bool) -> Result:
        return self.run_partner(model) if (with_partner and self.run_partner is not None) else self.run(model)

    def orders_run(self) -> tuple:
        return self.orders if self.partner is not None else ("only",)


class Memo:
    """Runs shared by the cells of one column (plain, partner alone, FreeSpeed alone)."""

    def __init__(self):
        self.values: dict = {}

    def get(self, key, make):
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]

    def clear(self):
        self.values.clear()


MEMO = Memo()


def check_works(cell: Cell, memo_key: Optional[tuple] = None, route_key: Optional[tuple] = None) -> dict:
    """Assert that ``cell`` works; returns what was measured.

    * FreeSpeed "off" + partner == the partner alone, exactly (every order);
    * FreeSpeed + partner: finite, FreeSpeed acted (its run stats), the output differs from the partner alone,
      and every step before PREFIX is bit-identical to the partner alone (it acts only where it should);
    * the partner still acts: partner alone != plain, and (partner+FreeSpeed) - (FreeSpeed alone) points
      the way (partner alone) - (plain) does, by a comparable amount.
    """
    def memo(k, f):                   # runs of this column
        return MEMO.get((memo_key, k), f) if memo_key is not None else f()

    def route_memo(k, f):             # runs without the partner: shared by the columns with the same route
        return MEMO.get((route_key, k), f) if route_key is not None else memo(k, f)

    plain = route_memo(("plain",), lambda: cell.run(cell.base))
    with_p = cell.has_partner
    partner = memo(("partner",), lambda: cell.sample(cell.partner(cell.base) if cell.partner else cell.base, True)) \
        if with_p else plain
    alone, alone_stats = route_memo(("alone", cell.node, repr(sorted(cell.fs_kwargs.items()))), lambda: _alone(cell))
    ms = cell.ms if cell.ms is not None else cell.base.get_model_object("model_sampling")
    measured = {"alone_stats": alone_stats}
    if with_p:
        assert not same(partner, plain), "the partner has no effect on this model: the cell would prove nothing"
    for order in cell.orders_run():
        off = cell.sample(cell.build(order, "off"), True)
        assert same(off, partner), f"{order}: {label(cell.node)} off + partner differs from the partner alone"
        m = cell.build(order, "late")
        got = cell.sample(m, True)
        assert torch.isfinite(got.out).all(), f"{order}: non-finite output"
        s = dict(stats(m, cell.node))
        measured.setdefault("stats", {})[order] = s
        act = activity(cell.node, s)
        assert act > 0, f"{order}: {label(cell.node)} did nothing: {s}"
        assert not same(got, partner), f"{order}: {label(cell.node)} changed nothing"
        if cell.prefix:
            a, b = got.prefix(ms), partner.prefix(ms)
            assert a and len(a) == len(b), f"{order}: no steps before {PREFIX:.0%} to compare"
            for i, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y), f"{order}: step {i} (before {label(cell.node)} acts) differs"
        if with_p and cell.direction:
            measured.setdefault("share", {})[order] = assert_same_direction(got.out - alone.out, partner.out - plain.out,
                                                    f"{order}: the partner's effect with {label(cell.node)}")
    return measured


def _alone(cell: Cell) -> tuple:
    """The node alone on the column's route: (result, its run stats)."""
    m = cell.fs(cell.base, "late")
    return cell.run(m), dict(stats(m, cell.node))


# what a node's stats say it left to a partner: (stats field, phrase about the partner); a note lists the ones
# that are higher with the partner than without it
ASIDE = {
    "todo": (("untouched_attn1_replaced", "K/V stay full in the blocks whose self-attention {o} replaces"),
             ("untouched_non_grid", "K/V {o} already changed are left alone")),
    "tgate": (("attn2_replace_calls_dropped_after_gate", "{os} attn2 patches are frozen at the gate with the text"),
              ("attn2_calls_computed_no_cache", "cross-attention is computed where no cache exists")),
    "encprop": (("controlnet_skipped_evaluations", "{o} runs at key steps only (decoder-only steps reuse its "
                                                   "residuals)"),
                ("full_uncaptured_calls", "{os} extra passes run the whole UNet")),
    "mapreuse": (("original_calls_batch_mismatch", "layers whose queries {o} regroups (tiles) run normally"),
                 ("layers_left_to_other_node", "layers {o} patched are left to {o}"),
                 ("reuse_fallback_token_mismatch", "layers whose K/V length {o} changed after the keep step run "
                                                   "normally")),
    "atedm": (("stack_calls_left_no_map", "stacks whose pruning-layer self-attention {o} replaces or changes run "
                                          "unpruned"),
              ("stack_calls_left_kv_changed", "stacks whose pruning-layer self-attention {o} replaces or changes run "
                                              "unpruned"),
              ("stack_calls_left_foreign_attn1", "stacks whose later self-attention {o} patched run unpruned")),
}


def aside_note(node: str, with_partner: dict, alone: dict, other: str = "it") -> str:
    """What ``node`` left to ``other`` in this cell (from its run stats), as a short note."""
    out = []
    for field_name, phrase in ASIDE.get(node, ()):
        text = phrase.format(o=other, os="its" if other == "it" else f"{other}'s")
        if (with_partner.get(field_name) or 0) > (alone.get(field_name) or 0) and text not in out:
            out.append(text)
    return "; ".join(out)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list = []

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def warnings_logged():
    h = LogCapture()
    root = logging.getLogger()
    root.addHandler(h)
    try:
        yield h
    finally:
        root.removeHandler(h)


def assert_clear_refusal(message: str, node: str, partner_names: tuple) -> None:
    """A refusal names the FreeSpeed node and the other node, and says why."""
    assert label(node).split()[-1] in message or BY_KEY[node].name in message, message
    assert any(p.lower() in message.lower() for p in partner_names), message
    assert len(message.split()) >= 8, f"a refusal must say why: {message!r}"


# ------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------
class Recorder:
    """The cells classified in this session; merged into compat_results.json when the module ends."""

    def __init__(self):
        self.cells: dict = {}

    def works(self, node: str, column: str, note: str = "") -> None:
        self.cells[report.cell_key(node, column)] = {"status": report.WORKS, "note": note}

    def refused(self, node: str, column: str, note: str) -> None:
        self.cells[report.cell_key(node, column)] = {"status": report.REFUSED, "note": note}

    def wrong(self, node: str, column: str, note: str) -> None:
        self.cells[report.cell_key(node, column)] = {"status": report.WRONG, "note": note}

    @contextlib.contextmanager
    def cell(self, node: str, column: str):
        """Run one cell's test; an assertion failing inside records the cell as wrong (and fails the test)."""
        try:
            yield
        except Exception as e:        # noqa: BLE001  (any failure is a wrong cell)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.wrong(node, column, f"{type(e).__name__}: {first}"[:200])
            raise

    def flush(self) -> None:
        if not self.cells:
            return
        cells = report.load()
        cells.update(self.cells)
        report.save(cells)


RECORDER = Recorder()


# ------------------------------------------------------------------------------------------------
# model lifecycle
# ------------------------------------------------------------------------------------------------
def unload_all() -> None:
    """Unload every model (object patches and lowvram state go with it): isolates a column from the next."""
    mm.unload_all_models()
    mm.cleanup_models_gc() if hasattr(mm, "cleanup_models_gc") else None


__all__ = [n for n in dir() if not n.startswith("_")]


# ------------------------------------------------------------------------------------------------
# partners: ComfyUI's own nodes
# ------------------------------------------------------------------------------------------------
def write_lora(model, folder: str, name: str, seed: int = 11, rank: int = 4, scale: float = 0.25) -> str:
    """A tiny LoRA (generic ``<key>.lora_up/lora_down/alpha`` format) over every attention projection and
    feed-forward linear of ``model``'s diffusion model, written to ``folder/name``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in model.model.state_dict().items():
        if not k.startswith("diffusion_model.") or not k.endswith(".weight") or p.ndim != 2:
            continue
        if not any(s in k for s in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.", ".ff.net.", ".proj_in.", ".proj_out.",
                                    ".qkv.", ".proj.", ".linear1.", ".linear2.", ".img_attn.", ".txt_attn.")):
            continue
        base = k[:-len(".weight")]
        out_dim, in_dim = p.shape
        sd[f"{base}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * scale
        sd[f"{base}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * scale / math.sqrt(in_dim) * 4
        sd[f"{base}.alpha"] = torch.tensor(float(rank))
    assert sd, "no LoRA target found"
    os.makedirs(folder, exist_ok=True)
    comfy.utils.save_torch_file(sd, os.path.join(folder, name))
    return name


def lora(model, name: str, strength: float = 1.0):
    """``LoraLoaderModelOnly`` (V1: its FUNCTION method; a new instance, as the executor makes)."""
    return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


class IPAdapterLike:
    """An IP-Adapter-style ``attn2`` replace patch: text attention plus attention to fixed image tokens (projected
    once per width), as IP-Adapter adds ``scale * attention(q, k_img, v_img)``."""

    def __init__(self, scale: float = 0.8, tokens: int = 4, seed: int = 21):
        self.scale, self.tokens, self.seed = scale, tokens, seed
        self.kv: dict = {}
        self.calls = 0

    def _kv(self, dim: int, like: torch.Tensor):
        if dim not in self.kv:
            g = torch.Generator().manual_seed(self.seed + dim)
            self.kv[dim] = (torch.randn(1, self.tokens, dim, generator=g), torch.randn(1, self.tokens, dim, generator=g))
        k, v = self.kv[dim]
        return k.to(like).expand(like.shape[0], -1, -1), v.to(like).expand(like.shape[0], -1, -1)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        self.calls += 1
        heads = extra_options["n_heads"]
        ki, vi = self._kv(q.shape[-1], q)
        return optimized_attention(q, k, v, heads) + self.scale * optimized_attention(q, ki, vi, heads)

    def apply(self, model):
        from comfyui_freespeed.nodes.sites import attention_sites, detect_model
        m = model.clone()
        for s in attention_sites(model, detect_model(model)):
            if s.kind == "cross":
                m.set_model_attn2_replace(self, s.key[0], s.key[1], s.key[2])
        return m


def tiny_controlnet(tiny: Tiny, seed: int = 5):
    """A tiny in-process ControlNet with the UNet's own config (non-zero "zero convs": residuals that matter)."""
    import comfy.controlnet
    from comfy.cldm.cldm import ControlNet as ControlNetModel
    from tiny import init_weights
    cfg = dict(tiny.model.model.model_config.unet_config)
    cfg.pop("out_channels", None)
    cfg.update(hint_channels=3, device="cpu", dtype=torch.float32)
    cm = ControlNetModel(**cfg)
    init_weights(cm, seed=seed)
    return comfy.controlnet.ControlNet(cm, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def apply_controlnet(cn, positive, negative, h: int = H, w: int = W, strength: float = 1.0):
    """``ControlNetApplyAdvanced`` (V1 FUNCTION) with a fixed hint image."""
    hint = torch.rand(1, h * 8, w * 8, 3, generator=torch.Generator().manual_seed(3))
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cn, hint, strength, 0.0, 1.0)


def v3(node_cls, *args, **kwargs):
    """Output 0 of a V3 node's ``execute``."""
    out = node_cls.execute(*args, **kwargs)
    return (out.result if hasattr(out, "result") else out)[0]


def sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return v3(SelfAttentionGuidance, model, 0.5, 2.0)


def pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return v3(PerturbedAttentionGuidance, model, 3.0)


def rescale_cfg(model):
    from comfy_extras.nodes_model_advanced import RescaleCFG
    return RescaleCFG().patch(model, 0.7)[0]


def cfg_norm(model):
    from comfy_extras.nodes_cfg import CFGNorm
    return v3(CFGNorm, model, 0.9)


def apg(model):
    from comfy_extras.nodes_apg import APG
    return v3(APG, model, 0.0, 1.0, 0.0)


def tcfg(model):
    from comfy_extras.nodes_tcfg import TCFG
    return v3(TCFG, model)


def freeu_v2(model):
    from comfy_extras.nodes_freelunch import FreeU_V2
    return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def tome(model):
    from comfy_extras.nodes_tomesd import TomePatchModel
    return v3(TomePatchModel, model, 0.5)


def hypertile(model, max_depth: int = 0):
    from comfy_extras.nodes_hypertile import HyperTile
    # tile 32 px = 4 latent px; swap_size 1: one divisor, no random pick (reproducible runs)
    return v3(HyperTile, model, 32, 1, max_depth, False)


def easycache(model, threshold: float = 0.3, start: float = 0.0, end: float = 1.0):
    """EasyCache skipping one of the 6 steps of the tiny models (its default 0.2 skips none there)."""
    from comfy_extras.nodes_easycache import EasyCacheNode
    return v3(EasyCacheNode, model, threshold, start, end, False)


def lazycache(model, threshold: float = 0.2, start: float = 0.0, end: float = 0.7):
    """LazyCache skipping two of the 6 steps, before the last ones (where it would leave nothing to evaluate)."""
    from comfy_extras.nodes_easycache import LazyCacheNode
    return v3(LazyCacheNode, model, threshold, start, end, False)


def diff_diffusion(model):
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    return v3(DifferentialDiffusion, model, 1.0)


def vpred_zsnr(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    return ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]


def ays_sigmas(model_type: str, steps: int = STEPS, denoise: float = 1.0) -> torch.Tensor:
    from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
    return v3(AlignYourStepsScheduler, model_type, steps, denoise)


def basic_sigmas(model, steps: int = STEPS, scheduler: str = "normal") -> torch.Tensor:
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    return BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]


def cfg_guider(model, tiny: Tiny, cfg: float = CFG):
    from comfy_extras.nodes_custom_sampler import CFGGuider
    return CFGGuider().get_guider(model, tiny.cond(1), tiny.cond(2), cfg)[0]


def perpneg_guider(model, tiny: Tiny, cfg: float = CFG, neg_scale: float = 1.0):
    from comfy_extras.nodes_perpneg import PerpNegGuider
    return v3(PerpNegGuider, model, tiny.cond(1), tiny.cond(2), tiny.cond(3), cfg, neg_scale)


def image_latent(tiny: Tiny, h: int = H, w: int = W, seed: int = 7) -> torch.Tensor:
    """A stand-in for a VAE-encoded image (img2img, inpainting)."""
    return torch.randn(1, tiny.latent_channels, h, w, generator=torch.Generator().manual_seed(seed)) * 0.8


def inpaint_mask(h: int = H, w: int = W) -> torch.Tensor:
    """A soft inpaint mask (a horizontal ramp), as Differential Diffusion expects."""
    return torch.linspace(0, 1, w).expand(1, 1, h, w).contiguous()


# ------------------------------------------------------------------------------------------------
# torch.compile: TorchCompileModel's wrapper with a counting eager backend, on the smallest model
# ------------------------------------------------------------------------------------------------
COMPILE_STEPS = 3
# 3 steps (at 0, 50 and 100% of denoising): each node does the same thing at steps 1 and 2 (ToDo, AT-EDM; T-GATE
# after caching at step 0; Map Reuse after keeping its maps at step 0; Encoder Propagation decodes each of them
# from step 0's features), so a graph compiled at step 2 is a recompile for the same work
COMPILE_FS = {"encprop": dict(key_percents=(0.0,), max_parallel=1), "atedm": dict(levels=(1,)),
              "mapreuse": dict(start=0.5)}


@contextlib.contextmanager
def sdpa_attention():
    """ComfyUI's SDPA attention (``--use-pytorch-cross-attention``, what GPUs run) instead of the CPU default
    sub-quadratic kernel, whose free-memory query (psutil reads /proc) breaks the graph in every attention call."""
    import comfy.ldm.modules.attention as attention
    saved = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention = saved


def smallest_sd15(seed: int = 0) -> Tiny:
    """A one-level SD1.5 UNet (attention at its only level, in the input, middle and output blocks)."""
    import comfy.supported_models
    from tiny import init_weights, patcher, tiny_unet_config
    cfg = dict(tiny_unet_config("sd15"), channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
               transformer_depth_output=[1, 1], transformer_depth_middle=1)
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed=seed, qk_std=0.3)
    return Tiny("sd15", patcher(model), 64, 4)


class CompileCounter:
    """Counts the graphs dynamo compiles (per sampler step) and the graph-break reasons it records."""

    def __init__(self):
        self.graphs = 0
        self.taken = 0
        self.per_step: list = []
        self.breaks: list = []

    def backend(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward                    # run the captured graph eagerly: what is compiled, not how fast

    def step(self, i: int) -> None:
        self.per_step.append(self.graphs)

    def take(self) -> int:
        n, self.taken = self.graphs - self.taken, self.graphs
        return n


@contextlib.contextmanager
def compile_counter():
    import torch._dynamo
    from torch._dynamo.utils import counters
    cc = CompileCounter()
    cfg = torch._dynamo.config
    saved = (cfg.recompile_limit, cfg.accumulated_recompile_limit)
    cfg.recompile_limit, cfg.accumulated_recompile_limit = 64, 100000     # count recompiles, never fall back
    before = set(counters["graph_break"])
    STEP_HOOKS.append(cc.step)
    try:
        yield cc
    finally:
        STEP_HOOKS.remove(cc.step)
        cc.breaks = sorted(set(counters["graph_break"]) - before)
        cfg.recompile_limit, cfg.accumulated_recompile_limit = saved


def torch_compiled(model, cc: CompileCounter):
    """What TorchCompileModel does (``set_torch_compile_wrapper`` on a clone), with the counting backend."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    m = model.clone()
    set_torch_compile_wrapper(model=m, backend=cc.backend)
    return m


def compile_note(per_step: list, requeue: int, reasons: list) -> str:
    """What compiling did, in words.  ``per_step``: graphs compiled so far after each step of the first run; a new
    graph at the last step, which does what the step before did, means dynamo specialised on the node's per-step
    state (a recompile every step); on a re-queue the graphs are either reused or compiled again."""
    every_step = len(per_step) > 2 and per_step[-1] > per_step[-2]
    parts = ["acts as uncompiled"]
    if every_step:
        parts.append("recompiles at every step (" + ("and again at every step of every run" if requeue else
                                                      "first run only; a re-queue reuses the graphs") + ")")
    elif requeue:
        parts.append("recompiles on every re-queue")
    else:
        parts.append("no recompiles")
    parts.append("graph breaks: " + ", ".join(str(r).splitlines()[0][:80] for r in reasons) if reasons
                 else "no graph breaks")
    return "; ".join(parts)
