"""bench/fixtures/scenes.py and the reader of bench/fixtures/quality.py: the prompt grammar, the
tokenizer and text encoder, the train/bench/held-out splits, deterministic rendering, and the reader
agreeing with the renderer.  Pure torch, no host."""
from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.fixtures import quality, scenes  # noqa: E402


def _prompts(n, seed=0, kind=None):
    g = torch.Generator().manual_seed(seed)
    return [scenes.random_prompt(g, kind) for _ in range(n)]


def test_grammar_round_trips_and_describes_attributes():
    for p in _prompts(300):
        assert scenes.Prompt.parse(p.text) == p
        attrs = p.attributes()
        assert sum(1 for _, a, _ in attrs if a == "colour") == len(p.objects)
        assert (p.count is not None) == any(a == "count" for _, a, _ in attrs)
    p = scenes.Prompt.parse("Large red disc at top left and blue square at bottom")
    assert p.kind == "pair" and p.objects[0] == scenes.Obj("red", "disc", "large", "top left")
    assert scenes.Prompt.parse("three small green triangles").count == 3
    assert scenes.Prompt.parse("a red disc").objects == (scenes.Obj("red", "disc"),)


@pytest.mark.parametrize("bad", ["", "red", "red disc and red square", "red disc at left and blue square at center",
                                 "red disc at top left and blue square at top", "red disc at center and blue square",
                                 "purple disc", "two red discs at left", "red disc at middle",
                                 "red disc and blue square and green bar"])
def test_grammar_rejects_prompts_it_cannot_render_or_read(bad):
    with pytest.raises(ValueError):
        scenes.Prompt.parse(bad)


def test_tokenizer_and_text_encoder():
    ids, seg = scenes.tokens("small red disc at left and blue square")
    assert ids.shape == seg.shape == (scenes.SEQ_LEN,)
    assert ids[0] == scenes.VOCAB.index("<bos>")
    words = "small red disc at left and blue square".split()
    assert [scenes.VOCAB[i] for i in ids[1:1 + len(words)]] == words
    assert ids[1 + len(words)] == scenes.VOCAB.index("<eos>")
    assert seg.tolist()[:1 + len(words)] == [0] * 6 + [1] * 3 and set(seg.tolist()[1 + len(words):]) == {2}
    empty, _ = scenes.tokens("")
    assert empty[:2].tolist() == [scenes.VOCAB.index("<bos>"), scenes.VOCAB.index("<eos>")]
    with pytest.raises(ValueError):
        scenes.tokens("red dragon")
    a, b = scenes.TextEncoder.make(64, 1280, seed=0), scenes.TextEncoder.make(64, 1280, seed=0)
    assert torch.equal(a.table, b.table) and torch.equal(a.pooled_proj, b.pooled_proj)
    ctx = a.encode(["red disc", "blue square at left", ""])
    assert ctx.shape == (3, scenes.SEQ_LEN, 64)
    assert a.pooled(["red disc", ""]).shape == (2, 1280)
    assert not torch.allclose(ctx[0], ctx[1])
    assert not torch.equal(scenes.TextEncoder.make(64, seed=1).table, a.table)


def test_splits_are_deterministic_disjoint_and_kept_out_of_training():
    bp, bs = scenes.bench_set()
    hp, hs = scenes.held_out_set()
    assert (bp, bs) == scenes.bench_set() and (hp, hs) == scenes.held_out_set()
    assert len(bp) == len(bs) == scenes.BENCH_PROMPTS * scenes.BENCH_SEEDS_PER_PROMPT
    assert len(set(bs)) == len(bs) and not set(bs) & set(hs)
    assert {scenes.split_of(p) for p in bp} == {"bench"}
    assert {scenes.split_of(p) for p in hp} == {"held_out"}
    assert {scenes.Prompt.parse(p).kind for p in bp} == {"single", "pair", "count"}
    g = torch.Generator().manual_seed(3)
    train = {scenes.train_prompt(g).text for _ in range(500)}
    assert not train & (set(bp) | set(hp))
    assert {scenes.split_of(t) for t in train} == {"train"}


def test_every_grammar_prompt_can_be_laid_out():
    g = torch.Generator().manual_seed(7)
    for kind in ("single", "pair", "count"):
        for _ in range(400):
            p = scenes.random_prompt(g, kind)
            scene = scenes.make_scene(p, g)
            assert len(scene["described"]) == (p.count or len(p.objects))


def test_rendering_is_deterministic_and_independent_of_the_batch():
    texts = ["large red disc at left", "three blue squares", "green bar and yellow triangle at top"]
    a = scenes.render(texts, 32, 4, seeds=[1, 2, 3])
    b = scenes.render(texts[1:], 32, 4, seeds=[2, 3])
    assert a.shape == (3, 4, 32, 32)
    assert torch.equal(a[1:], b)
    c = scenes.render(texts, 32, 4, seeds=[1, 2, 4])
    assert torch.equal(a[:2], c[:2]) and not torch.equal(a[2], c[2])
    # one prompt, different seeds: clearly different images (free content)
    same = scenes.render([texts[0]] * 2, 32, 4, seeds=[10, 11])
    assert (same[0] - same[1]).abs().mean() > 0.1
    x16 = scenes.render(texts, 36, 16, seeds=[1, 2, 3])
    assert x16.shape == (3, 16, 36, 36)


def test_lift_is_orthogonal_and_unlift_inverts_it():
    m = scenes.lift_matrix(16)
    assert torch.allclose(m.T @ m, torch.eye(4) * 4, atol=1e-5)
    base = torch.randn(2, 4, 8, 8)
    lifted = scenes.RENDER_GAIN * torch.einsum("ck,bkhw->bchw", m, base)
    assert torch.allclose(scenes.unlift(lifted), base, atol=1e-5)
    assert torch.equal(scenes.lift_matrix(4), torch.eye(4))


@pytest.mark.parametrize("size,channels", [(32, 4), (36, 4), (32, 16)])
def test_reader_agrees_with_the_renderer(size, channels):
    ps = _prompts(160, seed=size + channels)
    g = torch.Generator().manual_seed(1)
    acc = quality.prompt_accuracy(scenes.render(ps, size, channels, generator=g), ps)
    assert acc["accuracy"] >= 0.98, acc["per_attribute"]
    assert set(acc["per_attribute"]) == {"colour", "shape", "size", "position", "count"}


def test_reader_scores_degraded_images_lower():
    ps = _prompts(96, seed=5)
    g = torch.Generator().manual_seed(2)
    x = scenes.render(ps, 32, 4, generator=g)
    good = quality.prompt_accuracy(x, ps)["accuracy"]
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    shuffled = x[torch.randperm(len(x), generator=g)]             # images of other prompts
    assert quality.prompt_accuracy(blurred, ps)["accuracy"] < good - 0.1
    assert quality.prompt_accuracy(shuffled, ps)["accuracy"] < good - 0.3
    assert quality.prompt_accuracy(torch.zeros_like(x), ps)["accuracy"] == 0.0
