"""The tuning sweep (``python -m bench sweep``): every grid point is a valid configuration of its node,
and the frontier / recommendation rules pick what they say."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)
from bench import sweep  # noqa: E402
from comfyui_freespeed.core.techniques import BY_KEY  # noqa: E402
from comfyui_freespeed.nodes import registry  # noqa: E402


@pytest.mark.parametrize("key", sorted(sweep.GRIDS))
def test_every_grid_point_is_a_configuration_of_its_node(key):
    assert key in BY_KEY
    for settings in sweep.GRIDS[key]:
        cfg = registry.config(key, **settings)          # a wrong field name raises here, not mid-sweep
        for name, value in settings.items():
            assert getattr(cfg, name) == value, (key, name)


def _pt(name, ratio, fd, psnr):
    return {"name": name, "flops_ratio": ratio, "fd": fd, "psnr": psnr}


def test_frontier_drops_exactly_the_dominated_points():
    pts = [_pt("a", 1.5, 10.0, 30.0), _pt("b", 1.4, 11.0, 29.0),    # b: dominated by a on all three
           _pt("c", 2.0, 14.0, 25.0), _pt("d", 1.5, 10.0, 30.0)]    # d equals a: neither dominates
    assert sweep.frontier(pts) == ["a", "c", "d"]


def test_recommend_prefers_quality_wins_then_closeness_then_speed():
    def row(name, q, c, ratio):
        return {"name": name, "kind": "freespeed", "median_s": 1.0, "flops_ratio": ratio, "settings": {"n": name},
                "beats_fewer_steps_quality": q, "beats_fewer_steps": c}
    doc = {"settings": [{"rows": [row("x", True, False, 1.2), row("y", False, True, 3.0), row("z", True, True, 1.1)]},
                        {"rows": [row("x", True, False, 1.2), row("y", False, True, 3.0), row("z", True, False, 1.1)]}]}
    rec = sweep.recommend(doc)
    assert rec["name"] == "z" and rec["beats_quality_in"] == 2 and rec["beats_closeness_in"] == 1
    none = {"settings": [{"rows": [row("y", False, True, 3.0)]}]}
    assert sweep.recommend(none) is None           # nothing beats fewer steps on quality: no pick
