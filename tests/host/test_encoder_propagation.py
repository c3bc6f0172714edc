"""Encoder propagation (Faster Diffusion) on real ComfyUI: tiny real SD1.5/SDXL models through comfy.sample."""
import math

import pytest
import torch

import comfy.controlnet
import comfy.model_management as mm
import comfy.sample
import comfy.samplers
from comfy.cldm.cldm import ControlNet as ControlNetModel

from tiny import init_weights, tiny_lumina2, tiny_sd15, tiny_sdxl

from comfyui_freespeed.nodes.encoder_propagation import (EncoderPropagation, EncoderPropagationConfig,
                                                          EncoderPropagationNode, apply_encoder_propagation)
from comfyui_freespeed.nodes.hooks import LAST_STATS, find
from comfyui_freespeed.nodes.sites import UnsupportedModelError, detect_model
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo

H = W = 16
OFF = EncoderPropagationConfig("every_k", every_k=1, noise_injection=0.0)
PAPER = EncoderPropagationConfig("50ls")


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


def technique(model) -> EncoderPropagation:
    return find(model, EncoderPropagation.key)


def run(model, tiny, steps=10, sampler="euler", scheduler="normal", cfg=5.0, seed=0, positive=None, negative=None,
        callback=None, noise_mask=None, latent=None):
    """comfy.sample.sample with a callback; returns (samples, per-step [(x, denoised)])."""
    latent = tiny.latent(H, W) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    trace = []

    def cb(i, denoised, x, total):
        trace.append((x.clone(), denoised.clone()))
        if callback is not None:
            callback(i, denoised, x, total)

    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler,
                                  tiny.cond(1) if positive is None else positive,
                                  tiny.cond(2) if negative is None else negative, latent, seed=seed,
                                  callback=cb, noise_mask=noise_mask, disable_pbar=True)
    return out, trace


# ------------------------------------------------------------------------------------------------
# savings off -> unpatched output exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpm_2", "dpmpp_2m"])
def test_all_steps_key_reproduces_unpatched_exactly(which, sampler, request):
    t = request.getfixturevalue(which)
    base, _ = run(t.model, t, steps=6, sampler=sampler)
    m = apply_encoder_propagation(t.model, OFF)
    out, _ = run(m, t, steps=6, sampler=sampler)
    assert torch.equal(out, base)
    s = technique(m).last_stats
    assert s["decoder_only_steps"] == 0 and s["key_steps"] == 6
    # noise injection enabled but starting at 100%: never active, still exact
    m = apply_encoder_propagation(t.model, EncoderPropagationConfig("every_k", every_k=1, injection_start=1.0))
    assert torch.equal(run(m, t, steps=6, sampler=sampler)[0], base)


def test_input_model_is_untouched_and_bypass_leaves_nothing(sd15):
    before = run(sd15.model, sd15, steps=8)[0]
    m = apply_encoder_propagation(sd15.model, PAPER)
    run(m, sd15, steps=8)
    assert "output_block_patch" not in sd15.model.model_options["transformer_options"].get("patches", {})
    assert torch.equal(run(sd15.model, sd15, steps=8)[0], before)


# ------------------------------------------------------------------------------------------------
# the decoder-only pass
# ------------------------------------------------------------------------------------------------
class DecoderCheck(EncoderPropagation):
    """After every captured key-step forward, runs the decoder-only pass on the just-captured features
    with the same call's inputs and records how far it is from the full forward's output."""

    diffs: list

    def key_forward(self, run, step, executor, x, timesteps, context, y, control, to, branches, per, kwargs):
        captured_before = run.features.puts
        out = super().key_forward(run, step, executor, x, timesteps, context, y, control, to, branches, per, kwargs)
        if run.features.puts > captured_before:
            mid, skips, meta = run.features.lookup(branches, per, x.shape)
            dec = self.decode(executor.class_obj, mid, skips, meta["tindex"], timesteps, context, y, dict(to),
                              x.dtype, x.shape, kwargs)
            self.diffs.append(float((dec - out).abs().max()))
        return out


def with_check(model, config):
    m = model.clone()
    tech = DecoderCheck(config, detect_model(model))
    tech.diffs = []
    tech.install(m)
    return m, tech


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_decoder_only_pass_at_a_key_step_equals_the_full_forward(which, request):
    t = request.getfixturevalue(which)
    m, tech = with_check(t.model, EncoderPropagationConfig("every_k", every_k=3))
    run(m, t, steps=7)
    assert len(tech.diffs) == 3                       # key steps 0, 3, 6
    assert max(tech.diffs) == 0.0, tech.diffs


