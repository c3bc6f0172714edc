"""T-GATE on real ComfyUI: tiny real SD1.5/SDXL/PixArt models sampled through comfy.sample.

Counting is done from the outside, independently of the node's own stats: forward hooks on every
cross-attention's projections (to_q/to_k/to_v/to_out) and on the attention module itself, an
``optimized_attention_override`` spy for the attention kernel, and APPLY_MODEL / CALC_COND_BATCH
wrappers registered by the test that record which branches each model call carried.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import comfy.controlnet
import comfy.patcher_extension as pe
import comfy.supported_models
from comfy.ldm.modules.attention import optimized_attention

from tiny import sample, technique_of, tiny_lumina2, tiny_pixart

from comfyui_freespeed.nodes.hooks import LAST_STATS
from comfyui_freespeed.nodes.sites import UnsupportedModelError, attention_sites, detect_model
from comfyui_freespeed.nodes.tgate import TGateConfig, TGateNode, apply_tgate
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

STEPS = 10          # "normal" scheduler: step i at i/9 of denoising -> gate 40%: steps 0-3 before, 4-9 after
GATE = 0.4


def technique(model):
    return technique_of(model, "freespeed.tgate")


def gate_sigma(model, gate=GATE):
    return float(model.get_model_object("model_sampling").percent_to_sigma(gate))


def after(sigma, gs):
    return sigma <= gs * (1 + 1e-4)


class Recorder:
    """What happened inside a sampling run, seen from outside the node."""

    def __init__(self, model):
        self.model = model
        self.calls = []            # (sigma, cond_or_uncond, batch) per APPLY_MODEL call
        self.cond_lists = []       # (sigma, number of cond lists, None entries) per calc_cond_batch
        self.proj = []             # (path, sigma) per projection call of a cross-attention
        self.kernel = []           # sigma per cross-attention kernel call (k has text tokens)
        self.out = []              # (path, sigma, cond_or_uncond, output) per cross-attention module call
        self.cur = None

    def apply_model(self, executor, x, t, *args, **kwargs):
        to = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})   # passed positionally
        prev, self.cur = self.cur, (float(t.max()), tuple(to.get("cond_or_uncond", ())))
        self.calls.append((self.cur[0], self.cur[1], x.shape[0]))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.cur = prev

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        self.cond_lists.append((float(timestep.max()), len(conds), sum(c is None for c in conds)))
        return executor(model, conds, x_in, timestep, model_options)

    def override(self, func, q, k, v, heads, *args, **kwargs):
        if k.shape[1] != q.shape[1]:
            self.kernel.append(float(kwargs["transformer_options"]["sigmas"].max()))
        return func(q, k, v, heads, *args, **kwargs)


@contextlib.contextmanager
def recording(model, text_tokens_differ=True):
    """(clone of model with recording wrappers, Recorder); module hooks are removed on exit."""
    m = model.clone()
    rec = Recorder(m)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.rec", rec.apply_model)
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test.rec", rec.calc_cond_batch)
    m.model_options["transformer_options"]["optimized_attention_override"] = rec.override
    dm = m.model.diffusion_model
    handles = []
    for s in (s for s in attention_sites(m, detect_model(m)) if s.kind == "cross"):
        mod = dm.get_submodule(s.path)

        def on_out(module, args, out, path=s.path):
            rec.out.append((path, rec.cur[0], rec.cur[1], out.detach().clone()))
        handles.append(mod.register_forward_hook(on_out))
        projs = ["to_q", "to_k", "to_v", "to_out"] if hasattr(mod, "to_q") else ["q_linear", "kv_linear", "proj"]
        for p in projs:
            def on_proj(module, args, out, path=s.path):
                rec.proj.append((path, rec.cur[0]))
            handles.append(getattr(mod, p).register_forward_hook(on_proj))
    try:
        yield m, rec
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# exactness with savings off
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_gate_100_reproduces_unpatched_exactly(which, request):
    t = request.getfixturevalue(which)
    base = sample(t.model, t, steps=STEPS)
    for cfg in (TGateConfig(gate=1.0), TGateConfig(gate=1.0, keep_cfg=True),
                TGateConfig(gate=1.0, self_attention=True, sa_warmup=0, sa_interval=2)):
        m = apply_tgate(t.model, cfg)
        assert torch.equal(sample(m, t, steps=STEPS), base), cfg
        s = technique(m).last_stats
        assert s["steps_after_gate"] == 0 and s["attn2_calls_skipped"] == 0 and s["uncond_evaluations_skipped"] == 0
    for sampler in ("heun", "dpm_2"):
        ref = sample(t.model, t, steps=4, sampler=sampler)
        assert torch.equal(sample(apply_tgate(t.model, TGateConfig(gate=1.0)), t, steps=4, sampler=sampler), ref)


# ------------------------------------------------------------------------------------------------
# after the gate: no cross-attention work, no uncond branch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_after_gate_no_cross_attention_and_no_uncond(which, request):
    t = request.getfixturevalue(which)
    base = sample(t.model, t, steps=STEPS)
    tg = apply_tgate(t.model, TGateConfig(gate=GATE))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        out = sample(m, t, steps=STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    n_sites = len({p for p, *_ in rec.out})
    pre = [c for c in rec.calls if not after(c[0], gs)]
    post = [c for c in rec.calls if after(c[0], gs)]
    assert len(pre) == 4 and len(post) == 6
    # before the gate: the standard batched [cond, uncond] call, cross-attention computed
    assert all(sorted(c[1]) == [0, 1] and c[2] == 2 for c in pre)
    # after the gate: only the cond branch is evaluated ...
    assert all(c[1] == (0,) and c[2] == 1 for c in post)
    assert all(n_none == 1 for s, n, n_none in rec.cond_lists if after(s, gs))
    # ... and cross-attention does no work at all: no projection, no attention kernel
    assert not [p for p in rec.proj if after(p[1], gs)]
    assert not [k for k in rec.kernel if after(k, gs)]
    assert len(rec.kernel) == 4 * n_sites and len(rec.proj) == 4 * 4 * n_sites
    s = technique(tg).last_stats
    assert (s["steps_before_gate"], s["steps_after_gate"], s["cache_step"]) == (4, 6, 3)
    assert s["attn2_calls_skipped"] == 6 * n_sites and s["attn2_calls_computed"] == 4 * n_sites
    assert s["uncond_evaluations_skipped"] == 6 and s["uncond_evaluations"] == 4


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_cached_value_is_mean_of_cond_and_uncond_halves(which, request):
    t = request.getfixturevalue(which)
    tg = apply_tgate(t.model, TGateConfig(gate=GATE))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        sample(m, t, steps=STEPS)
    cache_sigma = min(s for _, s, _, _ in rec.out if not after(s, gs))
    paths = {p for p, *_ in rec.out}
    for path in paths:
        at_cache = [(lay, o) for p, s, lay, o in rec.out if p == path and s == cache_sigma]
        assert len(at_cache) == 1
        lay, o = at_cache[0]
        c, u = o.chunk(2)[lay.index(0)], o.chunk(2)[lay.index(1)]
        reused = [o for p, s, _, o in rec.out if p == path and after(s, gs)]
        assert len(reused) == 6
        for r in reused:
            assert torch.allclose(r, (c + u) / 2, atol=1e-6, rtol=0)
            assert not torch.allclose(r, c, atol=1e-4)


def test_cond_and_uncond_in_separate_calls_cache_the_same_mean(sd15):
    """Text embeddings of 77 and 78 tokens cannot be batched: cond and uncond run in separate calls."""
    pos, neg = sd15.cond(1, tokens=77), sd15.cond(2, tokens=78)
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        out = sample(m, sd15, steps=STEPS, positive=pos, negative=neg)
    assert torch.isfinite(out).all()
    pre = [c for c in rec.calls if not after(c[0], gs)]
    assert len(pre) == 8 and all(len(c[1]) == 1 for c in pre)       # two calls per pre-gate step
    cache_sigma = min(c[0] for c in pre)
    for path in {p for p, *_ in rec.out}:
        halves = {lay[0]: o for p, s, lay, o in rec.out if p == path and s == cache_sigma}
        assert set(halves) == {0, 1}
        for r in (o for p, s, _, o in rec.out if p == path and after(s, gs)):
            assert torch.allclose(r, (halves[0] + halves[1]) / 2, atol=1e-6, rtol=0)
    assert technique(tg).last_stats["uncond_evaluations_skipped"] == 6


def test_cfg_one_caches_the_cond_branch(sd15):
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        sample(m, sd15, steps=STEPS, cfg=1.0)
    assert all(c[1] == (0,) for c in rec.calls)
    cache_sigma = min(s for _, s, _, _ in rec.out if not after(s, gs))
    for path in {p for p, *_ in rec.out}:
        c = [o for p, s, _, o in rec.out if p == path and s == cache_sigma][0]
        assert all(torch.equal(o, c) for p, s, _, o in rec.out if p == path and after(s, gs))
    s = technique(tg).last_stats
    assert s["uncond_evaluations_skipped"] == 0 and s["attn2_calls_skipped"] > 0


def test_keep_cfg_keeps_uncond_evaluations(sd15):
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE, keep_cfg=True))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        sample(m, sd15, steps=STEPS)
    post = [c for c in rec.calls if after(c[0], gs)]
    assert len(post) == 6 and all(sorted(c[1]) == [0, 1] and c[2] == 2 for c in post)
    assert not [p for p in rec.proj if after(p[1], gs)]               # cross-attention still skipped
    s = technique(tg).last_stats
    assert s["uncond_evaluations_skipped"] == 0 and s["uncond_evaluations"] == 10 and s["keep_cfg"] is True


# ------------------------------------------------------------------------------------------------
# per-run state, partial schedules, multi-evaluation samplers
# ------------------------------------------------------------------------------------------------
def test_two_runs_with_different_step_counts_each_reset(sd15):
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    tech = technique(tg)
    sample(tg, sd15, steps=STEPS)
    first = dict(tech.last_stats)
    out8 = sample(tg, sd15, steps=8)
    second = dict(tech.last_stats)
    assert first["steps"] == 10 and second["steps"] == 8
    # 8 steps: step i at i/7 -> steps 0-2 before 40%, 3-7 after
    assert (second["steps_before_gate"], second["steps_after_gate"], second["cache_step"]) == (3, 5, 2)
    assert second["uncond_evaluations_skipped"] == 5 and second["evaluations"] == 8
    fresh = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    assert torch.equal(sample(fresh, sd15, steps=8), out8)
    assert tech.run is None and tech.runs == 2


def test_denoise_below_one_starting_past_the_gate(sd15):
    """denoise 0.5: the run starts at ~50%, after a 40% gate: its first evaluation computes (with CFG)
    and caches, every later one reuses."""
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with recording(tg) as (m, rec):
        out = sample(m, sd15, steps=STEPS, denoise=0.5, latent=latent)
    assert torch.isfinite(out).all()
    assert sorted(rec.calls[0][1]) == [0, 1] and all(c[1] == (0,) for c in rec.calls[1:])
    first = rec.calls[0][0]
    assert {p[1] for p in rec.proj} == {first}
    s = technique(tg).last_stats
    assert s["steps_before_gate"] == 0 and s["cache_step"] is None
    assert s["uncond_evaluations"] == 1 and s["uncond_evaluations_skipped"] == STEPS - 1
    # denoise 0.8 starts before the gate: the normal path, on the run's own (tail) schedule
    out = sample(tg, sd15, steps=STEPS, denoise=0.8, latent=latent)
    s = technique(tg).last_stats
    assert torch.isfinite(out).all() and s["steps_before_gate"] > 0 and s["uncond_evaluations_skipped"] > 0


def test_ksampler_advanced_start_step_and_gate_zero(sd15):
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    out = sample(tg, sd15, steps=STEPS, start_step=6, last_step=10)
    s = technique(tg).last_stats
    assert torch.isfinite(out).all() and s["steps_before_gate"] == 0 and s["uncond_evaluations"] == 1
    z = apply_tgate(sd15.model, TGateConfig(gate=0.0))
    sample(z, sd15, steps=STEPS)
    s = technique(z).last_stats
    assert s["steps_after_gate"] == STEPS and s["uncond_evaluations"] == 1


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_multi_evaluation_samplers(sd15, sampler):
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        out = sample(m, sd15, steps=STEPS, sampler=sampler)
    assert torch.isfinite(out).all()
    assert not [p for p in rec.proj if after(p[1], gs)]
    post = [c for c in rec.calls if after(c[0], gs)]
    assert post and all(c[1] == (0,) for c in post)
    s = technique(tg).last_stats
    assert s["evaluations"] > STEPS and s["attn2_calls_skipped"] > 0
    if sampler == "dpm_2":
        assert s["extra_evaluations"] > 0


# ------------------------------------------------------------------------------------------------
# compatibility
# ------------------------------------------------------------------------------------------------
def _sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]


def _pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, 3.0).result[0]


@pytest.mark.parametrize("extra", ["sag", "pag"])
@pytest.mark.parametrize("order", ["tgate_first", "tgate_last"])
def test_sag_and_pag_extra_passes_are_left_alone(sd15, extra, order):
    add = {"sag": _sag, "pag": _pag}[extra]
    tg_cfg = TGateConfig(gate=GATE)
    m = add(apply_tgate(sd15.model, tg_cfg)) if order == "tgate_first" else apply_tgate(add(sd15.model), tg_cfg)
    gs = gate_sigma(m)
    with recording(m) as (mm, rec):
        out = sample(mm, sd15, steps=STEPS)
    assert torch.isfinite(out).all()
    # the extra pass runs at every evaluation, with one cond list, untouched by the CFG drop
    extra_passes = [c for c in rec.cond_lists if c[1] == 1]
    assert len(extra_passes) == STEPS and all(c[2] == 0 for c in extra_passes)
    s = technique(m).last_stats
    assert s["uncond_evaluations"] == 4 and s["uncond_evaluations_skipped"] == 6
    assert not [p for p in rec.proj if after(p[1], gs)]


def test_post_cfg_functions_still_run(sd15):
    from comfy_extras.nodes_model_advanced import RescaleCFG
    seen = []

    def post_cfg(args):
        seen.append(float(args["sigma"].max()))
        return args["denoised"]
    m = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    m = RescaleCFG().patch(m, 0.7)[0]
    m.set_model_sampler_post_cfg_function(post_cfg)
    out = sample(m, sd15, steps=STEPS)
    assert torch.isfinite(out).all() and len(seen) == STEPS
    assert technique(m).last_stats["uncond_evaluations_skipped"] == 6


@pytest.mark.parametrize("order", ["tgate_first", "todo_first"])
def test_stacks_with_todo_in_either_order(sd15, order):
    todo = ToDoConfig((2.0, 1.0))
    if order == "tgate_first":
        m = apply_todo(apply_tgate(sd15.model, TGateConfig(gate=GATE)), todo)
    else:
        m = apply_tgate(apply_todo(sd15.model, todo), TGateConfig(gate=GATE))
    out = sample(m, sd15, steps=STEPS)
    assert torch.isfinite(out).all()
    t_stats = technique(m).last_stats
    patches = m.model_options["transformer_options"]["patches"]["attn1_patch"]
    todo_stats = [p.__self__ for p in patches if hasattr(p, "__self__")][-1].last_stats
    assert t_stats["attn2_calls_skipped"] > 0 and t_stats["uncond_evaluations_skipped"] == 6
    assert todo_stats["downsampled_calls"] > 0 and todo_stats["evaluations"] == STEPS


def test_lora_patched_model(sd15):
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w = sd15.model.get_model_object(key)
    lora = sd15.model.clone()
    lora.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.5,)}, 1.0)
    base_lora = sample(lora, sd15, steps=STEPS)
    assert not torch.equal(base_lora, sample(sd15.model, sd15, steps=STEPS))
    assert torch.equal(sample(apply_tgate(lora, TGateConfig(gate=1.0)), sd15, steps=STEPS), base_lora)
    a = sample(apply_tgate(lora, TGateConfig(gate=GATE)), sd15, steps=STEPS)
    after_tgate = apply_tgate(sd15.model, TGateConfig(gate=GATE)).clone()     # LoRA loaded after T-GATE
    after_tgate.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.5,)}, 1.0)
    b = sample(after_tgate, sd15, steps=STEPS)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(apply_tgate(sd15.model, TGateConfig(gate=GATE)), sd15, steps=STEPS))


class FakeControl(comfy.controlnet.ControlBase):
    """A ControlNet stand-in that adds a constant residual to the middle block and records its calls."""

    def __init__(self, channels, value=0.5):
        super().__init__()
        self.channels, self.value, self.calls = channels, value, []

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        self.calls.append((float(t.max()), batched_number, x_noisy.shape[0]))
        h, w = x_noisy.shape[-2] // 2, x_noisy.shape[-1] // 2
        return {"input": [], "middle": [torch.full((x_noisy.shape[0], self.channels, h, w), self.value)],
                "output": []}

    def copy(self):
        return self


def test_controlnet_residuals_keep_being_applied(sd15):
    ctrl = FakeControl(64)
    pos, neg = sd15.cond(1), sd15.cond(2)
    for c in (pos, neg):
        c[0][1]["control"] = ctrl
        c[0][1]["control_apply_to_uncond"] = True
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    gs = gate_sigma(tg)
    with_ctrl = sample(tg, sd15, steps=STEPS, positive=pos, negative=neg)
    without = sample(tg, sd15, steps=STEPS)
    assert torch.isfinite(with_ctrl).all() and not torch.equal(with_ctrl, without)
    post = [c for c in ctrl.calls if after(c[0], gs)]
    assert len(post) == 6 and all(n == 1 and b == 1 for _, n, b in post)     # applied to the cond-only batch
    assert technique(tg).last_stats["uncond_evaluations_skipped"] == 6


class IPAdapterLike:
    """An attn2 replace patch like IP-Adapter's: text attention plus an image-prompt term."""

    def __init__(self):
        self.calls = []          # (sigma, cond_or_uncond, output)

    def __deepcopy__(self, memo):
        return self              # ModelPatcher.clone deep-copies model_options: keep one recorder

    def __call__(self, q, k, v, extra_options):
        out = optimized_attention(q, k, v, extra_options["n_heads"]) + 0.3 * torch.tanh(q)
        self.calls.append((float(extra_options["sigmas"].max()), tuple(extra_options["cond_or_uncond"]), out.clone()))
        return out


