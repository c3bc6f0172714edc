"""ToDo on real ComfyUI: tiny real SD1.5/SDXL models sampled through comfy.sample."""
import logging
import math

import pytest
import torch

from tiny import sample, technique_of, tiny_lumina2

from comfyui_freespeed.nodes.hooks import LAST_STATS
from comfyui_freespeed.nodes.sites import UnsupportedModelError
from comfyui_freespeed.nodes.todo import ToDoConfig, ToDoNode, apply_todo


def technique(model):
    return technique_of(model, "freespeed.todo")


class AttentionSpy:
    """Records (block, q tokens, k tokens, sigma) of every attention kernel call."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        to = kwargs.get("transformer_options", {})
        self.calls.append((tuple(to.get("block", ())), q.shape[1], k.shape[1], float(to["sigmas"].max())))
        return func(q, k, v, heads, *args, **kwargs)

    def self_attention(self, text_tokens=77):
        return [c for c in self.calls if c[2] != text_tokens]


def spied(model):
    m = model.clone()
    spy = AttentionSpy()
    m.model_options["transformer_options"]["optimized_attention_override"] = spy
    return m, spy


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_factor_one_and_closed_window_reproduce_unpatched_exactly(which, request):
    t = request.getfixturevalue(which)
    base = sample(t.model, t, 20, 12, steps=5)
    for cfg in (ToDoConfig((1.0, 1.0)), ToDoConfig((2.0, 2.0), start_percent=1.0, end_percent=1.0),
                ToDoConfig((2.0, 1.0), start_percent=0.7, end_percent=0.3)):
        out = sample(apply_todo(t.model, cfg), t, 20, 12, steps=5)
        assert torch.equal(out, base), cfg


def test_kv_tokens_shrink_by_factor_squared_queries_keep_theirs(sd15):
    h, w = 16, 12
    m, spy = spied(apply_todo(sd15.model, ToDoConfig((2.0, 1.0))))
    sample(m, sd15, h, w, steps=2)
    level1 = [c for c in spy.self_attention() if c[1] == h * w]
    level2 = [c for c in spy.self_attention() if c[1] == (h // 2) * (w // 2)]
    assert level1 and level2
    assert all(c[2] == (h // 2) * (w // 2) for c in level1), level1      # K/V: 192 -> 48 tokens
    assert all(c[2] == c[1] for c in level2), level2                     # level 2 left full
    # factor 2 at level 2 too
    m, spy = spied(apply_todo(sd15.model, ToDoConfig((1.0, 2.0))))
    sample(m, sd15, h, w, steps=2)
    l2 = [c for c in spy.self_attention() if c[1] == 48]
    assert l2 and all(c[2] == 12 for c in l2)
    assert all(c[2] == c[1] for c in spy.self_attention() if c[1] == h * w)


def test_window_is_respected_in_percent_of_denoising(sd15):
    m, spy = spied(apply_todo(sd15.model, ToDoConfig((2.0, 1.0), start_percent=0.0, end_percent=0.5)))
    sample(m, sd15, 16, 16, steps=10)
    ms = sd15.model.get_model_object("model_sampling")
    threshold = ms.percent_to_sigma(0.5)
    level1 = [c for c in spy.self_attention() if c[1] == 256]
    sigmas = sorted({c[3] for c in level1}, reverse=True)
    assert len(sigmas) == 10
    for block, q, k, sigma in level1:
        assert (k == 64) == (sigma >= threshold), (block, sigma, threshold)
    downsampled_evals = {c[3] for c in level1 if c[2] == 64}
    assert 3 <= len(downsampled_evals) <= 7      # about half of a 10-step 'normal' schedule
    stats = technique(m).last_stats
    assert stats["outside_window_calls"] > 0 and stats["downsampled_calls"] > 0


def test_sdxl_acts_on_its_highest_attention_level(sdxl):
    h, w = 16, 16
    m, spy = spied(apply_todo(sdxl.model, ToDoConfig((2.0, 1.0))))
    sample(m, sdxl, h, w, steps=2)
    calls = spy.self_attention()
    assert not any(c[1] == h * w for c in calls)             # SDXL has no attention at level 1
    top = [c for c in calls if c[1] == (h // 2) * (w // 2)]  # its highest attention level: 8x8 tokens
    assert top and all(c[2] == 16 for c in top)
    assert all(c[2] == c[1] for c in calls if c[1] == 16)    # next level untouched
    stats = technique(m).last_stats
    assert stats["kv_tokens"] == {"level1": "64->16"}


@pytest.mark.parametrize("method", ["nearest", "avg-pool", "bilinear"])
def test_odd_sizes_and_batch_three(sd15, method):
    h, w = 13, 19                                          # e.g. 104x152 px; ceil(13/2)*ceil(19/2) = 70
    m, spy = spied(apply_todo(sd15.model, ToDoConfig((2.0, 2.0), method=method)))
    out = sample(m, sd15, h, w, steps=2, batch=3)
    assert out.shape == (3, 4, h, w) and torch.isfinite(out).all()
    l1 = [c for c in spy.self_attention() if c[1] == h * w]
    assert l1 and all(c[2] == math.ceil(h / 2) * math.ceil(w / 2) for c in l1)
    l2 = [c for c in spy.self_attention() if c[1] == 7 * 10]
    assert l2 and all(c[2] == 4 * 5 for c in l2)


def test_input_model_is_unchanged_and_requeue_is_a_first_run(sd15):
    before_opts = repr(sorted(sd15.model.model_options["transformer_options"].keys()))
    before_wrappers = {k: dict(v) for k, v in sd15.model.wrappers.items()}
    base = sample(sd15.model, sd15, 16, 16, steps=4)
    patched = apply_todo(sd15.model, ToDoConfig((2.0, 1.0)))
    first = sample(patched, sd15, 16, 16, steps=4)
    stats1 = dict(technique(patched).last_stats)
    second = sample(patched, sd15, 16, 16, steps=4)
    stats2 = dict(technique(patched).last_stats)
    assert torch.equal(first, second)
    assert stats1["evaluations"] == stats2["evaluations"] == 4            # state reset per run
    assert stats1["downsampled_calls"] == stats2["downsampled_calls"]
    # the input MODEL: no patch, no wrapper, same output as before the node ran
    assert "patches" not in sd15.model.model_options["transformer_options"]
    assert repr(sorted(sd15.model.model_options["transformer_options"].keys())) == before_opts
    assert {k: dict(v) for k, v in sd15.model.wrappers.items()} == before_wrappers
    assert torch.equal(sample(sd15.model, sd15, 16, 16, steps=4), base)
    assert not torch.equal(first, base)


def test_different_step_counts_between_runs(sd15):
    patched = apply_todo(sd15.model, ToDoConfig((2.0, 1.0), end_percent=0.5))
    sample(patched, sd15, 16, 16, steps=6)
    s6 = dict(technique(patched).last_stats)
    sample(patched, sd15, 16, 16, steps=3)
    s3 = dict(technique(patched).last_stats)
    assert s6["evaluations"] == 6 and s3["evaluations"] == 3
    assert s6["steps"] == 6 and s3["steps"] == 3


def test_multi_evaluation_sampler_denoise_and_advanced_ranges(sd15):
    patched = apply_todo(sd15.model, ToDoConfig((2.0, 1.0), end_percent=0.6))
    # heun's second evaluation lands on the next schedule sigma (4 + 3 evaluations, none extra);
    # dpm_2's lands on a log-midpoint that is not in the schedule (3 extra evaluations)
    out = sample(patched, sd15, 16, 16, steps=4, sampler="heun")
    s = technique(patched).last_stats
    assert torch.isfinite(out).all() and s["extra_evaluations"] == 0 and s["evaluations"] == 7
    out = sample(patched, sd15, 16, 16, steps=4, sampler="dpm_2")
    s = technique(patched).last_stats
    assert torch.isfinite(out).all() and s["extra_evaluations"] == 3 and s["evaluations"] == 7
    assert s["downsampled_calls"] > 0
    out = sample(patched, sd15, 16, 16, steps=6, denoise=0.4, latent=torch.randn(1, 4, 16, 16))
    assert torch.isfinite(out).all()
    # denoise 0.4 starts at ~60% of denoising: a 0..60% window is (nearly) closed
    assert technique(patched).last_stats["downsampled_calls"] <= 4
    out = sample(patched, sd15, 16, 16, steps=8, start_step=2, last_step=6)
    assert torch.isfinite(out).all() and technique(patched).last_stats["evaluations"] == 4


def test_stacking_two_todo_nodes_counts_non_grid_instead_of_guessing(sd15):
    once = apply_todo(sd15.model, ToDoConfig((2.0, 1.0)))
    twice = apply_todo(once, ToDoConfig((2.0, 1.0)))
    m, spy = spied(twice)
    sample(m, sd15, 16, 16, steps=2)
    assert all(c[2] == 64 for c in spy.self_attention() if c[1] == 256)   # downsampled once, not twice
    second = technique(twice)
    assert second.last_stats["untouched_non_grid"] > 0
    assert second.last_stats["downsampled_calls"] == 0


def test_one_summary_log_line_per_run(sd15, caplog):
    patched = apply_todo(sd15.model, ToDoConfig((2.0, 1.0)))
    with caplog.at_level(logging.INFO, logger="FreeSpeed"):
        sample(patched, sd15, 16, 16, steps=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "FreeSpeed"]
    assert len(lines) == 1
    assert lines[0].startswith("FreeSpeed ToDo: 3 evaluations") and "K/V tokens kept 25%" in lines[0]


def test_unsupported_models_get_a_clear_error():
    # Flux, SD3, Wan, Qwen-Image and PixArt are supported since the DiT wave (tests/host/test_dit_todo.py)
    t = tiny_lumina2()
    with pytest.raises(UnsupportedModelError, match=r"comfy\.model_base\.Lumina2") as e:
        apply_todo(t.model, ToDoConfig())
    assert "FreeSpeed ToDo" in str(e.value) and "SD1.x/SD2.x, SDXL, Flux" in str(e.value)


def test_v3_node_schema_and_execute(sd15):
    schema = ToDoNode.define_schema()
    assert schema.node_id == "FreeSpeedToDo" and schema.category == "model_patches/freespeed"
    assert schema.display_name == "FreeSpeed ToDo (token downsampling)"
    ids = [i.id for i in schema.inputs]
    assert ids == ["model", "factor_level_1", "factor_level_2", "method", "start_percent", "end_percent",
                   "resolution_bands", "dit_blocks_from"]
    from comfy_api.v0_0_2 import io
    node = ToDoNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "42"})   # what the executor does
    out = node.execute(sd15.model, 2.0, 1.0, "avg-pool", 0.0, 1.0)
    patched = out.result[0]
    assert patched is not sd15.model
    sample(patched, sd15, 16, 16, steps=2)
    assert technique(patched).last_stats["method"] == "avg-pool"
    assert LAST_STATS["42"]["downsampled_calls"] > 0
    with pytest.raises(ValueError, match="unknown method"):
        ToDoNode.execute(sd15.model, 2.0, 1.0, "lanczos", 0.0, 1.0)