def test_decoder_only_pass_keeps_other_output_block_patches(sd15):
    """FreeU-style output patches run inside the decoder-only pass too (and never touch the cache)."""
    def freeu_like(h, hsp, transformer_options):
        h[:, : h.shape[1] // 2] *= 1.1                # in place, like FreeU
        return h, hsp * 0.9

    base = sd15.model.clone()
    base.set_model_output_block_patch(freeu_like)
    m, tech = with_check(base, EncoderPropagationConfig("every_k", every_k=2))
    run(m, sd15, steps=6)
    assert tech.diffs and max(tech.diffs) == 0.0
    # installed after the patch, the capture patch still runs first
    patches = m.model_options["transformer_options"]["patches"]["output_block_patch"]
    assert patches[0].__self__ is tech and patches[1] is freeu_like


def test_decoder_only_steps_use_the_schedule(sd15):
    calls = []

    class Spy(EncoderPropagation):
        def key_forward(self, run, step, *a, **k):
            calls.append(("full", step))
            return super().key_forward(run, step, *a, **k)

    m = sd15.model.clone()
    Spy(EncoderPropagationConfig("every_k", every_k=4, max_parallel=1), detect_model(sd15.model)).install(m)
    base, _ = run(sd15.model, sd15, steps=10)
    out, _ = run(m, sd15, steps=10)
    assert [s for _, s in calls] == [0, 4, 8]
    s = technique(m).last_stats
    assert (s["key_steps"], s["decoder_only_steps"], s["parallel_steps"]) == (3, 7, 0)
    assert not torch.equal(out, base) and torch.isfinite(out).all()


def test_paper_schedule_stats_at_50_steps(sd15):
    m = apply_encoder_propagation(sd15.model, PAPER, node_id="ep-test")
    run(m, sd15, steps=50, sampler="ddim", scheduler="ddim_uniform")
    s = LAST_STATS["ep-test"]
    assert s["planned_key_steps"] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert (s["key_steps"], s["decoder_only_steps"], s["parallel_steps"]) == (9, 41, 28)
    assert s["largest_parallel_batch"] == 4 and s["parallel_batch_peak_mb"] > 0 and s["feature_cache_peak_mb"] > 0
    assert s["injected_steps"] == 25
    assert s["evaluations"] == 50 and s.get("full_extra_evaluations", 0) == 0


# ------------------------------------------------------------------------------------------------
# parallel decoding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_parallel_decoding_equals_sequential_decoding(which, request):
    t = request.getfixturevalue(which)
    seq = apply_encoder_propagation(t.model, EncoderPropagationConfig("50ls", max_parallel=1))
    out_seq, tr_seq = run(seq, t, steps=30, sampler="ddim")
    assert technique(seq).last_stats["parallel_steps"] == 0
    for k in (3, 16):
        par = apply_encoder_propagation(t.model, EncoderPropagationConfig("50ls", max_parallel=k))
        out_par, tr_par = run(par, t, steps=30, sampler="ddim")
        s = technique(par).last_stats
        assert s["parallel_steps"] > 0 and s["largest_parallel_batch"] == min(k, 8)   # steps 22..29
        # batched float32 CPU kernels: equal up to rounding of a different batch size
        for (xs, ds), (xp, dp) in zip(tr_seq, tr_par):
            assert torch.allclose(dp, ds, rtol=1e-5, atol=1e-5 * float(ds.abs().max()))
        assert torch.allclose(out_par, out_seq, rtol=1e-4, atol=1e-4 * float(out_seq.abs().max()))


def test_split_cond_uncond_calls_are_served_per_branch(sd15, monkeypatch):
    """When memory forces cond and uncond into separate model calls, features are kept per branch."""
    cfg = EncoderPropagationConfig("every_k", every_k=3, max_parallel=2)
    batched = apply_encoder_propagation(sd15.model, cfg)
    out_b, _ = run(batched, sd15, steps=9)
    sb = technique(batched).last_stats
    monkeypatch.setattr(sd15.model.model, "memory_required", lambda *a, **k: 1e30)
    split = apply_encoder_propagation(sd15.model, cfg)
    out_s, _ = run(split, sd15, steps=9)
    ss = technique(split).last_stats
    assert ss["decoder_only_calls"] + ss.get("served_parallel_calls", 0) == 2 * (
        sb["decoder_only_calls"] + sb.get("served_parallel_calls", 0))
    assert ss["decoder_only_steps"] == sb["decoder_only_steps"] == 6
    assert torch.allclose(out_s, out_b, rtol=1e-4, atol=1e-4 * float(out_b.abs().max()))


def test_cfg_one_and_batches(sd15):
    m = apply_encoder_propagation(sd15.model, PAPER)
    out, _ = run(m, sd15, steps=20, cfg=1.0)             # ComfyUI drops the uncond branch
    assert torch.isfinite(out).all() and technique(m).last_stats["decoder_only_steps"] > 0
    out, _ = run(m, sd15, steps=20, latent=sd15.latent(H, W, batch=2))
    assert out.shape[0] == 2 and technique(m).last_stats["decoder_only_steps"] > 0


# ------------------------------------------------------------------------------------------------
# multi-evaluation samplers and run resets
# ------------------------------------------------------------------------------------------------
def test_extra_evaluations_run_the_full_unet(sd15):
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2))
    out, _ = run(m, sd15, steps=8, sampler="dpm_2")
    s = technique(m).last_stats
    assert s["full_extra_evaluations"] == s["extra_evaluations"] == 7    # midpoints of all but the last step
    assert s["decoder_only_steps"] == 4 and torch.isfinite(out).all()
    out, _ = run(m, sd15, steps=8, sampler="heun")                      # corrector at the next schedule sigma
    s = technique(m).last_stats
    assert s["decoder_only_steps"] == 4 and s.get("full_extra_evaluations", 0) == 0 and torch.isfinite(out).all()


