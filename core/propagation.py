"""Encoder propagation (Faster Diffusion, arXiv 2312.09608): the pure pieces.

Key-step schedules (the paper's DDIM-50 "50ls" table as percents of denoising, every k steps, custom),
parallel planning of decoder-only steps (Sec. 3.3), the prior-noise-injection maths (Sec. 3.4) and the
per-branch caches of captured features and parallel-decoded outputs (entries stored per call, indexed
per conditioning uuid, so a later call with another batch composition is served from slices).
Notes: docs/encoder_propagation.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence

import torch

from .cache import tensor_bytes
from .schedule import RunSchedule, percents_to_steps

# Official code (``utils_sd.py``, mod "50ls"): key steps of DDIM with 50 steps.
PAPER_KEY_STEPS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)
PAPER_STEPS = 50
# Sec. 3.4 / official code: latents += 0.003 * z_T while t / 1000 < 0.5.
PAPER_INJECTION = 0.003
PAPER_INJECTION_START = 0.5

SCHEDULES = ("50ls", "every_k", "custom")
SCHEDULE_LABELS = {"paper 50ls": "50ls", "every k steps": "every_k", "custom percents": "custom"}   # node combo


def paper_key_percents() -> list[float]:
    """The 50ls key steps as percents of denoising: step i of 50 -> i / 50."""
    return [i / PAPER_STEPS for i in PAPER_KEY_STEPS_50]


def every_k_steps(total_steps: int, k: int) -> list[int]:
    """Key steps 0, k, 2k, ... below ``total_steps`` (k = 1: every step is a key step)."""
    if k < 1:
        raise ValueError("every k steps needs k >= 1")
    return list(range(0, max(total_steps, 1), k))


def key_steps(schedule: RunSchedule, mode: str, every_k: int = 4,
              percents: Optional[Sequence[float]] = None) -> list[int]:
    """Key steps of one run (sorted, always containing step 0).

    ``50ls`` and ``custom`` map percents to the first step at or past each one
    (:func:`core.schedule.percents_to_steps`); ``every_k`` counts the run's own steps.
    """
    total = schedule.total_steps
    if mode == "every_k":
        steps = every_k_steps(total, every_k)
    elif mode == "50ls":
        steps = percents_to_steps(paper_key_percents(), schedule)
    elif mode == "custom":
        steps = percents_to_steps(list(percents or ()), schedule)
    else:
        raise ValueError(f"unknown key-step schedule {mode!r}; expected one of {', '.join(SCHEDULES)}")
    out = sorted({s for s in steps if 0 <= s < max(total, 1)} | {0})
    return out


def plan_parallel(step: int, keys: Iterable[int], total_steps: int, max_parallel: int,
                  skip: Iterable[int] = ()) -> list[int]:
    """Steps to decode in one batch when a decoder-only pass is needed at ``step``.

    ``step`` itself, then the following non-key steps (those in ``skip`` -- already decoded --
    excluded) up to the next key step, at most ``max_parallel`` steps in all.  Parallel decoding
    never crosses a key step: the features change there.
    """
    keys = set(keys)
    skip = set(skip)
    out = [step]
    s = step + 1
    while len(out) < max(1, max_parallel) and s < total_steps and s not in keys:
        if s not in skip:
            out.append(s)
        s += 1
    return out


def injection_active(schedule: RunSchedule, sigma: float, start: float) -> bool:
    """Whether prior noise is injected at an evaluation at ``sigma``: from ``start`` percent of
    denoising on, inclusive (paper: t/1000 < 0.5, i.e. the second half of the model's time)."""
    return sigma <= schedule.sigma_at(start) * (1.0 + 1e-4)


def injection_delta(z_T: torch.Tensor, strength: float, input_scale: float) -> torch.Tensor:
    """The sampler-space increment for one injection.

    The paper adds ``strength * z_T`` to the latent the network is fed (diffusers' DDIM latent,
    variance-preserving).  ComfyUI samplers carry ``x`` with ``model_input = x * input_scale``
    (``input_scale = 1 / sqrt(sigma^2 + 1)`` for eps/v models, ``model_sampling.calculate_input``),
    so the same shift of the model input is ``strength * z_T / input_scale`` in sampler space.
    ``z_T`` is the run's initial unit-variance noise (what diffusers' DDIM starts from, since its
    init noise sigma is 1).
    """
    return z_T * (float(strength) / float(input_scale))


def control_branches(conds) -> Optional[list]:
    """The conditioning uuids of a calc_cond_batch cond list whose ControlNet could be skipped (every
    entry keyed by uuid, no area or default conds), or None (no ControlNet, or not that simple)."""
    dicts = [d for c in conds if c is not None for d in c]
    if not any(d.get("control") is not None for d in dicts):
        return None
    if any("area" in d or "default" in d or "uuid" not in d for d in dicts):
        return None
    return [d["uuid"] for d in dicts]


def without_control(conds) -> list:
    """The cond list with every ControlNet removed (the model then runs without its residuals)."""
    return [None if c is None else [{k: v for k, v in d.items() if k != "control"} for d in c] for c in conds]


@dataclass
class InjectionSteps:
    """Which model evaluation of a run takes the prior-noise shift: the first evaluation of each schedule
    step inside the window -- and, once a sampler shows it visits a sigma twice (heun-type: the first visit
    is a predictor point, the second the sampler's state), the second visit; a shift already given to a
    predictor point is moved (``moved_from_predictor``)."""
    injected: set = field(default_factory=set)
    last_step: Optional[int] = None
    multistage: bool = False
    moved_from_predictor: int = 0

    def wants(self, step: int, active: bool) -> bool:
        """Visit ``step`` (an on-schedule evaluation); True when this evaluation should be shifted."""
        second_visit = self.last_step == step
        self.last_step = step
        if second_visit and not self.multistage:
            self.multistage = True
            if step in self.injected:
                self.injected.discard(step)
                self.moved_from_predictor += 1
        if self.multistage and not second_visit:
            return False
        return active and step not in self.injected

    def done(self, step: int) -> None:
        self.injected.add(step)


def repeat_batch(t: Optional[torch.Tensor], k: int) -> Optional[torch.Tensor]:
    """``k`` copies of a batch, step-major: [b0, b1, ..., b0, b1, ...]."""
    if t is None or k == 1:
        return t
    return torch.cat([t] * k, dim=0)


def _slice(t: torch.Tensor, i: int, per: int) -> torch.Tensor:
    return t[i * per:(i + 1) * per]


@dataclass
class Features:
    """What one key-step model call kept: the decoder's inputs.

    ``mid``: the middle-block output as the first output block received it; ``skips[i]``: the
    skip tensor output block ``i`` concatenated (popped order); ``meta``: anything the decoder pass
    needs to restore (e.g. the transformer index reached after the middle block).
    """
    branches: tuple            # branch ids (cond uuids) of the call, in batch order
    per: int                   # batch items per branch
    mid: torch.Tensor
    skips: list
    step: int
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.mid) + sum(tensor_bytes(s) for s in self.skips)

    def tensors(self) -> list:
        return [self.mid] + list(self.skips)


