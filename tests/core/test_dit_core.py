"""The pure pieces of the DiT wave (issues 15-16), no host: token layouts and K/V downsampling, the sampled
G-WPR ranking, similarity recovery by residual, DiT FLOPs, front-block counts and the residual cache."""
from __future__ import annotations

import pytest
import torch

from comfyui_freespeed.core.propagation import DeltaCache, front_blocks
from comfyui_freespeed.core.pruning import (DiTBlockShape, dit_block_flops, gather_tokens, gwpr_scores, scatter_back,
                                            sampled_gwpr_scores, similar_source, strided_rows)
from comfyui_freespeed.core.tokens import (Grid, TokenLayout, band_factor, downsample_grid, downsample_tokens,
                                           kept_kv_tokens, kv_index)


def test_layout_sequences_and_segments():
    lay = TokenLayout("flux", 77, (Grid(1, 8, 8), Grid(1, 4, 6)), 0, True)
    assert (lay.img, lay.joint, lay.main_range(), lay.group_offsets()) == (88, 165, (0, 64), [0, 64])
    assert lay.sequence(165) == "joint" and lay.sequence(88) == "image" and lay.sequence(77) is None
    assert lay.segments(True) == (("text", 77), Grid(1, 8, 8), Grid(1, 4, 6))
    wan = TokenLayout("wan", 0, (Grid(3, 5, 7),))
    assert wan.sequence(105) == "image" and wan.segments(True) == (Grid(3, 5, 7),)


@pytest.mark.parametrize("h,w,f", [(8, 8, 2), (7, 5, 2), (9, 13, 3), (16, 10, 4), (6, 6, 2.5)])
def test_nearest_selection_equals_todos_grid_downsampling_per_frame(h, w, f):
    x = torch.randn(2, 3 * h * w, 4)
    segs = (Grid(3, h, w),)
    got = downsample_tokens(x, 1, segs, f, "nearest")
    ref = torch.cat([downsample_grid(x[:, i * h * w:(i + 1) * h * w], h, w, f, "nearest") for i in range(3)], dim=1)
    assert torch.equal(got, ref) and got.shape[1] == kept_kv_tokens(segs, f)
    avg = downsample_tokens(x, 1, segs, f, "avg-pool")
    ref = torch.cat([downsample_grid(x[:, i * h * w:(i + 1) * h * w], h, w, f, "avg-pool") for i in range(3)], dim=1)
    assert torch.allclose(avg, ref)


def test_text_rows_are_kept_and_heads_first_layout_works():
    segs = (("text", 5), Grid(1, 4, 4), Grid(1, 2, 2))
    idx = kv_index(segs, 2.0)
    assert idx[:5].tolist() == list(range(5)) and idx.numel() == 5 + 4 + 1
    x = torch.randn(1, 2, 25, 3)                                      # Flux [B, H, L, D]
    assert torch.equal(downsample_tokens(x, 2, segs, 2.0, "nearest"), x.index_select(2, idx))
    pooled = downsample_tokens(x, 2, segs, 2.0, "avg-pool")
    assert torch.equal(pooled[:, :, :5], x[:, :, :5]) and torch.allclose(pooled[:, :, 5], x[:, :, [5, 6, 9, 10]].mean(2))


def test_resolution_bands():
    assert [band_factor(s, s) for s in (512, 1024, 1280, 1536, 1792, 2048)] == [2, 2, 3, 3, 4, 4]


def test_sampled_gwpr_with_every_row_equals_full_gwpr():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 36, 8) * 2, torch.randn(2, 3, 36, 8) * 2
    full = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
    rows = torch.arange(36)
    assert torch.allclose(sampled_gwpr_scores(q, k, rows, 5), gwpr_scores(full, 5), atol=1e-6)
    sub = strided_rows(1, 6, 6, 2)
    est = sampled_gwpr_scores(q[:, :, sub], k, sub, 1)
    assert torch.allclose(est, full.mean(1)[:, sub].mean(1), atol=1e-6)       # one iteration: column mean of rows
    assert strided_rows(2, 64, 64, 4, max_rows=200).numel() <= 200


