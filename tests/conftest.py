"""Test set-up: import the pack as ``comfyui_freespeed`` and find a ComfyUI host for tests/host.

The host is looked for, in order, at ``$COMFYUI_PATH``, ``~/comfy/ComfyUI`` (comfy-cli's default
workspace) and the ComfyUI this pack is installed in (``ComfyUI/custom_nodes/<pack>``).  Without
one, tests/host is not collected and one line says where we looked; tests/core always runs.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# one host search and one package registration for tests and bench (bench/host.py)
from bench.host import add_to_path, find_host, register_package  # noqa: E402

HOST, LOOKED = find_host()
register_package()

if HOST is not None:
    add_to_path(HOST)
    from comfy.cli_args import args  # noqa: E402  (parses nothing: args_parsing is False)
    args.cpu = True                   # must be set before comfy.model_management is imported
    if os.environ.get("FREESPEED_ATTENTION") == "pytorch":
        args.use_pytorch_cross_attention = True

HOST_SKIP_LINE = f"FreeSpeed: no ComfyUI host found, tests/host skipped (looked at: {LOOKED})"


def pytest_ignore_collect(collection_path, config):
    if HOST is None and "host" in collection_path.parts and REPO in str(collection_path):
        return True
    return None


def pytest_report_header(config):
    return f"FreeSpeed host: {HOST}" if HOST else HOST_SKIP_LINE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if HOST is None:
        terminalreporter.write_line(HOST_SKIP_LINE)