class FeatureCache:
    """Latest captured features per branch; an entry is freed when no branch points to it."""

    def __init__(self):
        self._by_branch: dict[Hashable, tuple[Features, int]] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.puts = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, branch) -> bool:
        return branch in self._by_branch

    def step_of(self, branch) -> Optional[int]:
        item = self._by_branch.get(branch)
        return None if item is None else item[0].step

    def _entries(self) -> list:
        seen = {}
        for f, _ in self._by_branch.values():
            seen[id(f)] = f
        return list(seen.values())

    def _recount(self) -> None:
        self.bytes = sum(f.nbytes for f in self._entries())
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def put(self, feats: Features) -> None:
        for i, b in enumerate(feats.branches):
            self._by_branch[b] = (feats, i)
        self.puts += 1
        self._recount()

    def covers(self, branches: Sequence, per: int, shape: Sequence[int]) -> bool:
        """Whether every branch has features made from a batch with ``per`` items per branch and the
        same spatial size (``shape`` is the calling batch's shape; channels are not compared so the
        sampler's latent and the model's input, which may carry concatenated channels, both work)."""
        for b in branches:
            item = self._by_branch.get(b)
            if item is None:
                return False
            f = item[0]
            if f.per != per or tuple(f.meta.get("x_shape", ())[2:]) != tuple(shape[2:]):
                return False
        return True

    def lookup(self, branches: Sequence, per: int, shape: Sequence[int]) -> Optional[tuple]:
        """(mid, skips, meta) for a call batching ``branches`` (``per`` items each), or None.

        When the call's composition is the one an entry was captured with, its tensors are used as
        they are; otherwise they are assembled from per-branch slices (a concatenation).
        """
        if not branches or not self.covers(branches, per, shape):
            self.misses += 1
            return None
        self.hits += 1
        items = [self._by_branch[b] for b in branches]
        first = items[0][0]
        if all(f is first for f, _ in items) and tuple(branches) == first.branches:
            return first.mid, list(first.skips), first.meta
        mid = torch.cat([_slice(f.mid, i, per) for f, i in items], dim=0)
        skips = [torch.cat([_slice(f.skips[j], i, per) for f, i in items], dim=0)
                 for j in range(len(first.skips))]
        return mid, skips, first.meta

    def clear(self) -> None:
        self._by_branch.clear()
        self.bytes = 0