@pytest.mark.parametrize("order", ["ip_first", "tgate_first"])
def test_ip_adapter_style_attn2_replace(sd15, order):
    ip = IPAdapterLike()

    def with_ip(model):
        m = model.clone()
        m.set_model_attn2_replace(ip, "input", 1)
        return m
    base_ip = sample(with_ip(sd15.model), sd15, steps=STEPS)
    assert torch.equal(sample(apply_tgate(with_ip(sd15.model), TGateConfig(gate=1.0)), sd15, steps=STEPS), base_ip)
    m = apply_tgate(with_ip(sd15.model), TGateConfig(gate=GATE)) if order == "ip_first" else \
        with_ip(apply_tgate(sd15.model, TGateConfig(gate=GATE)))
    gs = gate_sigma(m)
    ip.calls.clear()
    with recording(m) as (mm, rec):
        out = sample(mm, sd15, steps=STEPS)
    assert torch.isfinite(out).all()
    assert ip.calls and not [c for c in ip.calls if after(c[0], gs)]          # never called after the gate
    assert not [p for p in rec.proj if after(p[1], gs)]
    # the cached output of that block is to_out(mean of the replace patch's cond and uncond outputs)
    path = "input_blocks.1.1.transformer_blocks.0.attn2"
    cache_sigma = min(c[0] for c in ip.calls)
    lay, o = [(lay, o) for s, lay, o in ip.calls if s == cache_sigma][0]
    to_out = sd15.model.model.diffusion_model.get_submodule(path).to_out
    with torch.inference_mode():
        expected = to_out((o.chunk(2)[lay.index(0)] + o.chunk(2)[lay.index(1)]) / 2)
    reused = [o for p, s, _, o in rec.out if p == path and after(s, gs)]
    assert len(reused) == 6 and all(torch.allclose(r, expected, atol=1e-5, rtol=1e-5) for r in reused)
    s = technique(m).last_stats
    assert s["attn2_replace_captured"] > 0 and s["attn2_replace_calls_dropped_after_gate"] == 6


