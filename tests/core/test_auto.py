"""FreeSpeed Auto's decisions (core/auto.py) on a synthetic model of costs and closeness: the climb stops at
the first failing rung, the budget bounds the trials, stacks are greedy and canonical, the winner is the
cheapest candidate holding the target on every seed, presets are validated."""
from __future__ import annotations

import math

import pytest

from comfyui_freespeed.core import auto as A

STEPS = 20
REF_COST = 100.0


def reference() -> A.Candidate:
    return A.Candidate("reference", (), STEPS, cost=REF_COST, closeness=[math.inf, math.inf], passed=True, ratio=1.0)


class World:
    """Cost and closeness of a candidate: each part saves a fixed fraction per rung index (0, 1, ...) and costs
    closeness; fewer steps cost proportionally and lose 3 dB per step removed."""

    def __init__(self, target=32.0, seeds=2, save=None, loss=None, seed_gap=0.0):
        self.target, self.seeds, self.seed_gap = target, seeds, seed_gap
        self.save = save or {"todo": 0.10, "tgate": 0.08, "encprop": 0.15, "mapreuse": 0.02, "atedm": 0.05,
                             "easycache": 0.12, "tome": 0.01}
        self.loss = loss or {"todo": 2.0, "tgate": 3.0, "encprop": 4.0, "mapreuse": 1.0, "atedm": 9.0,
                             "easycache": 2.5, "tome": 0.5}
        self.seen: list = []

    def rung(self, key, settings) -> int:
        return [dict(r.settings) for r in A.LADDERS[key]].index(dict(settings))

    def evaluate(self, c: A.Candidate) -> A.Candidate:
        self.seen.append(c)
        if c.kind == "fewer_steps":
            cost, db = REF_COST * c.steps / STEPS, 45.0 - 3.0 * (STEPS - c.steps)
        else:
            cost, db = REF_COST, 45.0
            for key, settings in c.parts:
                i = self.rung(key, settings) + 1
                cost *= 1 - self.save[key] * i
                db -= self.loss[key] * i
        c.cost = cost
        c.closeness = [db - self.seed_gap * s for s in range(self.seeds)]
        c.passed = A.holds(c.closeness, self.target, self.seeds)
        return c


KEYS = ("todo", "tgate", "encprop", "mapreuse", "atedm", "easycache", "tome")


def test_fewer_steps_ladder_runs_conservative_to_aggressive():
    assert A.fewer_steps_ladder(20) == [19, 16, 13, 11, 8, 5]
    assert A.fewer_steps_ladder(2) == []


def test_every_rung_names_its_source_and_installs_known_settings():
    for key, ladder in A.LADDERS.items():
        assert len(ladder) >= 3, key
        assert all(r.source for r in ladder)
    assert set(A.CANONICAL) == set(A.LADDERS)


def test_climb_stops_at_the_first_failing_rung_and_budget_bounds_trials():
    w = World()
    log = A.run_search(reference(), KEYS, w.evaluate, budget=200)
    tried = {}
    for c in log.candidates:
        if c.kind in ("single", "builtin"):
            tried.setdefault(c.keys[0], []).append(c)
    # atedm loses 9 dB per rung: rung 1 is 36 dB (holds), rung 2 is 27 dB (fails) -> rung 3 never tried
    assert [c.passed for c in tried["atedm"]] == [True, False]
    # encprop: 41, 37, 33 hold, 29 fails: all four tried, the last failed
    assert [c.passed for c in tried["encprop"]] == [True, True, True, False]
    # fewer steps: 19 (42 dB), 16 (33 dB) hold, 13 (24 dB) fails
    assert [c.steps for c in log.candidates if c.kind == "fewer_steps"] == [19, 16, 13]
    assert log.trials == len(log.candidates) == len(w.seen)

    for budget in (0, 1, 5, 9):
        w = World()
        log = A.run_search(reference(), KEYS, w.evaluate, budget=budget)
        assert log.trials == len(w.seen) <= budget
    # fewer steps first, climbed to its first failing rung (19, 16, 13), then one rung of every ladder per round:
    # a budget of 3 + len(KEYS) reaches the first rung of every technique
    w = World()
    log = A.run_search(reference(), KEYS, w.evaluate, budget=3 + len(KEYS))
    assert [c.steps for c in log.candidates[:3]] == [19, 16, 13] and all(c.kind == "fewer_steps" for c in log.candidates[:3])
    assert [c.keys[0] for c in log.candidates[3:]] == list(KEYS)


def test_winner_is_the_cheapest_candidate_holding_the_target_on_every_seed():
    w = World(seed_gap=2.0)
    ref = reference()
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    win = A.pick_winner(ref, log.candidates)
    ok = [c for c in log.candidates if all(v >= w.target for v in c.closeness) and len(c.closeness) == w.seeds]
    assert win in ok and win.cost == min(c.cost for c in ok)
    assert all(v >= w.target for v in win.closeness)
    # a candidate that holds on seed 0 only is never picked
    one_seed = [c for c in log.candidates if c.closeness[0] >= w.target > c.closeness[-1]]
    assert one_seed and all(c is not win for c in one_seed)


