"""Instruments installed on the models the bench runs.

:class:`Instrument` is one object per measured ModelPatcher clone with two jobs:

* **kernel choice and attention timing** — it is the clone's
  ``transformer_options["optimized_attention_override"]``.  ComfyUI's ``wrap_attn`` calls it as
  ``override(func, q, k, v, heads, *args, **kwargs)`` for every attention call that carries
  ``transformer_options``; it runs the chosen kernel (``comfy.ldm.modules.attention.attention_pytorch``
  = SDPA, ``attention_sub_quad`` = ComfyUI's CPU default) instead of ``func``, with the kwargs passed
  through unchanged (they hold ``_inside_attn_wrapper=True``, so the decorated kernel runs its body
  instead of re-entering the override).  When recording, each call is timed with ``perf_counter``
  (after a device sync on CUDA) and labelled with its UNet block, its depth index in the block and
  whether it is self-attention (attn1) or cross-attention (attn2): every BasicTransformerBlock calls
  attn1 then attn2, so the n-th call of a (block, block_index) in one forward tells them apart.
* **model time** — a DIFFUSION_MODEL wrapper that times each UNet forward (what one model
  evaluation of the sampler costs: batch 2 = cond + uncond with CFG) and notes its batch size.

Only the calls are timed, never the Python around them; on CPU the timing costs microseconds per call
(32 calls per SD1.5 forward), on CUDA the syncs do perturb, so the runner records attention in
separate profiling runs there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import comfy.patcher_extension as pe

KEY = "freespeed.bench"


@dataclass
class AttnCall:
    block: Optional[tuple]       # ("input", 1) ...; None when the call carried no block label
    block_index: int             # depth index inside the SpatialTransformer
    kind: str                    # "self" | "cross"
    q_tokens: int
    k_tokens: int
    seconds: float


@dataclass
class Forward:
    """One UNet forward: its time, batch and attention calls."""
    seconds: float = 0.0
    batch: int = 0
    calls: list = field(default_factory=list)

    @property
    def attention_s(self) -> float:
        return sum(c.seconds for c in self.calls)

    def selected_s(self, select: Callable[[AttnCall], bool]) -> float:
        return sum(c.seconds for c in self.calls if select(c))


def kernel_function(name: str) -> Callable:
    """ComfyUI's attention kernel by bench name (``pytorch`` = SDPA, ``sub_quad``, ``split``, ``basic``)."""
    import comfy.ldm.modules.attention as attention
    table = {"pytorch": attention.attention_pytorch, "sub_quad": attention.attention_sub_quad,
             "split": attention.attention_split, "basic": attention.attention_basic}
    if name not in table:
        raise ValueError(f"unknown attention kernel {name!r}; expected one of {', '.join(table)}")
    return table[name]


class Instrument:
    """Attention override + forward timer for one ModelPatcher clone (see the module docstring)."""

    def __init__(self, kernel: Optional[str], sync: Optional[Callable[[], None]] = None,
                 record_attention: bool = True):
        self.kernel_name = kernel
        self.kernel = kernel_function(kernel) if kernel else None
        self.sync = sync
        self.record_attention = record_attention
        self.forwards: list[Forward] = []
        self.kernel_calls: dict[str, int] = {}     # which function actually ran, by __name__
        self._current: Optional[Forward] = None
        self._seen: dict[tuple, int] = {}
        self.prev: Optional[Callable] = None

    # clones deep-copy model_options: every clone keeps pointing at this one instrument
    def __deepcopy__(self, memo):
        return self

    def install(self, model) -> None:
        """Set this instrument as ``model``'s attention override and forward wrapper (in place)."""
        to = model.model_options.setdefault("transformer_options", {})
        prev = to.get("optimized_attention_override")
        # an override already set (the DiT paths of the FreeSpeed nodes chain theirs) runs inside this one
        self.prev = prev if prev is not self else None
        to["optimized_attention_override"] = self
        model.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY)
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, self.diffusion_model_wrapper)

    def reset(self) -> None:
        self.forwards = []
        self.kernel_calls = {}

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    # -- DIFFUSION_MODEL wrapper: one UNet forward -------------------------------------------------
    def diffusion_model_wrapper(self, executor, x, *args, **kwargs):
        fwd = Forward(batch=int(x.shape[0]))
        self._current, self._seen = fwd, {}
        t0 = self._now()
        try:
            return executor(x, *args, **kwargs)
        finally:
            fwd.seconds = self._now() - t0
            self._current = None
            self.forwards.append(fwd)

    # -- optimized_attention_override ---------------------------------------------------------------
    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        fn = self.kernel if self.kernel is not None else func
        name = getattr(fn, "__name__", repr(fn))
        if self.prev is not None:
            prev, kernel = self.prev, fn
            fn = lambda *a, **kw: prev(kernel, *a, **kw)  # noqa: E731
        self.kernel_calls[name] = self.kernel_calls.get(name, 0) + 1
        fwd = self._current
        if fwd is None or not self.record_attention:
            return fn(q, k, v, heads, *args, **kwargs)
        to = kwargs.get("transformer_options") or {}
        block = to.get("block")
        block = tuple(block[:2]) if block is not None else None
        index = int(to.get("block_index", 0))
        key = (block, index)
        nth = self._seen.get(key, 0)
        self._seen[key] = nth + 1
        skip = kwargs.get("skip_reshape", False)
        nq = int(q.shape[-2] if skip else q.shape[1])
        nk = int(k.shape[-2] if skip else k.shape[1])
        t0 = self._now()
        out = fn(q, k, v, heads, *args, **kwargs)
        secs = self._now() - t0
        fwd.calls.append(AttnCall(block, index, "self" if nth % 2 == 0 else "cross", nq, nk, secs))
        return out


def count_attention_modules(diffusion_model) -> int:
    """How many attention calls one forward makes (one per CrossAttention module)."""
    return sum(1 for m in diffusion_model.modules() if type(m).__name__ == "CrossAttention")
