"""Attention-map reuse on real ComfyUI: tiny real SD1.5/SDXL models sampled through comfy.sample.

Checked from the outside, independently of the node's own stats: forward hooks (with kwargs) on every
attention module record its inputs and output per model call, forward hooks on to_q/to_k/to_v count
projections, an ``optimized_attention_override`` spy counts kernel calls, and an APPLY_MODEL wrapper
registered by the test records each call's sigma and branch layout.  References are recomputed here
with plain torch: map = softmax(to_q(x) to_k(ctx)ᵀ / sqrt(d)) at the keep step, output =
to_out(map · to_v(ctx)) at the reuse step.

Query/key projections get a large init (qk_std=0.3) so that maps are peaked and a wrong map shows.
With 6 "normal" steps, step i sits at i/5 of denoising: "late from 50%" keeps maps at step 2 and
reuses them at steps 3, 4, 5.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import comfy.patcher_extension as pe

from tiny import sample, tiny_lumina2

from comfyui_freespeed.nodes.hooks import LAST_STATS
from comfyui_freespeed.nodes.sites import UnsupportedModelError, detect_model
from comfyui_freespeed.nodes.mapreuse import MapReuseConfig, MapReuseNode, apply_mapreuse, find_mapreuse
from comfyui_freespeed.nodes.mapreuse.search import MapReuseSearchNode, search
from comfyui_freespeed.nodes.sites import attention_sites
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

STEPS = 6
LATE = MapReuseConfig(schedule="late", start=0.5, cache_limit_mb=0, map_dtype="fp32")


def stats(m):
    return find_mapreuse(m).last_stats


class Recorder:
    def __init__(self):
        self.cur = None
        self.calls = []          # (sigma, cond_or_uncond, batch)
        self.attn = []           # dict(path, sigma, cu, x, context, value, out)
        self.proj = []           # (path, proj name, sigma)
        self.kernel = 0

    def apply_model(self, executor, x, t, *args, **kwargs):
        to = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        prev, self.cur = self.cur, (float(t.max()), tuple(to.get("cond_or_uncond", ())))
        self.calls.append((self.cur[0], self.cur[1], x.shape[0]))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.cur = prev

    def override(self, func, *args, **kwargs):
        self.kernel += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def recording(model, keep_tensors=True):
    """(clone of model with recording hooks, Recorder); module hooks removed on exit."""
    m = model.clone()
    rec = Recorder()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.rec", rec.apply_model)
    m.model_options["transformer_options"]["optimized_attention_override"] = rec.override
    dm = m.model.diffusion_model
    handles = []
    for s in attention_sites(m, detect_model(m)):
        mod = dm.get_submodule(s.path)
        if keep_tensors:
            def on_call(module, args, kwargs, out, path=s.path):
                get = lambda n, i: kwargs.get(n, args[i] if len(args) > i else None)  # noqa: E731
                rec.attn.append(dict(path=path, sigma=rec.cur[0], cu=rec.cur[1], x=args[0].detach().clone(),
                                     context=get("context", 1), value=get("value", 2), out=out.detach().clone()))
            handles.append(mod.register_forward_hook(on_call, with_kwargs=True))
        for p in ("to_q", "to_k", "to_v"):
            def on_proj(module, args, out, path=s.path, p=p):
                rec.proj.append((path, p, rec.cur[0]))
            handles.append(getattr(mod, p).register_forward_hook(on_proj))
    try:
        yield m, rec
    finally:
        for h in handles:
            h.remove()


def sigmas_of(m, steps):
    return find_mapreuse(m).last_schedule.sigmas[:steps]


def ref_map(mod, x, ctx):
    with torch.inference_mode():
        q, k = mod.to_q(x), mod.to_k(ctx)
        b, n, hd = q.shape
        h = mod.heads
        qh = q.view(b, n, h, hd // h).transpose(1, 2).float()
        kh = k.view(b, k.shape[1], h, hd // h).transpose(1, 2).float()
        return torch.softmax(qh @ kh.transpose(-1, -2) / (hd // h) ** 0.5, dim=-1)


def ref_out(mod, amap, ctx):
    with torch.inference_mode():
        v = mod.to_v(ctx)
        b, n, hd = v.shape
        h = mod.heads
        vh = v.view(b, n, h, hd // h).transpose(1, 2)
        o = (amap.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, -1, hd)
        return mod.to_out(o)


def branch(t, cu, which):
    per = t.shape[0] // len(cu)
    i = cu.index(which)
    return t[i * per:(i + 1) * per]


def check_reuse_against_reference(model, rec, m, keep_sigma, reuse_sigmas, map_dtype=None, only=None, atol=1e-5):
    """Every recorded reuse-step call of a reused layer equals to_out(keep-step map · to_v(current ctx)),
    per branch.  Returns the number of (call, branch) pairs checked."""
    dm = model.model.diffusion_model
    reused = 0
    keep = {}
    for r in rec.attn:
        if abs(r["sigma"] - keep_sigma) < 1e-6 * max(1.0, keep_sigma):
            keep[r["path"]] = r
    for r in rec.attn:
        if not any(abs(r["sigma"] - s) < 1e-6 * max(1.0, s) for s in reuse_sigmas):
            continue
        if only is not None and not only(r["path"]):
            continue
        k = keep[r["path"]]
        mod = dm.get_submodule(r["path"])
        kctx = k["x"] if k["context"] is None else k["context"]
        ctx = r["x"] if r["context"] is None else r["context"]
        if kctx.shape[1] != ctx.shape[1]:
            continue
        for b in set(r["cu"]):
            amap = ref_map(mod, branch(k["x"], k["cu"], b), branch(kctx, k["cu"], b))
            if map_dtype is not None:
                amap = amap.to(map_dtype)
            want = ref_out(mod, amap, branch(ctx, r["cu"], b))
            got = branch(r["out"], r["cu"], b)
            assert torch.allclose(got, want, atol=atol, rtol=1e-4), (r["path"], b, (got - want).abs().max())
            reused += 1
    return reused


# ------------------------------------------------------------------------------------------------
# exactness when nothing is reused
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_no_reuse_reproduces_unpatched_exactly_with_original_kernels(which, request):
    t = request.getfixturevalue(which)
    with recording(t.model, keep_tensors=False) as (m0, rec0):
        base = sample(m0, t, steps=STEPS)
    for cfg in (MapReuseConfig(schedule="off"), MapReuseConfig(schedule="late", start=1.0),
                MapReuseConfig(schedule="custom", percents=()), MapReuseConfig(schedule="late", refresh_every=1)):
        with recording(apply_mapreuse(t.model, cfg), keep_tensors=False) as (m, rec):
            assert torch.equal(sample(m, t, steps=STEPS), base), cfg
        assert rec.kernel == rec0.kernel, cfg          # every attention went through ComfyUI's kernel
        assert sorted(rec.proj) == sorted(rec0.proj)
        s = stats(m)
        assert s["reuse_steps"] == [] and s["reuse_calls"] == 0 and s["keep_calls"] == 0
        assert s["cache"]["peak_bytes"] == 0
    for sampler in ("heun", "dpm_2"):
        ref = sample(t.model, t, steps=4, sampler=sampler)
        assert torch.equal(sample(apply_mapreuse(t.model, MapReuseConfig(schedule="off")), t, steps=4,
                                  sampler=sampler), ref)


# ------------------------------------------------------------------------------------------------
# what a reuse step computes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("map_dtype", ["fp32", "fp16"])
def test_reuse_step_equals_map_times_current_v(sd15, map_dtype):
    cfg = MapReuseConfig(schedule="late", start=0.5, cache_limit_mb=0, map_dtype=map_dtype)
    with recording(apply_mapreuse(sd15.model, cfg)) as (m, rec):
        out = sample(m, sd15, steps=STEPS)
    s = stats(m)
    assert s["reuse_steps"] == [3, 4, 5] and s["keep_steps"] == [2]
    assert s["layers_reused"] == s["layers_patched"] == len(attention_sites(m, detect_model(m)))
    sig = sigmas_of(m, STEPS)
    n = check_reuse_against_reference(sd15.model, rec, m, sig[2], sig[3:6],
                                      map_dtype=torch.float16 if map_dtype == "fp16" else None)
    assert n == s["layers_patched"] * 3 * 2          # every layer, 3 reuse steps, 2 branches
    assert s["reuse_calls"] == s["layers_patched"] * 3
    assert torch.isfinite(out).all()
    # the reuse does change the result (peaked maps, so a stale map shows)
    assert not torch.equal(out, sample(sd15.model, sd15, steps=STEPS))


def test_reuse_steps_do_no_qk_projection(sd15):
    cfg = MapReuseConfig(schedule="late", start=0.5, refresh_every=2, cache_limit_mb=0)
    with recording(apply_mapreuse(sd15.model, cfg), keep_tensors=False) as (m, rec):
        sample(m, sd15, steps=STEPS)
    s = stats(m)
    assert s["reuse_steps"] == [3, 5] and s["keep_steps"] == [2, 4]
    sig = sigmas_of(m, STEPS)
    reuse_sig = {sig[i] for i in s["reuse_steps"]}
    n_layers = s["layers_patched"]
    on_reuse = [(p, name) for p, name, sg in rec.proj if sg in reuse_sig]
    assert not [x for x in on_reuse if x[1] in ("to_q", "to_k")]
    assert len([x for x in on_reuse if x[1] == "to_v"]) == n_layers * 2
    # every other step projects q, k and v once per layer
    other = [(p, name) for p, name, sg in rec.proj if sg not in reuse_sig]
    assert len(other) == n_layers * 3 * (STEPS - 2)
    # keep steps compute explicitly (no kernel), the others use ComfyUI's kernel
    assert rec.kernel == n_layers * (STEPS - 2 - 2)


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def test_byte_budget_leaves_layers_alone_and_reports_bytes(sd15):
    full = apply_mapreuse(sd15.model, MapReuseConfig(schedule="late", start=0.5, cache_limit_mb=0))
    sample(full, sd15, steps=STEPS)
    s_full = stats(full)
    assert s_full["layers_left_alone_budget"] == 0 and s_full["cache"]["peak_bytes"] > 0
    budget_mb = 0.3                           # fits level-2 maps and cross-attention, not level-1 self-attention
    m = apply_mapreuse(sd15.model, MapReuseConfig(schedule="late", start=0.5, cache_limit_mb=budget_mb))
    with recording(m, keep_tensors=False) as (mr, rec):
        out = sample(mr, sd15, steps=STEPS)
    s = stats(mr)
    assert torch.isfinite(out).all()
    assert 0 < s["layers_left_alone_budget"] < s["layers_patched"]
    assert 0 < s["layers_reused"] == s["layers_patched"] - s["layers_left_alone_budget"]
    assert 0 < s["cache"]["peak_bytes"] <= budget_mb * 2 ** 20 < s_full["cache"]["peak_bytes"]
    assert s["cache"]["budget_bytes"] == int(budget_mb * 2 ** 20)
    assert s["keep_calls_left_alone"] == s["layers_left_alone_budget"]
    assert s["reuse_calls"] == s["layers_reused"] * 3
    # the layers left alone projected q/k at the reuse steps (computed normally); the others did not
    sig = sigmas_of(mr, STEPS)
    q_on_reuse = {p for p, name, sg in rec.proj if name == "to_q" and sg in set(sig[3:6])}
    assert len(q_on_reuse) == s["layers_left_alone_budget"]
    # fp32 maps take twice the bytes of fp16 ones
    m32 = apply_mapreuse(sd15.model, MapReuseConfig(schedule="late", start=0.5, cache_limit_mb=0, map_dtype="fp32"))
    sample(m32, sd15, steps=STEPS)
    assert stats(m32)["cache"]["peak_bytes"] == 2 * s_full["cache"]["peak_bytes"]


def test_cpu_offload_option_gives_the_same_result(sd15):
    a = sample(apply_mapreuse(sd15.model, MapReuseConfig(cache_limit_mb=0)), sd15, steps=STEPS)
    m = apply_mapreuse(sd15.model, MapReuseConfig(cache_limit_mb=0, cache_on_cpu=True))
    assert torch.equal(sample(m, sd15, steps=STEPS), a)
    assert stats(m)["cache"]["on_cpu"] is True


# ------------------------------------------------------------------------------------------------
# runs, branches, samplers
# ------------------------------------------------------------------------------------------------
def test_caches_reset_between_runs(sd15):
    m = apply_mapreuse(sd15.model, LATE)
    sample(m, sd15, steps=STEPS)
    s1 = dict(stats(m))
    out4 = sample(m, sd15, steps=4)
    s2 = stats(m)
    fresh = sample(apply_mapreuse(sd15.model, LATE), sd15, steps=4)
    assert torch.equal(out4, fresh)
    assert s1["reuse_steps"] == [3, 4, 5] and s2["reuse_steps"] == [2, 3]       # 4 steps: i/3 -> 67%, 100%...
    assert s2["reuse_calls"] == s2["layers_patched"] * 2 and s2["reuse_fallback_no_map"] == 0
    assert find_mapreuse(m).run is None


def test_cond_only_batches_after_tgate_reuse_the_cond_maps(sd15):
    """T-GATE (gate 50%) then map reuse: after the gate only the cond branch is evaluated (batch 1);
    self-attention reuses the cond map of the keep step, never the uncond one."""
    tg = apply_tgate(sd15.model, TGateConfig(gate=0.5))
    m = apply_mapreuse(tg, MapReuseConfig(schedule="late", start=0.5, cache_limit_mb=0, map_dtype="fp32"))
    with recording(m) as (mr, rec):
        out = sample(mr, sd15, steps=STEPS)
    s = stats(mr)
    assert torch.isfinite(out).all()
    sig = sigmas_of(mr, STEPS)
    layouts = {sg: cu for sg, cu, _ in rec.calls}
    assert len(layouts[sig[2]]) == 2 and layouts[sig[3]] == (0,)      # both branches at keep, cond only after
    assert s["layers_left_to_other_node"] > 0                          # T-GATE owns cross-attention
    assert s["reuse_calls"] == s["layers_patched"] * 3 and s["reuse_fallback_no_map"] == 0
    is_attn1 = lambda p: p.endswith("attn1")                           # noqa: E731
    n = check_reuse_against_reference(sd15.model, rec, mr, sig[2], sig[3:6], only=is_attn1)
    assert n == s["layers_patched"] * 3
    # the check discriminates: the uncond map gives a different output (in the layers where the branches differ)
    dm = sd15.model.model.diffusion_model
    worst = 0.0
    for path in {r["path"] for r in rec.attn if is_attn1(r["path"])}:
        keep = next(r for r in rec.attn if r["path"] == path and r["sigma"] == sig[2])
        reuse = next(r for r in rec.attn if r["path"] == path and r["sigma"] == sig[3])
        mod = dm.get_submodule(path)
        x_unc = branch(keep["x"], keep["cu"], 1)
        wrong = ref_out(mod, ref_map(mod, x_unc, x_unc), reuse["x"])
        worst = max(worst, float((wrong - reuse["out"]).abs().max()))
    assert worst > 1e-4


def test_stacks_with_tgate_in_the_other_order(sd15):
    m = apply_tgate(apply_mapreuse(sd15.model, LATE), TGateConfig(gate=0.5))
    out = sample(m, sd15, steps=STEPS)
    s = stats(m)
    assert torch.isfinite(out).all()
    assert s["layers_left_to_other_node"] == 0 and s["reuse_calls"] > 0
    assert s["reuse_fallback_no_map"] == 0


@pytest.mark.parametrize("order", ["todo_first", "mapreuse_first"])
def test_stacks_with_todo(sd15, order):
    todo = ToDoConfig((2.0, 1.0))
    if order == "todo_first":
        m = apply_mapreuse(apply_todo(sd15.model, todo), LATE)
    else:
        m = apply_todo(apply_mapreuse(sd15.model, LATE), todo)
    with recording(m) as (mr, rec):
        out = sample(mr, sd15, steps=STEPS)
    s = stats(mr)
    assert torch.isfinite(out).all()
    assert s["reuse_fallback_token_mismatch"] == 0 and s["reuse_calls"] == s["layers_patched"] * 3
    # the level-1 self-attention maps were made for the downsampled K/V (256 queries x 64 keys)
    short = [r for r in rec.attn if r["path"].endswith("attn1") and r["context"] is not None
             and r["context"].shape[1] * 4 == r["x"].shape[1]]
    assert short
    sig = sigmas_of(mr, STEPS)
    n = check_reuse_against_reference(sd15.model, rec, mr, sig[2], sig[3:6])
    assert n == s["layers_patched"] * 3 * 2


def test_todo_window_change_falls_back_to_compute(sd15):
    """ToDo only until 45%: the keep step (40%) has short K/V, the reuse steps full K/V -> mismatch, computed."""
    m = apply_mapreuse(apply_todo(sd15.model, ToDoConfig((2.0, 1.0), end_percent=0.45)), LATE)
    out = sample(m, sd15, steps=STEPS)
    s = stats(m)
    assert torch.isfinite(out).all()
    level1_attn1 = [x for x in find_mapreuse(m).sites if x.kind == "self" and x.level == 1]
    assert s["reuse_fallback_token_mismatch"] == len(level1_attn1) * 3 * 2 or \
        s["reuse_fallback_token_mismatch"] == len(level1_attn1) * 3
    assert s["reuse_calls"] == (s["layers_patched"] - len(level1_attn1)) * 3


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_multi_evaluation_samplers(sd15, sampler):
    m = apply_mapreuse(sd15.model, MapReuseConfig(schedule="late", start=0.3, cache_limit_mb=0))
    out = sample(m, sd15, steps=4, sampler=sampler)
    s = stats(m)
    assert torch.isfinite(out).all()
    assert s["reuse_calls"] > 0
    if sampler == "dpm_2":
        assert s["extra_evaluations"] > 0


def test_sdxl_reuses(sdxl):
    with recording(apply_mapreuse(sdxl.model, LATE)) as (m, rec):
        out = sample(m, sdxl, steps=STEPS)
    s = stats(m)
    assert torch.isfinite(out).all() and s["model"] == "SDXL"
    assert s["reuse_calls"] == s["layers_patched"] * 3 > 0
    sig = sigmas_of(m, STEPS)
    assert check_reuse_against_reference(sdxl.model, rec, m, sig[2], sig[3:6]) == s["layers_patched"] * 3 * 2


def test_layer_choice_by_kind_and_level(sd15):
    info = detect_model(sd15.model)
    all_sites = attention_sites(sd15.model, info)
    only_self = find_mapreuse(apply_mapreuse(sd15.model, MapReuseConfig(cross_attention=False)))
    assert {x.kind for x in only_self.sites} == {"self"}
    only_l2 = find_mapreuse(apply_mapreuse(sd15.model, MapReuseConfig(levels=frozenset({2}))))
    assert only_l2.sites and {x.level for x in only_l2.sites} == {2}
    assert len(only_l2.sites) < len(all_sites)


# ------------------------------------------------------------------------------------------------
# isolation, errors, nodes, search
# ------------------------------------------------------------------------------------------------
def test_input_model_unchanged(sd15):
    base = sample(sd15.model, sd15, steps=STEPS)
    patches = dict(sd15.model.object_patches)
    m = apply_mapreuse(sd15.model, LATE)
    assert m is not sd15.model
    assert not torch.equal(sample(m, sd15, steps=STEPS), base)
    assert dict(sd15.model.object_patches) == patches
    assert "freespeed.mapreuse" not in sd15.model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {})
    assert torch.equal(sample(sd15.model, sd15, steps=STEPS), base)


def test_unsupported_models_get_a_clear_error():
    # DiTs reuse attention outputs since the DiT wave (tests/host/test_dit_mapreuse.py)
    t = tiny_lumina2()
    with pytest.raises(UnsupportedModelError, match=r"comfy\.model_base\.Lumina2") as e:
        apply_mapreuse(t.model, MapReuseConfig())
    assert "FreeSpeed Attention Map Reuse" in str(e.value)


def test_v3_nodes(sd15):
    from comfy_api.v0_0_2 import io
    schema = MapReuseNode.define_schema()
    assert schema.node_id == "FreeSpeedAttentionMapReuse" and schema.display_name == "FreeSpeed Attention Map Reuse"
    assert schema.category == "model_patches/freespeed"
    node = MapReuseNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "55"})
    patched = node.execute(sd15.model, "custom percents", 0.5, 0, "70, 90", True, True, "all", 1024.0, True,
                           False).result[0]
    sample(patched, sd15, steps=STEPS)
    assert LAST_STATS["55"]["reuse_steps"] == [4, 5] and LAST_STATS["55"]["keep_steps"] == [3]
    assert MapReuseNode.validate_inputs(schedule="fast") != True          # noqa: E712
    with pytest.raises(ValueError):
        MapReuseNode.execute(sd15.model, "custom percents", 0.5, 0, "70, abc")
    assert MapReuseSearchNode.define_schema().node_id == "FreeSpeedAttentionMapReuseSearch"


def test_search_picks_a_schedule_no_worse_than_late(sd15):
    steps = 5
    pos, neg = sd15.cond(1), sd15.cond(2)

    def sample_fn(m):
        return sample(m, sd15, steps=steps, positive=pos, negative=neg)

    res = search(sd15.model, sample_fn, 2, MapReuseConfig(schedule="off", cache_limit_mb=0))
    assert res["budget"] == 2 and len(res["reuse_steps"]) == 2
    assert set(res["single_step_psnr"]) == {1, 2, 3, 4}
    assert res["psnr"] >= res["late_psnr"] and res["late_steps"] == [3, 4]
    # the percents reproduce the chosen steps in the custom schedule
    from comfyui_freespeed.core.schedule import parse_percent_list
    m = apply_mapreuse(sd15.model, MapReuseConfig(schedule="custom", percents=tuple(parse_percent_list(res["percents"])),
                                                  cache_limit_mb=0))
    sample_fn(m)
    assert stats(m)["reuse_steps"] == res["reuse_steps"]
    # through the node
    latent = {"samples": sd15.latent(16, 16)}
    out = MapReuseSearchNode.execute(sd15.model, pos, neg, latent, 0, steps, 5.0, "euler", "normal", 2)
    model, pct, report = out.result
    assert pct and "PSNR" in report
    sample(model, sd15, steps=steps)
    assert len(stats(model)["reuse_steps"]) == 2


