"""Encoder propagation (Faster Diffusion, Li et al., arXiv 2312.09608): pure-torch pieces.

The paper (Sec. 3.2-3.3) observes that the UNet *encoder* (input blocks + middle block) changes
little between adjacent denoising steps while the decoder changes a lot.  So at *key* steps the
whole UNet runs and the encoder's skip features and middle-block output are kept; at the other
steps only the decoder runs, on those kept features, with the current timestep embedding
("encoder propagation").  Because such a decoder pass does not depend on the current latent, the
decoder passes of several following non-key steps can run as one batch ("parallel", Sec. 3.3).
Prior noise injection (Sec. 3.4) adds a small multiple of the run's initial noise z_T to the
latent at each step of the second half of denoising to restore texture detail.

This module holds what does not need ComfyUI:

* key-step schedules: the paper's DDIM-50 table (``50ls``: steps 0,1,2,3,5,10,15,25,35 of 50)
  as *percents of denoising* (step i of a 50-step run sits at i/50), so the same points of
  denoising are key at any step count; "every k steps"; a custom percent list.  Step 0 is always
  a key step (nothing to propagate yet).
* parallel planning: which following non-key steps to decode together, bounded by
  ``max_parallel``.
* the noise-injection math.
* :class:`FeatureCache` / :class:`OutputCache`: per-branch (per cond uuid) storage of captured
  features and of parallel-decoded outputs.  A model call batches several branches (uncond, cond,
  area conds) in an order ComfyUI chooses per call; entries are stored per call and indexed per
  branch so that a later call with another batch composition (cond and uncond split for memory,
  CFG dropped by another node) is served from slices of them.
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


__all__ = ["PAPER_KEY_STEPS_50", "PAPER_STEPS", "PAPER_INJECTION", "PAPER_INJECTION_START", "SCHEDULES",
           "paper_key_percents", "every_k_steps", "key_steps", "plan_parallel", "injection_active",
           "injection_delta", "repeat_batch", "Features", "FeatureCache", "OutputCache"]
