"""Per-run cache store shared by the caching techniques (T-GATE, map reuse, encoder propagation).

One store lives for one sampling run (the hook layer creates it in its OUTER_SAMPLE wrapper and
drops it at the end), so nothing cached in one run can leak into the next.

A key names what makes two tensors interchangeable: the site, the conditioning branch (a tensor
made for the uncond branch is never served to the cond branch), the batch composition or token
counts where they matter.  The store enforces a byte budget: a ``put`` that would exceed it is refused (counted in
``rejected``) rather than evicting, because a technique that cannot cache a layer must fall back
to computing that layer -- silently evicting would turn into a miss at an unpredictable later
point.  Optional CPU offload keeps the cached copies in host memory (pinned when the source is on
CUDA) and moves them back on ``get``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Optional

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    rejected: int = 0          # puts refused by the byte budget
    bytes: int = 0             # bytes held now
    peak_bytes: int = 0        # most bytes held at once during the run

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "puts": self.puts, "rejected": self.rejected,
                "bytes": self.bytes, "peak_bytes": self.peak_bytes}


@dataclass
class CacheStore:
    """A byte-bounded dict of tensors with hit/miss accounting.

    ``budget_bytes`` <= 0 means unbounded.  ``offload`` keeps entries on the CPU.
    """
    budget_bytes: int = 0
    offload: bool = False
    stats: CacheStats = field(default_factory=CacheStats)
    _items: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def fits(self, nbytes: int, key=None) -> bool:
        held = self.stats.bytes - (tensor_bytes(self._items[key][0]) if key in self._items else 0)
        return self.budget_bytes <= 0 or held + nbytes <= self.budget_bytes

    def put(self, key, value: torch.Tensor) -> bool:
        """Store ``value`` (detached; copied when offloading).  False if the budget refuses it."""
        nbytes = tensor_bytes(value)
        if not self.fits(nbytes, key):
            self.stats.rejected += 1
            return False
        device = value.device
        if self.offload and value.device.type != "cpu":
            stored = torch.empty(value.shape, dtype=value.dtype, device="cpu",
                                 pin_memory=value.device.type == "cuda")
            stored.copy_(value.detach(), non_blocking=True)
        else:
            stored = value.detach()
        if key in self._items:
            self.stats.bytes -= tensor_bytes(self._items[key][0])
        self._items[key] = (stored, device)
        self.stats.puts += 1
        self.stats.bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)
        return True

    def get(self, key, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        """The cached tensor (on ``device``, default where it came from), or None (a miss)."""
        item = self._items.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        stored, origin = item
        target = device if device is not None else origin
        if stored.device != torch.device(target):
            return stored.to(target, non_blocking=True)
        return stored

    def pop(self, key) -> Optional[torch.Tensor]:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.stats.bytes -= tensor_bytes(item[0])
        return item[0]

    def keys(self):
        return list(self._items.keys())

    def clear(self) -> None:
        self._items.clear()
        self.stats.bytes = 0


class BranchAccumulator:
    """Per-site sums of each conditioning branch's output over one capture round, reduced at first use
    to the mean of the branch means (T-GATE's cached cross-attention, arXiv 2404.02747 Sec. 3).

    A capture round is one main model evaluation (``round_id``); its cond and uncond chunks may arrive
    in one call or in several (low memory, area conds), so chunks of the same round and branch are
    summed, and a newer round replaces an older one.  The tensors live in a :class:`CacheStore`
    (its byte budget and offload apply); a refused put drops that branch.
    """

    def __init__(self, store: CacheStore):
        self.store = store
        self._parts: dict = {}          # (site, role) -> (round id, chunk count)
        self._latest: dict = {}         # site -> round id of its latest capture
        self.latest_round = None        # round id of the latest capture at any site

    def add(self, site: Hashable, round_id: Hashable, parts: Iterable[tuple[Hashable, torch.Tensor]]) -> None:
        store = self.store
        if self._latest.get(site) != round_id:          # a newer round replaces the old one
            for (s, role) in [k for k in self._parts if k[0] == site]:
                store.pop(("part", s, role))
                self._parts.pop((s, role), None)
            store.pop(("mean", site))
            self._latest[site] = round_id
        for role, chunk in parts:
            key = ("part", site, role)
            meta = self._parts.get((site, role))
            chunk = chunk.detach()
            if meta is not None and meta[0] == round_id:
                prev = store.pop(key)
                if prev is None:
                    continue
                value, n = prev.to(chunk.device) + chunk, meta[1] + 1
            else:
                value, n = chunk.clone(), 1
            if store.put(key, value):
                self._parts[(site, role)] = (round_id, n)
                self.latest_round = round_id
            else:
                self._parts.pop((site, role), None)

    def has(self, site: Hashable) -> bool:
        return ("mean", site) in self.store or any(k[0] == site for k in self._parts)

    def mean(self, site: Hashable, device=None, reduce=None) -> Optional[torch.Tensor]:
        """The site's branch mean (``reduce`` maps {role: (sum, count)} to it), or None."""
        store = self.store
        key = ("mean", site)
        if key not in store:
            parts = {}
            for (s, role) in [k for k in self._parts if k[0] == site]:
                meta = self._parts.pop((s, role))
                t = store.pop(("part", s, role))
                if t is not None:
                    parts[role] = (t.to(device) if device is not None else t, meta[1])
            if not parts or not store.put(key, reduce(parts)):
                return None
        return store.get(key, device=device)


__all__ = ["tensor_bytes", "CacheStats", "CacheStore", "BranchAccumulator"]