def test_self_attention_caching_v2(sd15):
    cfg = TGateConfig(gate=0.7, self_attention=True, sa_warmup=1, sa_interval=2)
    m = apply_tgate(sd15.model, cfg)
    out = sample(m, sd15, steps=STEPS)
    s = technique(m).last_stats
    # 10 steps, gate 70%: steps 0-6 before; step 0 computes; 1 (warm-up) and 2, 4 (multiples of the interval,
    # the official scheduler's absolute index) cache; 3 and 5 reuse; 6 (the cache step) computes
    assert torch.isfinite(out).all() and s["steps_before_gate"] == 7 and s["cache_step"] == 6
    n_attn1 = len([x for x in attention_sites(sd15.model, detect_model(sd15.model)) if x.kind == "self"])
    assert s["attn1_calls_skipped"] == 2 * n_attn1
    assert s["attn1_calls_computed"] == (STEPS - 2) * n_attn1
    off = apply_tgate(sd15.model, TGateConfig(gate=0.7))
    sample(off, sd15, steps=STEPS)
    assert technique(off).last_stats["attn1_calls_skipped"] == 0
    assert not any(k.endswith("attn1.forward") for k in off.object_patches)


def test_pixart(request):
    t = tiny_pixart()
    kw = dict(h=48, w=48, steps=STEPS, positive=t.cond(1, tokens=16), negative=t.cond(2, tokens=16))
    base = sample(t.model, t, **kw)
    assert torch.equal(sample(apply_tgate(t.model, TGateConfig(dit_gate=1.0)), t, **kw), base)
    tg = apply_tgate(t.model, TGateConfig(dit_gate=GATE))
    gs = gate_sigma(tg)
    with recording(tg) as (m, rec):
        out = sample(m, t, **kw)
    assert torch.isfinite(out).all()
    assert not [p for p in rec.proj if after(p[1], gs)]
    assert all(c[1] == (0,) for c in rec.calls if after(c[0], gs))
    cache_sigma = min(s for _, s, _, _ in rec.out if not after(s, gs))
    for path in {p for p, *_ in rec.out}:
        lay, o = [(lay, o) for p, s, lay, o in rec.out if p == path and s == cache_sigma][0]
        mean = (o.chunk(2)[lay.index(0)] + o.chunk(2)[lay.index(1)]) / 2
        assert all(torch.allclose(r, mean, atol=1e-5) for p, s, _, r in rec.out if p == path and after(s, gs))
    s = technique(tg).last_stats
    assert s["model"] == "PixArt" and s["attn2_calls_skipped"] == 6 * 2


