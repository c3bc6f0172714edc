"""FreeSpeed Auto's decisions (pure Python; the node, ``nodes/auto``, and ``python -m bench auto`` run them):
which settings to try on the user's own model, in which order, and which candidate wins.

* **Closeness target.**  PSNR (dB) of each seed's output against the full run from the same noise, on the
  decoded images when a VAE is given, else on the final latents; the target must hold on every seed.
  Default 32 dB (published closeness figures: cache-dit and EasyCache READMEs, TeaCache Table 1): the caching results their authors call
  near-lossless sit at 32.7-35 dB (DBCache F8B0 on FLUX 35.2 dB / SSIM 0.913 at 1.53×, EasyCache on
  HunyuanVideo 32.7 dB), and 32 dB is the conservative floor met by DBCache F1B0 at 2.07×.  Video
  papers call 23-25 dB good: lower the target for Wan.
* **Ladders** (:data:`LADDERS`): per technique, settings from conservative to aggressive, each with its
  source (the paper's setting, the node default, or our fixture sweep ``bench/sweep.py``), climbed while
  the target holds (the first failing rung ends that climb).  The original at fewer steps
  (:func:`fewer_steps_ladder`) is always climbed first: it is the alternative every speed-up must beat.
* **Stacks** (:func:`build_stacks`): greedily from the cheapest passing single, adding the next-cheapest
  single's best rung (or its most conservative rung when that breaks the target) while the stack still
  holds the target and gets cheaper; parts applied in :data:`CANONICAL` order.
* **Winner** (:func:`pick_winner`): the cheapest candidate holding the target on every seed; the
  original when none is cheaper than the full run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .measure import fewer_steps_counts, match_fewer_steps

DEFAULT_TARGET_DB = 32.0
DEFAULT_BUDGET = 24
BUILTINS = ("easycache", "tome")                      # ComfyUI's own nodes (nodes/builtins.py)
UNET_ONLY = ("tome",)                                 # ToMe patches UNet self-attention only
# stack order: EasyCache before Encoder Propagation (after it, decoder-only steps never reach it),
# then the FreeSpeed techniques in the registry's order
CANONICAL = ("easycache", "tome", "todo", "tgate", "encprop", "mapreuse", "atedm")
SWEEP = "fixture sweep (bench/sweep.py)"


@dataclass(frozen=True)
class Rung:
    settings: dict
    source: str


LADDERS: dict[str, tuple[Rung, ...]] = {
    "todo": (Rung({"factors": (1.5, 1.0)}, SWEEP),
             Rung({"factors": (2.0, 1.0)}, "paper 2402.13573 §4: factor 2 at 1024² (node default)"),
             Rung({"factors": (3.0, 1.0)}, "paper 2402.13573 §4: factor 3 at 1536²"),
             Rung({"factors": (4.0, 1.0)}, "paper 2402.13573 §4: factor 4 at 2048²")),
    "tgate": (Rung({"gate": 0.8}, SWEEP), Rung({"gate": 0.6}, SWEEP),
              Rung({"gate": 0.4}, "paper 2404.02747: gate step 10 of 25 (node default)"),
              Rung({"gate": 0.3}, SWEEP)),
    "encprop": (Rung({"schedule": "every_k", "every_k": 2}, "Δ-DiT N=2 (arXiv 2406.01125); " + SWEEP),
                Rung({"schedule": "every_k", "every_k": 3}, SWEEP),
                Rung({"schedule": "50ls"}, "paper 2312.09608 key steps (node default)"),
                Rung({"schedule": "every_k", "every_k": 4}, SWEEP)),
    "mapreuse": (Rung({"start": 0.8}, SWEEP), Rung({"start": 0.7}, SWEEP), Rung({"start": 0.6}, SWEEP),
                 Rung({"start": 0.5}, "paper 2401.01008 late reuse (node default)")),
    "atedm": (Rung({"ratio": 0.3, "dsap_end": 0.3}, SWEEP), Rung({"ratio": 0.5, "dsap_end": 0.3}, SWEEP),
              Rung({"ratio": 0.7, "dsap_end": 0.3}, "paper 2405.05252 (node default)")),
    "easycache": (Rung({"reuse_threshold": 0.1}, "half ComfyUI's default"),
                  Rung({"reuse_threshold": 0.2}, "ComfyUI EasyCache default"),
                  Rung({"reuse_threshold": 0.3}, "tests/host compat harness (skips on tiny models)")),
    "tome": (Rung({"ratio": 0.1}, "ToMe for SD: conservative"), Rung({"ratio": 0.3}, "ComfyUI TomePatchModel default"),
             Rung({"ratio": 0.5}, "ToMe for SD paper's largest")),
}


def fewer_steps_ladder(steps: int, n: int = 6) -> list[int]:
    """Step counts of the original, conservative (steps − 1) to aggressive (about steps / 4)."""
    return sorted(fewer_steps_counts(steps, n), reverse=True)


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={'/'.join(f'{x:g}' for x in v) if isinstance(v, (tuple, list)) else v}"
                     for k, v in settings.items())


def from_json_settings(settings: dict) -> dict:
    """Settings read back from JSON: lists become tuples again (config fields are tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


@dataclass
class Candidate:
    """One thing the search tries: the original at ``steps`` with ``parts`` installed (key, settings)."""
    kind: str                                  # "reference" | "fewer_steps" | "single" | "builtin" | "stack"
    parts: tuple = ()                          # ((key, settings), ...) in CANONICAL order
    steps: int = 0
    source: str = ""
    cost: Optional[float] = None               # per run: seconds or FLOPs (mean over the seeds run)
    closeness: list = field(default_factory=list)   # PSNR dB per seed (inf = identical)
    passed: Optional[bool] = None
    error: Optional[str] = None
    times: list = field(default_factory=list)  # finalists: re-timed seconds per round
    ratio: Optional[float] = None              # reference cost / cost
    ratio_spread: Optional[tuple] = None       # (lo, hi) over the re-timing rounds

    @property
    def name(self) -> str:
        if self.kind == "reference":
            return f"original, {self.steps} steps"
        if self.kind == "fewer_steps":
            return f"fewer steps: {self.steps}"
        return " + ".join(f"{k} ({settings_text(s)})" for k, s in self.parts)

    @property
    def keys(self) -> tuple:
        return tuple(k for k, _ in self.parts)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "steps": self.steps, "source": self.source,
                "parts": [{"technique": k, "settings": dict(s)} for k, s in self.parts],
                "cost": self.cost, "ratio": None if self.ratio is None else round(self.ratio, 4),
                "ratio_spread": None if self.ratio_spread is None else [round(v, 4) for v in self.ratio_spread],
                "closeness_db": [None if not math.isfinite(c) else round(c, 3) for c in self.closeness],
                "passed": self.passed, "error": self.error}


