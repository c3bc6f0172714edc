"""FreeSpeed nodes: thin V3 nodes over the shared hook layer (hooks.py) and the pure-torch core."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.v0_0_2 import ComfyExtension, io

from .atedm import ATEDMNode
from .benchmark import BenchmarkNode
from .encoder_propagation import EncoderPropagationNode
from .mapreuse import MapReuseNode, MapReuseSearchNode
from .tgate import TGateNode
from .todo import ToDoNode

NODES: list[type[io.ComfyNode]] = [ToDoNode, TGateNode, EncoderPropagationNode, MapReuseNode, MapReuseSearchNode,
                                   ATEDMNode, BenchmarkNode]


class FreeSpeedExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