# ------------------------------------------------------------------------------------------------
# stats, bypass, re-queue, unsupported models, the node
# ------------------------------------------------------------------------------------------------
def test_cache_memory_reported(sd15):
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    with recording(tg) as (m, rec):
        sample(m, sd15, steps=STEPS)
    per_site = {p: o.shape[1:] for p, s, lay, o in rec.out}
    expected = sum(math.prod(shape) * 4 for shape in per_site.values())     # one fp32 [1, N, C] per layer
    c = technique(tg).last_stats["cache"]
    assert c["bytes"] == expected and c["entries"] == len(per_site)
    assert c["peak_bytes"] == 2 * expected            # cond + uncond partials, before the mean
    assert technique(tg).last_stats["cache_peak_mb"] == round(2 * expected / 2 ** 20, 2)
    limited = apply_tgate(sd15.model, TGateConfig(gate=GATE, cache_limit_mb=expected / 2 ** 20))
    out = sample(limited, sd15, steps=STEPS)          # the budget refuses some layers: they compute
    s = technique(limited).last_stats
    assert torch.isfinite(out).all() and s["cache"]["rejected"] > 0 and s["cache"]["peak_bytes"] <= expected


def test_cache_on_cpu_gives_same_result(sd15):
    a = sample(apply_tgate(sd15.model, TGateConfig(gate=GATE)), sd15, steps=STEPS)
    m = apply_tgate(sd15.model, TGateConfig(gate=GATE, cache_on_cpu=True))
    assert torch.equal(sample(m, sd15, steps=STEPS), a)
    assert technique(m).last_stats["cache"]["on_cpu"] is True


