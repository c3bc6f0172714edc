"""FreeSpeed benchmark (``make bench`` = ``python -m bench``).

Modules: :mod:`bench.host` (find ComfyUI, import the pack as ``comfyui_freespeed``),
:mod:`bench.models` (full-size SD1.5 / SDXL with random weights, tiny test models),
:mod:`bench.instrument` (attention-kernel override + timers), :mod:`bench.timing` (the ideal
ratio), :mod:`bench.speed` (ToDo's kernel measurement), :mod:`bench.suite` (``make bench``),
:mod:`bench.case_sampling` (whole runs, paper settings), :mod:`bench.report` / :mod:`bench.suite_report`
and :mod:`bench.__main__` (the CLI).  Rounds, ratios and the fewer-steps rule are the pack's own
(``comfyui_freespeed.core.measure``).  Nothing here imports ComfyUI at package import time; the pack is
registered as ``comfyui_freespeed`` (pure import, no ComfyUI).
"""
from .host import register_package

register_package()
