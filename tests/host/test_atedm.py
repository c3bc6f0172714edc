"""AT-EDM on real ComfyUI: tiny real SD1.5/SDXL models sampled through comfy.sample."""
import logging

import pytest
import torch

from tiny import sample, technique_of, tiny_lumina2, tiny_sd15


from comfyui_freespeed.core.pruning import kept_count, stage_edges
from comfyui_freespeed.nodes.atedm import ATEDMConfig, ATEDMNode, apply_atedm
from comfyui_freespeed.nodes.atedm.stack import map_bytes
from comfyui_freespeed.nodes.hooks import LAST_STATS
from comfyui_freespeed.nodes.sites import UnsupportedModelError
from comfyui_freespeed.nodes.tgate import TGateConfig, apply_tgate
from comfyui_freespeed.nodes.todo import ToDoConfig, apply_todo


@pytest.fixture(scope="module")
def sd15_deep():
    return tiny_sd15(qk_std=0.3, depth=2)


def technique(model, key="freespeed.atedm"):
    return technique_of(model, key)


class Spy:
    """Records (block, block_index, q tokens, k tokens, sigma) of every attention kernel call."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        to = kwargs.get("transformer_options", {})
        self.calls.append((tuple(to.get("block", ())), to.get("block_index"), q.shape[1], k.shape[1],
                           float(to["sigmas"].max())))
        return func(q, k, v, heads, *args, **kwargs)


def spied(model):
    m = model.clone()
    spy = Spy()
    m.model_options["transformer_options"]["optimized_attention_override"] = spy
    return m, spy


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_ratio_zero_is_the_unpatched_model_exactly_with_the_same_kernels(which, request):
    t = request.getfixturevalue(which)
    base_m, base_spy = spied(t.model)
    base = sample(base_m, t, 12, 10, steps=2)
    m, spy = spied(apply_atedm(t.model, ATEDMConfig(ratio=0.0)))
    out = sample(m, t, 12, 10, steps=2)
    assert torch.equal(out, base)
    assert spy.calls == base_spy.calls                    # every attention call still reaches the kernel
    s = technique(m).last_stats
    assert s["stack_calls_pruned"] == 0 and s["flops_saved_pct"] == 0.0 and s["evaluations"] == 2


def test_kept_set_is_the_top_of_a_reference_gwpr_and_pruned_tokens_copy_their_most_similar(sdxl, monkeypatch):
    from comfyui_freespeed.nodes.atedm import stack as atedm_stack
    m = apply_atedm(sdxl.model, ATEDMConfig(ratio=0.5, dsap_end=0.0))
    tech = technique(m)
    seen = []
    orig_prune = atedm_stack.prune

    def prune(call, keep, iterations):
        a = call.map.clone()
        orig_prune(call, keep, iterations)
        seen.append((a, keep, call.kept.clone(), call.source.clone()))
    monkeypatch.setattr(atedm_stack, "prune", prune)
    before_out = []
    hooks = [s.module.proj_out.register_forward_hook(lambda mod, inp, out: before_out.append(inp[0].detach().clone()))
             for s in tech.stacks]
    try:
        out = sample(m, sdxl, 16, 16, steps=2, batch=2)
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(out).all()
    assert len(seen) == len(before_out) == 2 * len(tech.stacks)      # every stack pruned at both steps
    for (a, keep, kept, src), x in zip(seen, before_out):
        b, n, _ = a.shape
        assert b == 4 and keep == kept_count(n, 0.5) == kept.shape[1]
        # reference G-WPR: 5 power iterations from a uniform start, written out plainly
        s = torch.full((b, n), 1.0 / n)
        for _ in range(5):
            s = torch.einsum("bi,bij->bj", s, a)
        for bi in range(b):
            assert set(kept[bi].tolist()) == set(torch.topk(s[bi], keep).indices.tolist())
            kl = kept[bi].tolist()
            for i in range(n):
                if i in kl:
                    continue
                best = max(kl, key=lambda j: a[bi, i, j].item())
                assert torch.equal(x[bi, i], x[bi, best]), (bi, i, best)   # recovered = most similar kept token
        assert any(not torch.equal(kept[0], kept[bi]) for bi in range(1, b))  # per sample kept sets


def test_token_counts_inside_pruned_stacks_follow_dsap(sd15_deep):
    h, w = 12, 8
    cfg = ATEDMConfig(ratio=0.6, dsap_end=0.5, early_scale=0.5)
    m, spy = spied(apply_atedm(sd15_deep.model, cfg))
    sample(m, sd15_deep, h, w, steps=4)
    tech = technique(m)
    edges = stage_edges(tech.info.block_level)
    threshold = sd15_deep.model.get_model_object("model_sampling").percent_to_sigma(0.5)
    grid = {1: h * w, 2: (h // 2) * (w // 2)}
    pruned_layer_calls = [c for c in spy.calls if c[1] == 1]          # layer 2 of every depth-2 stack
    assert pruned_layer_calls
    checked = 0
    for block, index, nq, nk, sigma in pruned_layer_calls:
        level = tech.info.attention_level(block)
        if level not in (1, 2):
            assert nq in (3 * 2, 2 * 1)                    # deeper levels are never pruned
            continue
        n = grid[level]
        early = sigma > threshold
        ratio = (0.0 if block[:2] in edges else 0.3) if early else 0.6
        assert nq == kept_count(n, ratio), (block, sigma, nq)
        if nk != 77:
            assert nk == nq                               # self-attention of the kept tokens
        checked += 1
    assert checked > 0
    s = tech.last_stats
    assert s["stack_calls_full"] > 0 and s["stack_calls_pruned"] > 0
    assert 0 < s["tokens_kept_pct"] < 100 and s["flops_saved_pct"] > 0 and s["attn_ff_saved_pct"] > 0
    assert s["kept_tokens"]["level1"] == f"{h * w}->{kept_count(h * w, 0.6)}"


def test_batch_three_and_odd_sizes(sd15, sdxl):
    out = sample(apply_atedm(sd15.model, ATEDMConfig(ratio=0.6, dsap_end=0.0)), sd15, 13, 19, steps=1, batch=3)
    assert out.shape == (3, 4, 13, 19) and torch.isfinite(out).all()
    m = apply_atedm(sdxl.model, ATEDMConfig(ratio=0.6, dsap_end=0.0))
    out = sample(m, sdxl, 65, 97, steps=1)                # 520x776 px: SDXL's attention at 33x49 and 17x25
    assert out.shape == (1, 4, 65, 97) and torch.isfinite(out).all()
    assert technique(m).last_stats["kept_tokens"] == {"level1": f"1617->{kept_count(1617, 0.6)}",
                                                     "level2": f"425->{kept_count(425, 0.6)}"}


def test_map_budget_leaves_big_stacks_unpruned_with_one_warning(sd15, caplog):
    # 16x16 latent with CFG: level 1 has 256 tokens, level 2 has 64; a budget between their map sizes
    heads = technique(apply_atedm(sd15.model, ATEDMConfig())).stacks[0].shapes[0].heads
    need1, need2 = map_bytes(2, 256, heads), map_bytes(2, 64, heads)
    assert need2 < need1
    m = apply_atedm(sd15.model, ATEDMConfig(ratio=0.5, dsap_end=0.0, map_budget_mb=(need1 + need2) / 2 / 2 ** 20))
    with caplog.at_level(logging.WARNING, logger="FreeSpeed"):
        out = sample(m, sd15, 16, 16, steps=2)
    assert torch.isfinite(out).all()
    s = technique(m).last_stats
    assert s["stack_calls_left_map_budget"] > 0 and s["kept_tokens"].keys() == {"level2"}
    assert len([r for r in caplog.records if "map_budget_mb" in r.getMessage()]) == 1


def test_no_state_leaks_between_steps_runs_or_models(sd15):
    base = sample(sd15.model, sd15, 10, 8, steps=2)
    m = apply_atedm(sd15.model, ATEDMConfig(ratio=0.5))
    first = sample(m, sd15, 10, 8, steps=2)
    s1 = dict(technique(m).last_stats)
    second = sample(m, sd15, 10, 8, steps=2)
    s2 = dict(technique(m).last_stats)
    assert torch.equal(first, second) and not torch.equal(first, base)
    assert s1 == {**s2, "wall_s": s1["wall_s"]}
    assert technique(m).run is None
    # the input MODEL is untouched and a plain run after the patched one is the unpatched model
    assert not sd15.model.object_patches and "freespeed.atedm" not in str(sd15.model.wrappers)
    assert torch.equal(sample(sd15.model, sd15, 10, 8, steps=2), base)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "dpmpp_sde"])
def test_multi_evaluation_samplers(sd15, sampler):
    m = apply_atedm(sd15.model, ATEDMConfig(ratio=0.5, dsap_end=0.0))
    out = sample(m, sd15, 8, 8, steps=2, sampler=sampler)
    assert torch.isfinite(out).all()
    assert technique(m).last_stats["stack_calls_pruned"] > 0


def _todo(model):
    return apply_todo(model, ToDoConfig((2.0, 1.0)))


def _tgate(model):
    return apply_tgate(model, TGateConfig(gate=0.5))


def _atedm(model):
    return apply_atedm(model, ATEDMConfig(ratio=0.5, dsap_end=0.0))


@pytest.mark.parametrize("other", ["todo", "tgate"])
@pytest.mark.parametrize("atedm_first", [True, False])
def test_stacks_with_todo_and_tgate_in_both_orders(sdxl, other, atedm_first):
    fn, key = (_todo, "freespeed.todo") if other == "todo" else (_tgate, "freespeed.tgate")
    m = fn(_atedm(sdxl.model)) if atedm_first else _atedm(fn(sdxl.model))
    out = sample(m, sdxl, 12, 12, steps=4)
    assert torch.isfinite(out).all()
    a = technique(m).last_stats
    o = technique(m, key).last_stats
    assert a["stack_calls_pruned"] > 0
    if other == "todo":
        assert o["downsampled_calls"] > 0
        assert a["stack_calls_left_kv_changed"] > 0          # ToDo's level-1 stacks: K/V shortened, map not square
        assert a["kept_tokens"].keys() == {"level2"}
        assert o["untouched_non_grid"] == 0                   # SDXL level 1 is depth 1: kept tokens feed attn2/FF only
    else:
        assert o["attn2_calls_skipped"] > 0
        assert not o.get("attn2_calls_computed_shape_mismatch")
        assert a["attn2_full_grid_calls"] > 0                 # T-GATE's per-position cache stays full-grid


def test_one_summary_log_line_per_run(sd15, caplog):
    m = apply_atedm(sd15.model, ATEDMConfig(ratio=0.5))
    with caplog.at_level(logging.INFO, logger="FreeSpeed"):
        sample(m, sd15, 8, 8, steps=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "FreeSpeed"]
    assert len(lines) == 1 and lines[0].startswith("FreeSpeed AT-EDM: 2 evaluations") and "FLOPs saved" in lines[0]


def test_unsupported_models_get_a_clear_error():
    # DiTs are pruned since the DiT wave (tests/host/test_dit_atedm.py)
    with pytest.raises(UnsupportedModelError, match=r"comfy\.model_base\.Lumina2") as e:
        apply_atedm(tiny_lumina2().model, ATEDMConfig())
    assert "FreeSpeed AT-EDM" in str(e.value)


def test_v3_node_schema_and_execute(sd15):
    schema = ATEDMNode.define_schema()
    assert schema.node_id == "FreeSpeedATEDM" and schema.category == "model_patches/freespeed"
    assert schema.display_name == "FreeSpeed AT-EDM (attention-driven pruning)"
    assert [i.id for i in schema.inputs] == ["model", "ratio", "dsap_end_percent", "early_scale", "levels",
                                             "map_budget_mb", "dit_range_start", "dit_range_end", "recovery",
                                             "dit_warmup_percent"]
    from comfy_api.v0_0_2 import io
    node = ATEDMNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "77"})
    patched = node.execute(sd15.model, 0.5, 0.0, 0.5, "1", 2048).result[0]
    sample(patched, sd15, 8, 8, steps=2)
    assert LAST_STATS["77"]["levels"] == [1] and LAST_STATS["77"]["stack_calls_pruned"] > 0
    assert ATEDMNode.validate_inputs(levels="4") != True       # noqa: E712
    assert ATEDMNode.validate_inputs(levels="1+2") is True
    with pytest.raises(ValueError):
        ATEDMNode.execute(sd15.model, 1.0, 0.3, 0.5, "1+2", 2048)
