"""Batch layout of one batched model call: which conditioning branch each chunk of rows is.

ComfyUI batches the conds of one evaluation into one call when it can (``samplers._calc_cond_batch``)
and says, per chunk, which entry of the call's cond list it is (``cond_or_uncond``: 0 = positive,
1 = negative in the standard CFG call, in an order ComfyUI chooses per call) and which
conditioning it carries (``uuids``).  Every technique that keeps something per branch reads the
layout here and never assumes an order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Optional


@dataclass(frozen=True)
class Chunk:
    index: int                 # position of the chunk in the call
    branch: int                # its cond_or_uncond entry (index in the call's cond list)
    uuid: Optional[Hashable]   # its conditioning's uuid, when ComfyUI gave one
    rows: slice                # its rows of the batch


@dataclass(frozen=True)
class BatchLayout:
    branches: tuple            # cond_or_uncond, one entry per chunk
    uuids: tuple               # conditioning uuid per chunk (empty when unknown)
    per: int                   # rows per chunk

    @classmethod
    def from_options(cls, transformer_options: Optional[dict], batch: int) -> "BatchLayout":
        """The layout of a call of ``batch`` rows; a batch the listed chunks do not divide is one chunk."""
        to = transformer_options if isinstance(transformer_options, dict) else {}
        branches = tuple(to.get("cond_or_uncond") or (0,))
        uuids = tuple(to.get("uuids") or ())
        if batch % len(branches):
            branches, uuids = (0,), ()
        return cls(branches, uuids, batch // len(branches))

    @property
    def size(self) -> int:
        return self.per * len(self.branches)

    @property
    def keyed(self) -> bool:
        """Whether every chunk carries its own, distinct conditioning uuid."""
        return len(self.uuids) == len(self.branches) and len(set(self.uuids)) == len(self.uuids)

    def chunks(self) -> list[Chunk]:
        return [Chunk(i, b, self.uuids[i] if i < len(self.uuids) else None, slice(i * self.per, (i + 1) * self.per))
                for i, b in enumerate(self.branches)]

    def roles(self, roles_by_branch: dict[int, Any]) -> tuple:
        """The role of each chunk (e.g. "cond"/"uncond"), None where the mapping has none."""
        return tuple(roles_by_branch.get(b) for b in self.branches)


def guider_roles(conds, positive, negative, roles=("cond", "uncond")) -> dict:
    """{index in a calc_cond_batch cond list: role} for the entries that *are* the guider's positive and
    negative conds (by identity: a guider that orders its list differently is still read right); a plain
    two-entry ``[cond, uncond]`` list when neither is found (not a CFGGuider)."""
    out = {}
    for i, c in enumerate(conds):
        if c is not None and positive is not None and c is positive:
            out[i] = roles[0]
        elif c is not None and negative is not None and c is negative:
            out[i] = roles[1]
    if not out and len(conds) == 2:
        out = {i: r for i, r in enumerate(roles) if conds[i] is not None}
    return out


__all__ = ["Chunk", "BatchLayout", "guider_roles"]