def test_different_step_counts_between_runs_reset(sd15):
    m = apply_encoder_propagation(sd15.model, PAPER)
    first, _ = run(m, sd15, steps=10)
    second, _ = run(m, sd15, steps=20)
    fresh, _ = run(apply_encoder_propagation(sd15.model, PAPER), sd15, steps=20)
    assert torch.equal(second, fresh)
    assert technique(m).last_stats["steps"] == 20 and technique(m).runs == 2
    again, _ = run(m, sd15, steps=10)
    assert torch.equal(again, first)
    assert technique(m).run is None                   # nothing kept between runs


# ------------------------------------------------------------------------------------------------
# prior noise injection
# ------------------------------------------------------------------------------------------------
def reference_sampler(strength, start, z, heun=False):
    """The paper's loop in sampler space: before each step at or past ``start`` the latent the network
    sees moves by strength * z_T, i.e. x += strength * z_T * sqrt(sigma^2 + 1); then an Euler (DDIM)
    or Heun step from the shifted latent."""
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        threshold = model.inner_model.inner_model.model_sampling.percent_to_sigma(start)
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            if float(sigma) <= threshold * (1 + 1e-4):
                x = x + z.to(x) * (strength * math.sqrt(float(sigma) ** 2 + 1.0))
            denoised = model(x, sigma * s_in, **extra_args)
            d = (x - denoised) / sigma
            dt = sigmas[i + 1] - sigma
            if heun and sigmas[i + 1] != 0:
                x2 = x + d * dt
                d2 = (x2 - model(x2, sigmas[i + 1] * s_in, **extra_args)) / sigmas[i + 1]
                x = x + (d + d2) / 2 * dt
            else:
                x = x + d * dt
        return x
    return fn


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_injection_matches_the_papers_formula(sd15, sampler):
    strength, start, steps = 0.01, 0.5, 10
    latent = sd15.latent(H, W)
    noise = comfy.sample.prepare_noise(latent, 0)
    # injection accompanies propagation (none when every step is a key step): both runs propagate alike, the
    # reference adds the paper's shift in its own sampler loop
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2, noise_injection=strength,
                                                                       injection_start=start))
    out, _ = run(m, sd15, steps=steps, sampler=sampler)
    no_inj = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2, noise_injection=0.0))
    sigmas = comfy.samplers.calculate_sigmas(sd15.model.get_model_object("model_sampling"), "normal", steps)
    ks = comfy.samplers.KSAMPLER(reference_sampler(strength, start, noise, heun=sampler == "heun"))
    with torch.inference_mode():
        ref = comfy.sample.sample_custom(no_inj, noise, 5.0, ks, sigmas, sd15.cond(1), sd15.cond(2), latent,
                                         seed=0, disable_pbar=True)
    base, _ = run(no_inj, sd15, steps=steps, sampler=sampler)
    s = technique(m).last_stats
    assert s["injected_steps"] == 5 and s.get("injection_into_predictor", 0) == 0      # steps 5..9 of 10
    assert not torch.allclose(out, base)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_injection_changes_only_the_second_half(sd15):
    base, tr_base = run(apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2,
                                                                                       noise_injection=0.0)), sd15,
                        steps=10)
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2, noise_injection=0.003))
    out, tr = run(m, sd15, steps=10)
    # the callback sees the latent each step evaluated: identical up to step 4, shifted from step 5
    for i in range(10):
        same = torch.equal(tr[i][0], tr_base[i][0])
        assert same == (i < 5), i
    off = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=1, noise_injection=0.003))
    assert torch.equal(run(off, sd15, steps=10)[0], run(sd15.model, sd15, steps=10)[0])      # off: nothing injected
    assert "injected_steps" in technique(off).last_stats and technique(off).last_stats["injected_steps"] == 0