def test_similarity_recovery_and_scatter_back():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    kept = torch.tensor([[1, 4, 7]])
    src = similar_source(q, k, kept)
    logits = (q.transpose(1, 2).reshape(1, 10, 8) @ k.transpose(1, 2).reshape(1, 10, 8)[:, [1, 4, 7]].transpose(1, 2))
    ref = logits.argmax(-1)
    ref[0, [1, 4, 7]] = torch.tensor([0, 1, 2])
    assert torch.equal(src, ref)
    x, y = torch.randn(1, 10, 3), torch.randn(1, 3, 3)
    out = scatter_back(x, y, kept, src)
    assert torch.equal(gather_tokens(out, kept), y)
    i = 0
    j = int(kept[0, src[0, i]])
    assert torch.allclose(out[0, i], x[0, i] + y[0, src[0, i]] - x[0, j])
    prev = torch.randn(1, 10, 3)
    out = scatter_back(x, y, kept, src, prev)
    assert torch.allclose(out[0, 0], x[0, 0] + prev[0, 0]) and torch.equal(gather_tokens(out, kept), y)


def test_dit_flops_and_front_blocks():
    s = DiTBlockShape(img=100, txt=50, dim=4)
    assert dit_block_flops(s, 10, 2) == 2 * (100 * 10 + 50 * 2) + 4 * 12 * 12 * 4
    w = DiTBlockShape(img=100, ctx=30, dim=4, joint=False, image_self=1, cross=True)
    assert dit_block_flops(w, 10, 0, 5) == 2 * (1000 + 150) + 4 * 100 * 4 + 4 * 50 * 4
    assert [front_blocks(n, 18 / 28) for n in (1, 2, 28, 57)] == [0, 1, 18, 37]


def test_delta_cache_serves_branches_in_any_order():
    c = DeltaCache()
    c.put(["a", "b"], 1, {"img": torch.arange(6.).view(2, 3, 1)}, step=0)
    got = c.get(["b", "a"], 1, {"img": (1, 3, 1)})
    assert torch.equal(got["img"][0], torch.tensor([[3.], [4.], [5.]])) and c.peak_bytes == 24
    assert c.get(["a", "c"], 1, {"img": (1, 3, 1)}) is None and c.get(["a"], 1, {"img": (1, 4, 1)}) is None


def test_readouts_of_dit_runs_say_what_the_dit_paths_did():
    from comfyui_freespeed.core import readout
    todo = readout.annotate({"technique": "ToDo", "model": "Flux", "steps": 20, "evaluations": 20,
                             "downsampled_calls": 1140, "kv_tokens": {"image": "4096->1024"}, "kv_tokens_kept_pct": 25.0,
                             "factors": [2.0], "text_kv_tokens": 512, "window_pct": [0.0, 100.0]})
    assert todo["readout"].startswith("image K/V ÷2 (4096→1024 tok) · text K/V kept (512 tok)"), todo
    tg = readout.annotate({"technique": "T-GATE", "model": "SD3", "steps": 10, "gate_pct": 40.0, "gate_sigma": 0.6,
                           "steps_before_gate": 4, "steps_after_gate": 6, "cache_step": 3, "attn2_calls_skipped": 144,
                           "uncond_evaluations_skipped": 6, "uncond_evaluations": 4, "mode": "text stream"})
    assert "text stream frozen 6 steps (144 block calls)" in tg["readout"] and "CFG off after gate" in tg["readout"]
    ep = readout.annotate({"technique": "Encoder Propagation", "model": "Wan", "steps": 9, "planned_key_steps": [0, 3, 6],
                           "key_steps": 3, "decoder_only_steps": 6, "front_blocks": "19/30", "front_share": 0.633})
    assert "6 with front 19/30 blocks skipped" in ep["readout"] and ep["speedup_est"] > 1.5
    at = readout.annotate({"technique": "AT-EDM", "model": "Flux", "steps": 20, "ratio": 0.7, "stack_calls_pruned": 14,
                           "kept_tokens": {"image": "4096->1229"}, "dit_range": "blocks 14-42 of 57",
                           "flops_saved_pct": 28.0, "tokens_kept_pct": 30.0, "dsap_end_pct": 30.0})
    assert at["readout"].startswith("prune 70% in blocks 14-42 of 57 (image 4096→1229 tok) · 14 calls pruned"), at
    mr = readout.annotate({"technique": "Attention Map Reuse", "model": "Wan", "steps": 10, "reuse_steps": [5, 6, 7],
                           "keep_steps": [4], "reuse_calls": 90, "reuses": "outputs", "cache_peak_mb": 12.0})
    assert "outputs kept at 4" in mr["readout"] and "reused an attention output" in mr["readout"]