def test_bypass_leaves_model_unpatched(sd15):
    base = sample(sd15.model, sd15, steps=STEPS)
    tg = apply_tgate(sd15.model, TGateConfig(gate=GATE))
    assert not torch.equal(sample(tg, sd15, steps=STEPS), base)
    assert not sd15.model.object_patches
    assert "freespeed.tgate" not in sd15.model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {})
    assert torch.equal(sample(sd15.model, sd15, steps=STEPS), base)


def test_requeue_with_changed_input_never_wraps_previous_patch(sd15):
    base = sample(sd15.model, sd15, steps=STEPS)
    sample(apply_tgate(sd15.model, TGateConfig(gate=GATE)), sd15, steps=STEPS)
    # the module still carries the previous clone's patch now; a new node output must not wrap it
    again = apply_tgate(sd15.model, TGateConfig(gate=1.0))
    assert torch.equal(sample(again, sd15, steps=STEPS), base)


def test_unsupported_models_get_a_clear_error():
    # joint-attention DiTs freeze their text stream since the DiT wave (tests/host/test_dit_tgate.py)
    t = tiny_lumina2()
    with pytest.raises(UnsupportedModelError, match=r"comfy\.model_base\.Lumina2") as e:
        apply_tgate(t.model, TGateConfig())
    assert "FreeSpeed T-GATE" in str(e.value) and "no T-GATE path for this model family" in str(e.value)


def test_v3_node_schema_and_execute(sd15):
    from comfy_api.v0_0_2 import io
    schema = TGateNode.define_schema()
    assert schema.node_id == "FreeSpeedTGate" and schema.display_name == "FreeSpeed T-GATE"
    assert schema.category == "model_patches/freespeed"
    assert [i.id for i in schema.inputs][:3] == ["model", "gate", "keep_cfg"]
    node = TGateNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "77"})
    patched = node.execute(sd15.model, 0.4, False).result[0]
    assert patched is not sd15.model
    sample(patched, sd15, steps=STEPS)
    assert LAST_STATS["77"]["uncond_evaluations_skipped"] == 6
    with pytest.raises(ValueError, match="gate"):
        TGateConfig(gate=1.5)