def test_injection_skipped_with_a_noise_mask(sd15):
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2))
    mask = torch.ones(1, 1, H, W)
    mask[..., : H // 2, :] = 0
    out, _ = run(m, sd15, steps=6, noise_mask=mask)
    s = technique(m).last_stats
    assert s["injected_steps"] == 0 and s["injection_skipped_mask"] == 3
    base, _ = run(apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=2,
                                                                                 noise_injection=0.0)),
                  sd15, steps=6, noise_mask=mask)
    assert torch.equal(out, base)


# ------------------------------------------------------------------------------------------------
# ControlNet
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlnet(sd15):
    cfg = dict(sd15.model.model.model_config.unet_config)
    cfg.pop("out_channels", None)
    cfg.update(hint_channels=3, device="cpu", dtype=torch.float32)
    cm = ControlNetModel(**cfg)
    init_weights(cm, seed=5)                           # non-zero "zero convs": residuals that matter
    calls = []
    cm.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    cn = comfy.controlnet.ControlNet(cm, load_device=mm.get_torch_device(), manual_cast_dtype=None)
    hint = torch.rand(1, 3, H * 8, W * 8, generator=torch.Generator().manual_seed(3))
    return cn, hint, calls


def controlled(sd15, cn, hint):
    """What ControlNetApplyAdvanced builds: one ControlNet copy shared by positive and negative."""
    c = cn.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    c.set_previous_controlnet(None)
    pos, neg = sd15.cond(1), sd15.cond(2)
    for cond in (pos, neg):
        cond[0][1] = dict(cond[0][1], control=c, control_apply_to_uncond=False)
    return pos, neg


@pytest.mark.parametrize("mode", ["reuse", "skip"])
def test_controlnet_all_key_steps_exact(sd15, controlnet, mode):
    cn, hint, _ = controlnet
    pos, neg = controlled(sd15, cn, hint)
    base, _ = run(sd15.model, sd15, steps=6, positive=pos, negative=neg)
    plain, _ = run(sd15.model, sd15, steps=6)
    assert not torch.equal(base, plain)                # the ControlNet does something
    m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=1, noise_injection=0.0,
                                                                       controlnet=mode))
    assert torch.equal(run(m, sd15, steps=6, positive=pos, negative=neg)[0], base)
    # the capture path (skip mode applies the residuals itself): decoder at a key step == full forward
    mk, tech = with_check(sd15.model, EncoderPropagationConfig("every_k", every_k=3, noise_injection=0.0,
                                                               controlnet=mode))
    run(mk, sd15, steps=6, positive=pos, negative=neg)
    if mode == "reuse":
        assert tech.diffs and max(tech.diffs) == 0.0
    else:                                              # skip: the kept features carry no residual
        assert tech.diffs and min(tech.diffs) > 0.0


def test_controlnet_runs_at_key_steps_only_and_modes_differ_only_at_decoder_steps(sd15, controlnet):
    cn, hint, calls = controlnet
    pos, neg = controlled(sd15, cn, hint)
    traces = {}
    for mode in ("reuse", "skip"):
        m = apply_encoder_propagation(sd15.model, EncoderPropagationConfig("every_k", every_k=3, max_parallel=2,
                                                                           noise_injection=0.0, controlnet=mode))
        calls.clear()
        out, traces[mode] = run(m, sd15, steps=9, positive=pos, negative=neg)
        s = technique(m).last_stats
        assert len(calls) == 3, mode                    # key steps 0, 3, 6 (cond+uncond batched: one call each)
        assert s["controlnet_skipped_evaluations"] == 6 and s["decoder_only_steps"] == 6
        assert torch.isfinite(out).all()
    # identical through key step 0, first difference at step 1, the first decoder-only step
    (x0r, d0r), (x0s, d0s) = traces["reuse"][0], traces["skip"][0]
    assert torch.equal(d0r, d0s) and torch.equal(traces["reuse"][1][0], traces["skip"][1][0])
    assert not torch.equal(traces["reuse"][1][1], traces["skip"][1][1])


