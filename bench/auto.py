"""``python -m bench auto --model fixture``: FreeSpeed Auto's search (the node's own code,
``nodes/auto/search.py``) on a trained fixture, from the command line: prints every candidate tried and
the winner; ``--json`` writes the node's ``settings`` document.  Default ``--cost flops``: counted FLOPs
are deterministic, so the run reproduces exactly (``--cost time`` times it on this machine instead)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

log = logging.getLogger("FreeSpeed.bench")


def build_parser() -> argparse.ArgumentParser:
    from .fixtures.families import FIXTURES
    p = argparse.ArgumentParser(prog="python -m bench auto", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(FIXTURES), default="fixture")
    p.add_argument("--prompt", default="red disc at left", help="the positive prompt (the fixture's scene language)")
    p.add_argument("--steps", type=int, default=0, help="0: the fixture's own (20)")
    p.add_argument("--cfg", type=float, default=0.0, help="0: the fixture's own")
    p.add_argument("--sampler", default="", help="default: the fixture's own")
    p.add_argument("--scheduler", default="", help="default: the fixture's own")
    p.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...)")
    p.add_argument("--seeds", type=int, default=2, help="the target must hold on each")
    p.add_argument("--target", type=float, default=32.0, help="least PSNR (dB) against the full run")
    p.add_argument("--budget", type=int, default=24, help="trial runs at most")
    p.add_argument("--candidates", choices=("all", "freespeed"), default="all",
                   help="all = FreeSpeed + ComfyUI's EasyCache and ToMe")
    p.add_argument("--cost", choices=("flops", "time"), default="flops")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", default=None, metavar="PATH", help="write the settings document here")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def terminal(res: dict, model: str) -> str:
    from comfyui_freespeed.core import auto as A
    s = res["settings"]
    j = s["job"]
    head = (f"FreeSpeed Auto on {model}: {j['steps']} steps {j['sampler']}/{j['scheduler']}, CFG {j['cfg']:g}, latent "
            f"{'x'.join(map(str, j['latent']))}, target {j['target_db']:g} dB PSNR on {j['on']} on each of "
            f"{j['seeds']} seeds, cost = {j['cost']}")
    foot = [f"winner: {s['verdict']}",
            f"search: {s['search']['trials']} trials of budget {s['search']['budget']} + {j['seeds']} reference runs, "
            f"{s['search']['wall_s']:.1f} s"]
    m = s.get("fewer_steps_equal_cost")
    if m and m.get("steps") is not None:
        foot.append(f"fewer steps at equal cost: {m['steps']} steps, "
                    f"{'holds' if m['passed'] else 'fails'} the target")
    elif m:
        foot.append(f"fewer steps at equal cost: {m['note']}")
    if s["skipped"]:
        foot.append("not tried: " + "; ".join(f"{k} ({v})" for k, v in s["skipped"].items()))
    if s.get("timing"):
        t = s["timing"]
        foot.append(f"timing: {t['rounds']} interleaved rounds, self-check "
                    f"{'ok' if t['self_check_ok'] else 'FAILED: ' + t['self_check']}")
    return "\n".join([head, "", A.text(res["reference"], res["log"].candidates, res["winner"]), "", *foot])


def main(argv: list, t_start: float, setup) -> int:
    if "-h" in argv or "--help" in argv:
        build_parser().parse_args(argv)
    if not setup(argv):
        return 2
    a = build_parser().parse_args(argv)
    from comfyui_freespeed.nodes.auto.search import CANDIDATES, Job, run_auto
    from .fixtures.families import load_fixture
    fx = load_fixture(a.model)
    job = Job(fx.patcher, fx.conditioning([a.prompt]), fx.negative(1), {"samples": fx.empty_latent(1)}, a.seed,
              a.steps or fx.steps, a.cfg or fx.cfg, a.sampler or fx.sampler, a.scheduler or fx.scheduler,
              target=a.target, seeds=a.seeds, budget=a.budget,
              candidates=CANDIDATES[0] if a.candidates == "all" else CANDIDATES[1], cost=a.cost)
    try:
        res = run_auto(job)
    except ValueError as e:
        log.error("bench auto: %s", e)
        return 1
    print(terminal(res, a.model), flush=True)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res["settings"], f, indent=1)
        log.info("wrote %s", a.json)
    log.info("bench auto: %.1f s", time.perf_counter() - t_start)
    return 0


__all__ = ["build_parser", "terminal", "main"]
