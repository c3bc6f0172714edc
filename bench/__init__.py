"""FreeSpeed benchmark (``make bench`` = ``python -m bench``).

Modules: :mod:`bench.host` (find ComfyUI, import the pack as ``comfyui_freespeed``),
:mod:`bench.models` (full-size SD1.5 / SDXL with random weights, tiny test models),
:mod:`bench.instrument` (attention-kernel override + timers), :mod:`bench.timing` (interleaved
repeats, ratios, the ideal ratio), :mod:`bench.techniques` (what can be measured),
:mod:`bench.speed` (the speed comparison), :mod:`bench.report` (table, JSON, markdown) and
:mod:`bench.__main__` (the CLI).  Nothing here imports ComfyUI at package import time.
"""