# ------------------------------------------------------------------------------------------------
# stacking, models, node
# ------------------------------------------------------------------------------------------------
def test_stacks_with_todo_in_both_orders(sd15):
    todo = ToDoConfig((2.0, 1.0))
    a = apply_todo(apply_encoder_propagation(sd15.model, PAPER), todo)
    b = apply_encoder_propagation(apply_todo(sd15.model, todo), PAPER)
    out_a, _ = run(a, sd15, steps=20)
    out_b, _ = run(b, sd15, steps=20)
    assert torch.equal(out_a, out_b)
    ep_only, _ = run(apply_encoder_propagation(sd15.model, PAPER), sd15, steps=20)
    assert not torch.equal(out_a, ep_only)
    for m in (a, b):
        pats = m.model_options["transformer_options"]["patches"]
        ep = find(m, "freespeed.encoder_propagation")
        td = find(m, "freespeed.todo")
        assert pats["output_block_patch"][0].__self__ is ep         # the capture patch runs first
        assert ep.last_stats["decoder_only_steps"] > 0
        # ToDo also acts inside decoder-only passes (level-1 self-attention of the output blocks)
        assert td.last_stats["downsampled_calls"] > ep.last_stats["key_steps"] * 2


def test_stacks_with_tgate(sd15):
    tg = pytest.importorskip("comfyui_freespeed.nodes.tgate")
    cfg = tg.TGateConfig(gate=0.4)
    a = tg.apply_tgate(apply_encoder_propagation(sd15.model, PAPER), cfg)
    b = apply_encoder_propagation(tg.apply_tgate(sd15.model, cfg), PAPER)
    for m in (a, b):
        out, _ = run(m, sd15, steps=20)
        assert torch.isfinite(out).all()
        assert technique(m).last_stats["decoder_only_steps"] > 0


def test_second_node_replaces_the_first(sd15):
    once = apply_encoder_propagation(sd15.model, PAPER)
    twice = apply_encoder_propagation(apply_encoder_propagation(sd15.model, OFF), PAPER)
    assert len([p for p in twice.model_options["transformer_options"]["patches"]["output_block_patch"]]) == 1
    assert torch.equal(run(once, sd15, steps=12)[0], run(twice, sd15, steps=12)[0])


def test_unsupported_model_names_its_class():
    # DiTs propagate their front blocks since the DiT wave (tests/host/test_dit_encoder_propagation.py)
    with pytest.raises(UnsupportedModelError, match=r"comfy\.model_base\.Lumina2"):
        apply_encoder_propagation(tiny_lumina2().model, PAPER)


def test_v3_node_schema_and_execute(sd15):
    from comfy_api.v0_0_2 import io
    schema = EncoderPropagationNode.define_schema()
    assert schema.node_id == "FreeSpeedEncoderPropagation"
    assert schema.display_name == "FreeSpeed Encoder Propagation"
    names = [i.id for i in schema.inputs]
    assert names == ["model", "schedule", "every_k", "key_percents", "max_parallel_steps", "noise_injection",
                     "injection_start", "controlnet", "dit_front_blocks", "dit_warmup_percent", "dit_key_every",
                     "noise_injection_on_flow"]
    node = EncoderPropagationNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "77"})
    out = node.execute(sd15.model, "custom percents", 4, "0, 30%, 60", 2, 0.003, 0.5, "skip")
    m = out.result[0]
    run(m, sd15, steps=10)
    s = LAST_STATS["77"]
    assert s["planned_key_steps"] == [0, 3, 6] and s["controlnet"] == "skip" and s["max_parallel"] == 2
    with pytest.raises(ValueError):
        node.execute(sd15.model, "custom percents", 4, "", 2, 0.003, 0.5, "reuse")
    with pytest.raises(ValueError):
        node.execute(sd15.model, "custom percents", 4, "0, 150", 2, 0.003, 0.5, "reuse")


def test_validate_inputs_rejects_unknown_combo_values():
    # ComfyUI 0.3.64 does not compare V3 combo values with their options: the node does it
    assert EncoderPropagationNode.validate_inputs(schedule="paper 50ls", controlnet="skip") is True
    assert "schedule must be one of" in EncoderPropagationNode.validate_inputs(schedule="50ls", controlnet="skip")
    assert "controlnet must be one of" in EncoderPropagationNode.validate_inputs(schedule="every k steps",
                                                                              controlnet="off")
