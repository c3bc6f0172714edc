"""FreeSpeed Auto (search on the user's model) and FreeSpeed Preset (apply a saved winner)."""
from .node import AutoNode, PresetNode

__all__ = ["AutoNode", "PresetNode"]
