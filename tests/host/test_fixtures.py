"""The benchmark's fixture family (bench/fixtures/): each fixture is a real comfy.model_base model of
its family loaded through the real classes, its renderer and reader agree, its samples follow their
prompts, and its quality metrics rank a clearly degraded sampler (3 euler steps) below the full run.

A fixture whose weights are missing is skipped (train it with ``python -m bench.fixtures.train``)."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)
from bench.fixtures import families, quality, scenes  # noqa: E402

# a small set: the first seed of 12 bench prompts (singles, pairs and counts)
_BP, _BS = scenes.bench_set()
SMALL = (_BP[::scenes.BENCH_SEEDS_PER_PROMPT][:12], _BS[::scenes.BENCH_SEEDS_PER_PROMPT][:12])

EXPECTED = {   # family -> (model_base class, diffusion model class, supported_models config class)
    "sd15": ("BaseModel", "UNetModel", "SD15"),
    "sdxl": ("SDXL", "UNetModel", "SDXL"),
    "flux": ("Flux", "Flux", "Flux"),
    "pixart": ("PixArt", "PixArtMS", "PixArtSigma"),
}


def _load(name):
    path = families.spec(name).weights_path
    if not os.path.isfile(path):
        pytest.skip(f"{name}: weights missing ({path}); train them with python -m bench.fixtures.train --model {name}")
    return families.load_fixture(name)


@pytest.fixture(scope="module", params=families.FIXTURES)
def fx(request):
    return _load(request.param)


# Fixtures whose committed weights are CPU-trained and known to miss issue 13's realism targets (README,
# "State of the fixtures"): their target tests are strict expected failures, so the day a retrained
# fixture meets them the mark must go (XPASS fails the run).
UNDERTRAINED = {  # fixture -> (why, the targets it misses: "accuracy" and/or "ranking")
    "fixture": ("CPU-trained (4000 steps): prompt accuracy ~0.5, 3 steps and 20 steps not separable",
                {"accuracy", "ranking"}),
    "fixture-flux": ("CPU-trained (2000 steps): prompt accuracy 0.49", {"accuracy"}),
    "fixture-pixart": ("CPU-trained (2000 steps): prompt accuracy 0.50, 3 steps and 20 steps not separable",
                       {"accuracy", "ranking"}),
}


def _expect_miss(request, fx, target: str):
    why, misses = UNDERTRAINED.get(fx.name, ("", set()))
    if target in misses:
        request.applymarker(pytest.mark.xfail(reason=f"{fx.name}: {why}", strict=True))


_RUNS: dict = {}


def runs(fx):
    """Full-run and 3-step samples of the small set (sampled once per fixture)."""
    if fx.name not in _RUNS:
        prompts, seeds = SMALL
        _RUNS[fx.name] = {"full": fx.sample(prompts, seeds), "3": fx.sample(prompts, seeds, steps=3)}
    return _RUNS[fx.name]


def test_loaded_through_the_real_classes(fx):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    base_cls, dm_cls, cfg_cls = EXPECTED[fx.family]
    model = fx.patcher.model
    assert isinstance(fx.patcher, comfy.model_patcher.ModelPatcher)
    assert type(model) is getattr(comfy.model_base, base_cls)
    assert type(model.diffusion_model).__name__ == dm_cls
    assert type(model.model_config) is getattr(comfy.supported_models, cfg_cls)
    assert os.path.getsize(fx.weights_path) <= 20 * 2 ** 20
    assert fx.encoder.table.shape == (len(scenes.VOCAB) + scenes.SEQ_LEN + scenes.SEGMENTS, fx.spec.context_dim)
    want_type = comfy.model_base.ModelType.FLUX if fx.family == "flux" else comfy.model_base.ModelType.V_PREDICTION
    assert model.model_type == want_type
    cond = fx.conditioning(["red disc at left", "two blue squares"])
    assert cond[0][0].shape == (2, scenes.SEQ_LEN, fx.spec.context_dim)
    assert fx.empty_latent(3).shape == (3, fx.channels, fx.size, fx.size)
    dm = model.diffusion_model
    if fx.family == "sd15":       # cross-attention at two resolution levels, level 1 included
        levels = {int(n.split(".")[1]) for n, _ in dm.named_modules() if n.startswith("input_blocks") and n.endswith("attn2")}
        assert len(levels) >= 2 and min(levels) == 1 and fx.size >= 32
    elif fx.family == "sdxl":     # no attention at level 1, depth 2, pooled + size conditioning
        assert model.model_config.unet_config["transformer_depth"][0] == 0
        assert min(d for d in model.model_config.unet_config["transformer_depth"] if d) >= 2
        assert cond[0][1]["pooled_output"].shape == (2, 1280)
        assert model.adm_channels == 2816
    elif fx.family == "flux":     # double and single blocks, RoPE, no guidance embedding (real CFG)
        assert len(dm.double_blocks) >= 1 and len(dm.single_blocks) >= 1
        assert dm.params.guidance_embed is False and hasattr(dm, "pe_embedder")
    elif fx.family == "pixart":
        assert len(dm.blocks) >= 2 and hasattr(dm.blocks[0], "cross_attn")


def test_renderer_and_reader_agree(fx):
    prompts, seeds = scenes.held_out_set()
    acc = quality.prompt_accuracy(fx.render(prompts[:48], seeds[:48]), prompts[:48])
    assert acc["accuracy"] >= 0.98, acc["per_attribute"]


ACCURACY_TARGET = 0.9     # issue 13's target for the full run


def test_samples_have_learned_the_colours(fx):
    """What a trained fixture learns first: the described colours (an untrained one draws none)."""
    prompts, _ = SMALL
    acc = quality.prompt_accuracy(runs(fx)["full"], prompts)
    assert acc["per_attribute"]["colour"] >= 0.8, (acc["per_attribute"], acc["per_kind"])


def test_samples_follow_their_prompts(fx, request):
    _expect_miss(request, fx, "accuracy")
    prompts, _ = SMALL
    acc = quality.prompt_accuracy(runs(fx)["full"], prompts)
    assert acc["accuracy"] >= ACCURACY_TARGET, (acc["per_attribute"], acc["per_kind"])


def test_quality_metrics_rank_three_steps_below_the_full_run(fx, request):
    _expect_miss(request, fx, "ranking")
    prompts, _ = SMALL
    r = runs(fx)
    full, three = quality.prompt_accuracy(r["full"], prompts), quality.prompt_accuracy(r["3"], prompts)
    fd_full, fd_three = quality.fd(r["full"], prompts, n_boot=50), quality.fd(r["3"], prompts, n_boot=50)
    spread = max(fd_full["spread"], fd_three["spread"])
    acc_lower = three["accuracy"] < full["accuracy"] - 0.1
    fd_higher = fd_three["fd"] > fd_full["fd"] + spread
    assert acc_lower or fd_higher, (full["accuracy"], three["accuracy"], fd_full, fd_three)