def holds(closeness: Sequence[float], target: float, seeds: int) -> bool:
    """The target holds when every one of the ``seeds`` runs is at least ``target`` dB close."""
    return len(closeness) == seeds and all(c >= target for c in closeness)


def ladder_candidates(key: str, steps: int) -> list[Candidate]:
    kind = "builtin" if key in BUILTINS else "single"
    return [Candidate(kind, ((key, dict(r.settings)),), steps, r.source) for r in LADDERS[key]]


def stack_parts(parts: Sequence[tuple]) -> tuple:
    """Parts in canonical order (one entry per technique: the later one wins)."""
    by_key = {k: s for k, s in parts}
    return tuple((k, by_key[k]) for k in CANONICAL if k in by_key)


@dataclass
class SearchLog:
    reference: Candidate
    candidates: list = field(default_factory=list)     # every trial, in order
    trials: int = 0
    budget: int = 0
    skipped: dict = field(default_factory=dict)        # key -> why its ladder was not climbed


def climb_all(ladders: dict[str, list[Candidate]], evaluate: Callable[[Candidate], Candidate],
              log: SearchLog) -> dict[str, Candidate]:
    """Climb every ladder, round-robin (one rung of each per round, so a small budget still samples every
    technique), while its rungs hold the target; returns each ladder's cheapest passing rung."""
    pending = {name: list(lad) for name, lad in ladders.items() if lad}
    best: dict[str, Candidate] = {}
    while pending and log.trials < log.budget:
        for name in list(pending):
            if log.trials >= log.budget:
                break
            c = evaluate(pending[name].pop(0))
            log.trials += 1
            log.candidates.append(c)
            if c.passed:
                if name not in best or c.cost < best[name].cost:
                    best[name] = c
            if not c.passed or not pending[name]:
                del pending[name]
    return best


