"""Counted FLOPs: a machine-independent cost axis (pure torch).

PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode` counts what a callable executes at the
ATen level (convolutions, matmuls, attention), whatever module or hook issued the op -- so a whole
``comfy.sample.sample`` call is counted with every patch, wrapper and FreeSpeed overhead (explicit
attention maps, PageRank iterations, gathers: they are matmuls/bmm like any other).

torch ships formulas for the CUDA attention kernels (flash, efficient, cuDNN) but not for every kernel
``scaled_dot_product_attention`` can dispatch to: on CPU it runs ``_scaled_dot_product_flash_attention_for_cpu``
which would count **0**.  This module registers the missing ones with torch's own
``register_flop_formula`` and the same ``sdpa_flop_count`` (2·B·H·Lq·Lk·(Dqk + Dv), softmax not counted,
as for the matmul paths ``attention_basic`` / ``sub_quad`` / ``split``, which reach ``bmm`` / ``baddbmm``).
Attention ops that still have no formula are reported by :func:`count_flops_detailed` (``uncounted``),
never silently.

API: ``count_flops(fn, *args, **kwargs) -> (result, flops)``; ``count_flops_detailed`` also returns the
per-op counts and the names of attention-like ops that had no formula; ``counting()`` is the context
manager both use.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _blhd_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Kernels taking (B, L, H, D) tensors (the ``flash_attn`` package layout)."""
    def t(s):
        return (s[0], s[2], s[1], s[3])
    return _fc.sdpa_flop_count(t(query_shape), t(key_shape), t(value_shape))


# (op name, formula): forward and backward kernels with the (B, H, L, D) argument order of SDPA
_ATEN_FORMULAS = (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward),
    ("_scaled_dot_product_fused_attention_overrideable", _sdpa_forward),
    ("_scaled_dot_product_fused_attention_overrideable_backward", _sdpa_backward),
    ("_scaled_dot_product_efficient_attention", _sdpa_forward),
    ("_scaled_dot_product_flash_attention", _sdpa_forward),
    ("_scaled_dot_product_cudnn_attention", _sdpa_forward),
)
# custom ops a host may define (looked up at count time): ComfyUI's wrapper of the flash_attn package
_CUSTOM_FORMULAS = (
    (("flash_attention", "flash_attn"), _blhd_attention),
)


def _register(packet, formula) -> None:
    if packet not in _fc.flop_registry:
        _fc.register_flop_formula(packet)(formula)


def register_attention_formulas() -> None:
    """Register a FLOP formula for every attention kernel this torch (and host) has without one.
    Idempotent; kernels that torch already counts are left to torch's formula."""
    for name, formula in _ATEN_FORMULAS:
        packet = getattr(aten, name, None)
        if packet is not None:
            _register(packet, formula)
    for (ns, name), formula in _CUSTOM_FORMULAS:
        try:
            packet = getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            continue
        _register(packet, formula)


def _looks_like_attention(name: str) -> bool:
    n = name.lower()
    return "attention" in n or "attn" in n or n.startswith("xformers") or "sage" in n


def _decomposes(func) -> bool:
    """A composite op (e.g. ``aten.scaled_dot_product_attention`` seen under inference mode): its
    decomposition into counted kernels is what runs, so it is not uncounted itself."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
    except (AttributeError, RuntimeError):
        return False


class _Uncounted(TorchDispatchMode):
    """Notes the attention-like ops that ran without a FLOP formula (so a count is never silently low)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", func)
        if packet not in _fc.flop_registry and _looks_like_attention(str(packet)) and not _decomposes(func):
            self.names.add(str(packet))
        return func(*args, **(kwargs or {}))


@dataclass
class FlopCount:
    """What :func:`counting` counted: ``total`` FLOPs, per-op counts and uncounted attention ops."""
    total: int = 0
    by_op: dict = field(default_factory=dict)
    uncounted: list = field(default_factory=list)


@contextlib.contextmanager
def counting() -> Iterator[FlopCount]:
    """Count the FLOPs of everything run inside the block; the yielded :class:`FlopCount` is filled on exit."""
    register_attention_formulas()
    out = FlopCount()
    watch = _Uncounted()
    mode = _fc.FlopCounterMode(display=False)
    try:
        with mode, watch:
            yield out
    finally:
        out.total = int(mode.get_total_flops())
        out.by_op = {str(op): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}
        out.uncounted = sorted(watch.names)


def count_flops_detailed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, FlopCount]:
    """``fn(*args, **kwargs)`` under the counter: (its result, :class:`FlopCount`)."""
    with counting() as c:
        result = fn(*args, **kwargs)
    return result, c


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
    """``fn(*args, **kwargs)`` under the counter: (its result, the FLOPs it executed)."""
    result, c = count_flops_detailed(fn, *args, **kwargs)
    return result, c.total


__all__ = ["register_attention_formulas", "FlopCount", "counting", "count_flops", "count_flops_detailed"]
