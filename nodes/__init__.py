"""FreeSpeed nodes: thin V3 nodes over the site layer (sites.py), the technique base (hooks.py) and the
pure-torch core; one node file per technique, listed once in ``core.techniques``."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.v0_0_2 import ComfyExtension, io

from .routes import register_with_server
from .auto import AutoNode, PresetNode
from .benchmark import BenchmarkNode
from .registry import node_classes

NODES: list[type[io.ComfyNode]] = [*node_classes(), BenchmarkNode, AutoNode, PresetNode]
register_with_server()          # the schedule preview route, when a ComfyUI server is running


class FreeSpeedExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