def build_stacks(singles: Sequence[Candidate], evaluate: Callable[[Candidate], Candidate], log: SearchLog,
                 steps: int) -> Optional[Candidate]:
    """Greedy stack from the passing singles, cheapest first: add each next technique at its best passing
    rung -- or, when that breaks the target, at its ladder's most conservative rung -- while the stack holds
    the target and gets cheaper.  Returns the best stack that held (None when none was tried or held)."""
    order = sorted(singles, key=lambda c: c.cost)
    if len(order) < 2:
        return None
    current, best = order[0], None
    for s in order[1:]:
        key = s.keys[0]
        first = dict(LADDERS[key][0].settings)
        tries = [tuple(s.parts)] + ([((key, first),)] if dict(s.parts[0][1]) != first else [])
        for part in tries:
            if log.trials >= log.budget:
                return best
            c = evaluate(Candidate("stack", stack_parts(current.parts + part), steps, "greedy stack of passing singles"))
            log.trials += 1
            log.candidates.append(c)
            if c.passed and c.cost < current.cost:
                current = best = c
                break
            if c.passed:
                break                    # it held but saved nothing: a more conservative rung saves less
    return best


def run_search(reference: Candidate, keys: Sequence[str], evaluate: Callable[[Candidate], Candidate],
               budget: int, fewer_steps: int = 6) -> SearchLog:
    """The whole search on an evaluated ``reference``: fewer steps and the ``keys`` ladders, then stacks.
    ``evaluate`` fills a candidate's cost, closeness and ``passed`` (and ``error`` when it could not run)."""
    log = SearchLog(reference, budget=max(0, int(budget)))
    # the original at fewer steps first, to its first failing rung: every speed-up is judged against it, so
    # "the fewer-steps run of equal cost" must have been measured, whatever the budget leaves the techniques
    steps = [Candidate("fewer_steps", (), s, "original at fewer steps")
             for s in fewer_steps_ladder(reference.steps, fewer_steps)]
    best = climb_all({"steps": steps}, evaluate, log)
    ladders = {k: ladder_candidates(k, reference.steps) for k in keys}   # in the caller's order (the node:
    best.update(climb_all(ladders, evaluate, log))                       # FreeSpeed's, then the built-ins)
    build_stacks([c for n, c in best.items() if n != "steps"], evaluate, log, reference.steps)
    return log


def pick_winner(reference: Candidate, candidates: Sequence[Candidate]) -> Candidate:
    """The cheapest candidate that holds the target on every seed and costs less than the full run
    (ties: fewer parts); the reference itself when none does."""
    ok = [c for c in candidates if c.passed and c.cost is not None and c.cost < reference.cost]
    return min(ok, key=lambda c: (c.cost, len(c.parts))) if ok else reference


def finalists(reference: Candidate, candidates: Sequence[Candidate], n: int = 3) -> list[Candidate]:
    """The ``n`` cheapest passing candidates, re-timed against the reference when cost is time, plus the
    measured fewer-steps run of most steps when none of them is one (the timing self-check's curve)."""
    ok = sorted((c for c in candidates if c.passed and c.cost is not None), key=lambda c: c.cost)[:n]
    fewer = [c for c in candidates if c.kind == "fewer_steps" and c.cost is not None and c.error is None]
    if ok and fewer and not any(c.kind == "fewer_steps" for c in ok):
        ok.append(max(fewer, key=lambda c: c.steps))
    return ok


def set_ratios(reference: Candidate, candidates: Sequence[Candidate]) -> None:
    for c in candidates:
        if c.cost:
            c.ratio = reference.cost / c.cost