class OutputCache:
    """Decoder outputs computed ahead of their step (parallel decoding), per (step, branch)."""

    def __init__(self):
        self._items: dict[int, dict[Hashable, torch.Tensor]] = {}
        self.bytes = 0
        self.peak_bytes = 0

    def put(self, step: int, branches: Sequence, per: int, out: torch.Tensor) -> None:
        d = self._items.setdefault(step, {})
        for i, b in enumerate(branches):
            old = d.get(b)
            if old is not None:
                self.bytes -= tensor_bytes(old)
            d[b] = _slice(out, i, per)
            self.bytes += tensor_bytes(d[b])
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def has(self, step: int, branches: Sequence) -> bool:
        d = self._items.get(step)
        return d is not None and all(b in d for b in branches)

    def steps(self) -> list[int]:
        return sorted(self._items)

    def get(self, step: int, branches: Sequence, per: int) -> Optional[torch.Tensor]:
        """The output for a call batching ``branches`` at ``step`` (kept: heun evaluates a sigma
        twice), or None."""
        d = self._items.get(step)
        if d is None or not all(b in d for b in branches):
            return None
        parts = [d[b] for b in branches]
        if any(p.shape[0] != per for p in parts):
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def drop_before(self, step: int) -> None:
        for s in [s for s in self._items if s < step]:
            self._drop(s)

    def invalidate(self, branches: Iterable) -> None:
        """Forget the outputs of branches whose features were replaced."""
        branches = set(branches)
        for s in list(self._items):
            d = self._items[s]
            for b in [b for b in d if b in branches]:
                self.bytes -= tensor_bytes(d.pop(b))
            if not d:
                del self._items[s]

    def _drop(self, step: int) -> None:
        for t in self._items.pop(step, {}).values():
            self.bytes -= tensor_bytes(t)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


# ------------------------------------------------------------------------------------------------
# DiTs (issue 15): the front blocks as the "encoder", propagated as a residual
# ------------------------------------------------------------------------------------------------
# The paper's DiT experiment (arXiv 2312.09608 v2): the first 18 of DiT-XL's 28 blocks are the "encoder".
PAPER_DIT_FRONT = 18 / 28


def front_blocks(total: int, fraction: float) -> int:
    """How many of a DiT's ``total`` blocks (forward order) form the propagated front range:
    ``round(fraction * total)``, at least 1 and at most ``total - 1`` (a rear block always runs)."""
    if total < 2:
        return 0
    return max(1, min(total - 1, int(round(float(fraction) * total))))


# DiT defaults (issue 21; docs/dit-defaults.md): Delta-DiT caches the front blocks only in the late stage of
# sampling (arXiv 2406.01125, Sec. 4), with a refresh interval N = 2 (its mild setting; FORA uses N = 3) and,
# like DBCache / EasyCache, a warm-up of full steps.  Key steps are *added* to the chosen schedule: every step
# before DIT_WARMUP and every DIT_EVERY-th step from it on.
DIT_WARMUP = 0.5
DIT_EVERY = 2


def warmup_keys(schedule: RunSchedule, warmup: float, every: int) -> set[int]:
    """Key steps a DiT run adds to its schedule: every step before ``warmup`` percent of denoising and, from the
    first step at or past it, every ``every``-th step (0: none).  ``warmup`` 0 and ``every`` 0 add nothing."""
    total = schedule.total_steps
    if warmup <= 0.0:
        first = 0
    else:
        at = percents_to_steps([warmup], schedule)
        first = at[0] if at else total
    out = set(range(first))
    if every > 0:
        out |= set(range(first, total, every))
    return out


class DeltaCache:
    """The residual the front blocks added at the last key step, per conditioning branch and stream
    (``{"img": [per, L, C], "txt": ...}`` or, when the front range ends inside Flux's single blocks,
    ``{"cat": ...}``).  A later call is served when every branch it batches has residuals of the same
    shapes, in whatever order or split (entries sliced per branch)."""

    def __init__(self):
        self._items: dict = {}          # uuid -> (per, {stream: tensor}, step)
        self.bytes = 0
        self.peak_bytes = 0

    def put(self, uuids: Sequence, per: int, streams: dict, step: int) -> None:
        for i, u in enumerate(uuids):
            old = self._items.pop(u, None)
            if old is not None:
                self.bytes -= sum(tensor_bytes(t) for t in old[1].values())
            part = {k: v[i * per:(i + 1) * per].detach().clone() for k, v in streams.items()}
            self._items[u] = (per, part, step)
            self.bytes += sum(tensor_bytes(t) for t in part.values())
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def get(self, uuids: Sequence, per: int, shapes: dict) -> Optional[dict]:
        """``{stream: residual for the whole batch}`` when every branch is cached with these per-branch
        shapes (``shapes[stream]`` = shape of one branch's slice), else None."""
        found = []
        for u in uuids:
            item = self._items.get(u)
            if item is None or item[0] != per or set(item[1]) != set(shapes):
                return None
            if any(tuple(item[1][k].shape) != tuple(s) for k, s in shapes.items()):
                return None
            found.append(item[1])
        if not found:
            return None
        return {k: torch.cat([f[k] for f in found], dim=0) if len(found) > 1 else found[0][k] for k in shapes}

    def steps(self) -> set:
        return {v[2] for v in self._items.values()}

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


__all__ = ["PAPER_KEY_STEPS_50", "PAPER_STEPS", "PAPER_INJECTION", "PAPER_INJECTION_START", "SCHEDULES", "SCHEDULE_LABELS",
           "paper_key_percents", "every_k_steps", "key_steps", "plan_parallel", "injection_active",
           "injection_delta", "control_branches", "without_control", "InjectionSteps", "repeat_batch", "Features", "FeatureCache", "OutputCache",
           "PAPER_DIT_FRONT", "front_blocks", "DIT_WARMUP", "DIT_EVERY", "warmup_keys", "DeltaCache"]