def test_stacks_are_greedy_canonical_and_must_hold():
    w = World()
    ref = reference()
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    stacks = [c for c in log.candidates if c.kind == "stack"]
    assert stacks
    for s in stacks:
        assert list(s.keys) == [k for k in A.CANONICAL if k in s.keys]
    best = {}
    for c in log.candidates:
        if c.kind in ("single", "builtin") and c.passed and (c.keys[0] not in best or c.cost < best[c.keys[0]].cost):
            best[c.keys[0]] = c
    two = sorted(best.values(), key=lambda c: c.cost)[:2]
    # the first stack joins the two cheapest passing singles at their best rungs ...
    assert stacks[0].parts == A.stack_parts(two[0].parts + two[1].parts)
    # ... and, as that breaks the target here, the second one retries the second at its most conservative rung
    assert not stacks[0].passed
    k = two[1].keys[0]
    assert stacks[1].parts == A.stack_parts(two[0].parts + ((k, dict(A.LADDERS[k][0].settings)),))
    win = A.pick_winner(ref, log.candidates)
    assert win.passed and all(v >= w.target for v in win.closeness)
    assert win.cost == min(c.cost for c in log.candidates if c.passed)
    # with mild losses the best rungs stack and the winner is a stack of several techniques
    w = World(loss={k: 0.5 for k in KEYS})
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    win = A.pick_winner(ref, log.candidates)
    assert win.kind == "stack" and len(win.parts) >= 3 and win.passed


def test_fewer_steps_win_and_unreachable_target():
    # techniques that save nothing: fewer steps is the cheapest passing candidate
    w = World(save={k: 0.0 for k in KEYS}, loss={k: 0.1 for k in KEYS})
    ref = reference()
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    win = A.pick_winner(ref, log.candidates)
    assert win.kind == "fewer_steps" and win.steps == 16 and win.parts == ()
    A.set_ratios(ref, log.candidates)
    assert "fewer steps won: 16 instead of 20" in A.verdict(ref, win, 32.0, 2)
    # nothing holds 60 dB: the reference comes back and the verdict says so
    w = World(target=60.0)
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    assert A.pick_winner(ref, log.candidates) is ref
    assert "nothing tried holds 60 dB" in A.verdict(ref, ref, 60.0, 2)


def test_equal_cost_fewer_steps_and_settings_doc():
    w = World()
    ref = reference()
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    A.set_ratios(ref, log.candidates)
    win = A.pick_winner(ref, log.candidates)
    job = {"target_db": 32.0, "seeds": 2, "cost": "flops", "resolution": [512, 512]}
    doc = A.settings_doc(job, "sd1", ref, log, win, wall_s=12.5)
    assert doc["search"] == {"trials": log.trials, "budget": 200, "reference_runs": 2, "wall_s": 12.5}
    assert doc["winner"]["name"] == win.name and doc["ratio"] == round(REF_COST / win.cost, 4)
    m = doc["fewer_steps_equal_cost"]
    # the winner costs less than every fewer-steps run measured (13 steps = 65 failed, cheaper ones never run)
    if win.cost < 65.0:
        assert m == {"steps": None, "note": "every fewer-steps run measured costs more"}
    match = A.equal_cost_fewer_steps(ref, log.candidates, 81.0)
    assert match.steps == 16                        # 16 steps cost 80 <= 81; 19 steps cost 95
    assert A.equal_cost_fewer_steps(ref, log.candidates, 10.0) is None
    assert len(doc["candidates"]) == log.trials


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "..", ".hidden", "x" * 65, "semi;colon"])
def test_bad_preset_names_are_refused(bad):
    with pytest.raises(ValueError, match="not allowed"):
        A.check_preset_name(bad)


def test_preset_round_trip_and_errors():
    assert A.check_preset_name("my sdxl 1024.json") == "my sdxl 1024"
    ref = reference()
    win = A.Candidate("stack", (("todo", {"factors": (2.0, 1.0)}), ("tgate", {"gate": 0.4})), 20, passed=True)
    doc = A.preset_doc("p", "sdxl", [1024, 1024], 20, win, {"ratio": 1.5, "target": {"min_db": 32}, "cost": "time"})
    import json
    back = json.loads(json.dumps(doc))
    steps, parts = A.check_preset(back, "sdxl", "'p'")
    assert steps == 20 and parts == win.parts           # tuples restored from JSON lists
    with pytest.raises(ValueError, match="tuned on a sdxl model, not on this flux model"):
        A.check_preset(back, "flux", "'p'")
    with pytest.raises(ValueError, match="not a FreeSpeed Auto preset"):
        A.check_preset({"name": "x"}, "sdxl", "'x'")
    with pytest.raises(ValueError, match="corrupt"):
        A.check_preset({**back, "parts": [{"technique": "todo"}]}, "sdxl", "'p'")
    with pytest.raises(ValueError, match="corrupt"):
        A.check_preset({**back, "parts": [{"technique": "warp", "settings": {}}]}, "sdxl", "'p'")
    assert ref.name == "original, 20 steps"


def test_canvas_readout_of_a_search():
    from comfyui_freespeed.core.readout import annotate
    w = World()
    ref = reference()
    log = A.run_search(ref, KEYS, w.evaluate, budget=200)
    A.set_ratios(ref, log.candidates)
    win = A.pick_winner(ref, log.candidates)
    doc = A.settings_doc({"target_db": 32.0, "seeds": 2, "cost": "flops"}, "sd1", ref, log, win, wall_s=1.0)
    line = A.readout(doc)
    assert line.startswith(win.name) and f"{REF_COST / win.cost:.2f}× (flops)" in line and f"{log.trials} trials" in line
    # the node publishes its own line: the readout layer passes it through unchanged
    assert annotate({"technique": "FreeSpeed Auto", "readout": line, "steps": 20})["readout"] == line
    doc = A.settings_doc({"target_db": 60.0, "seeds": 2, "cost": "flops"}, "sd1", ref, log, ref, wall_s=1.0)
    assert A.readout(doc) == "no winner at 60 dB: original, 20 steps"