def equal_cost_fewer_steps(reference: Candidate, candidates: Sequence[Candidate], cost: float) -> Optional[Candidate]:
    """The fewer-steps run (or the full run) of the largest step count that costs no more than ``cost``
    (the run a user could afford instead), among those measured; None if every one costs more."""
    runs = {c.steps: c for c in candidates if c.kind == "fewer_steps" and c.cost is not None}
    runs[reference.steps] = reference
    s = match_fewer_steps({k: v.cost for k, v in runs.items()}, cost)
    return None if s is None else runs[s]


def verdict(reference: Candidate, winner: Candidate, target: float, seeds: int) -> str:
    if winner is reference:
        return (f"nothing tried holds {target:g} dB on all {seeds} seed(s) at less cost than the full run: "
                f"the original MODEL at {reference.steps} steps is returned")
    worst = min(winner.closeness)
    close = "identical" if not math.isfinite(worst) else f"{worst:.1f} dB worst seed"
    if winner.kind == "fewer_steps":
        return (f"fewer steps won: {winner.steps} instead of {reference.steps} steps, {winner.ratio:.2f}× cheaper, "
                f"{close} (target {target:g} dB): the original MODEL is returned")
    return f"{winner.name}: {winner.ratio:.2f}× cheaper at {winner.steps} steps, {close} (target {target:g} dB)"


# ------------------------------------------------------------------------------------------------
# what the search reports
# ------------------------------------------------------------------------------------------------
TABLE_HEADER = ["candidate", "steps", "cost ratio", "worst dB", "dB per seed", "result", "rung source"]


def _db(v: float) -> str:
    return "ref" if not math.isfinite(v) else f"{v:.1f}"


def table(reference: Candidate, candidates: Sequence[Candidate], winner: Candidate) -> tuple[list, list]:
    """(header, rows) of every candidate, the reference first, in the order tried."""
    rows = []
    for c in [reference, *candidates]:
        if c is winner:
            result = "WINNER"
        elif c.error:
            result = "error: " + c.error[:40]
        elif c is reference:
            result = "reference"
        elif c.passed:
            result = "holds, costs more"
        else:
            result = "fails the target"
        ratio = "" if c.ratio is None else f"{c.ratio:.2f}x"
        if c.ratio_spread:
            ratio += f" ({c.ratio_spread[0]:.2f}-{c.ratio_spread[1]:.2f})"
        rows.append([c.name[:60], str(c.steps), ratio, _db(min(c.closeness)) if c.closeness else "",
                     " / ".join(_db(v) for v in c.closeness), result, c.source[:48]])
    return TABLE_HEADER, rows


def text(reference: Candidate, candidates: Sequence[Candidate], winner: Candidate) -> str:
    """The table as aligned plain text (the CLI's output)."""
    header, rows = table(reference, candidates, winner)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows])


def settings_doc(job: dict, family: str, reference: Candidate, log: SearchLog, winner: Candidate, wall_s: float,
                 timing: Optional[dict] = None) -> dict:
    """The node's ``settings`` output (JSON): the winner, its ratio and spread, closeness per seed, the
    fewer-steps run of equal cost and how it did, every candidate and what the search cost."""
    target, seeds = float(job["target_db"]), int(job["seeds"])
    match = None
    if winner.kind not in ("reference", "fewer_steps") and winner.cost is not None:
        m = equal_cost_fewer_steps(reference, log.candidates, winner.cost)
        match = ({"steps": None, "note": "every fewer-steps run measured costs more"} if m is None else
                 {"steps": m.steps, "ratio": m.ratio, "passed": m.passed,
                  "closeness_db": m.as_dict()["closeness_db"], "full_run": m is reference})
    w = winner.as_dict()
    return {"verdict": verdict(reference, winner, target, seeds), "reached": winner is not reference,
            "winner": w, "steps": winner.steps, "ratio": w["ratio"], "ratio_spread": w["ratio_spread"],
            "closeness_db": w["closeness_db"], "fewer_steps_equal_cost": match,
            "target": {"metric": "PSNR vs the full run", "min_db": target, "on": job.get("on", "latents"),
                       "every_seed": seeds},
            "cost": job["cost"], "model": family, "resolution": job.get("resolution"), "job": job,
            "reference": reference.as_dict(), "candidates": [c.as_dict() for c in log.candidates],
            "skipped": dict(log.skipped),
            "search": {"trials": log.trials, "budget": log.budget, "reference_runs": seeds,
                       "wall_s": round(wall_s, 3)},
            "timing": timing}


