"""FreeSpeed -- training-free diffusion acceleration nodes for ComfyUI.

ComfyUI loads this package from ``custom_nodes/``; the V3 entry point below returns the extension
that lists the nodes.  Nothing ComfyUI-specific is imported at package import time, so the pure
torch ``core`` package can be imported and tested without a ComfyUI host.
"""
WEB_DIRECTORY = "./web"
__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import FreeSpeedExtension
    return FreeSpeedExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