def readout(settings: dict) -> str:
    """The canvas line of a finished search."""
    if not settings["reached"]:
        return f"no winner at {settings['target']['min_db']:g} dB: original, {settings['steps']} steps"
    w = settings["winner"]
    name = f"{w['steps']} steps" if w["kind"] == "fewer_steps" else w["name"]
    return (f"{name} · {settings['ratio']:.2f}× ({settings['cost']}) · "
            f"{min(v if v is not None else math.inf for v in w['closeness_db']):.1f} dB · "
            f"{settings['search']['trials']} trials")


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
PRESET_FORMAT = "freespeed-auto-preset/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")


def check_preset_name(name: str) -> str:
    """A preset name as a file stem: letters, digits, space, ``_``, ``-``, ``.``; no path separators, no ``..``."""
    name = (name or "").strip()
    if name.endswith(".json"):
        name = name[:-5]
    if "/" in name or "\\" in name or ".." in name or not _NAME.match(name):
        raise ValueError(f"FreeSpeed preset name {name!r} is not allowed: use 1-64 letters, digits, spaces, '_', "
                         "'-' or '.', starting with a letter or digit (no path separators, no '..')")
    return name


def preset_doc(name: str, family: str, resolution: Sequence[int], steps: int, winner: Candidate, settings: dict) -> dict:
    return {"format": PRESET_FORMAT, "name": name, "family": family, "resolution": list(resolution),
            "tuned_steps": int(steps), "steps": int(winner.steps),
            "parts": [{"technique": k, "settings": dict(s)} for k, s in winner.parts],
            "winner": winner.name, "ratio": settings.get("ratio"), "target_db": settings.get("target", {}).get("min_db"),
            "cost": settings.get("cost")}


def check_preset(doc: Any, family: Optional[str], where: str) -> tuple[int, tuple]:
    """Validate a loaded preset against the MODEL's family: (steps, parts) or a ValueError naming ``where``."""
    if not isinstance(doc, dict) or doc.get("format") != PRESET_FORMAT:
        raise ValueError(f"FreeSpeed preset {where}: not a FreeSpeed Auto preset (format {PRESET_FORMAT} expected)")
    try:
        steps = int(doc["steps"])
        parts = tuple((str(p["technique"]), from_json_settings(dict(p["settings"]))) for p in doc["parts"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"FreeSpeed preset {where}: corrupt ({type(e).__name__}: {e})") from None
    unknown = [k for k, _ in parts if k not in LADDERS]
    if unknown or steps < 1:
        raise ValueError(f"FreeSpeed preset {where}: corrupt (unknown technique {unknown or ''}, steps {steps})")
    if family is not None and doc.get("family") != family:
        raise ValueError(f"FreeSpeed preset {where} was tuned on a {doc.get('family')} model, not on this {family} "
                         "model: run FreeSpeed Auto on this model instead")
    return steps, parts


__all__ = ["DEFAULT_TARGET_DB", "DEFAULT_BUDGET", "BUILTINS", "UNET_ONLY", "CANONICAL", "Rung", "LADDERS",
           "fewer_steps_ladder", "settings_text", "from_json_settings", "Candidate", "holds", "ladder_candidates",
           "stack_parts", "SearchLog", "climb_all", "build_stacks", "run_search", "pick_winner", "finalists",
           "set_ratios", "equal_cost_fewer_steps", "verdict", "TABLE_HEADER", "table", "text", "settings_doc",
           "readout", "PRESET_FORMAT", "check_preset_name", "preset_doc",
           "check_preset"]
