"""Import set-up shared by the bench: find the ComfyUI host and register this repo as a package.

The bench imports the pack exactly like the tests do: the repository root is registered as the
package ``comfyui_freespeed`` (so the pack's relative imports work from a plain checkout), and the
ComfyUI host is looked for at ``$COMFYUI_PATH``, ``~/comfy/ComfyUI`` and the ComfyUI this pack is
installed in (``ComfyUI/custom_nodes/<pack>`` → ``../..``).

ComfyUI reads its command-line flags at import time: ``comfy.cli_args.args`` must be set
(``cpu``, ``use_pytorch_cross_attention``) *before* ``comfy.model_management`` is imported, so
:func:`setup` is called once, first, by the CLI, before anything from ``comfy`` is imported.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "comfyui_freespeed"


def host_candidates(env: Optional[dict] = None) -> list[tuple[str, str]]:
    """(label, path) of every place a ComfyUI host is looked for, in order."""
    env = os.environ if env is None else env
    out = [("$COMFYUI_PATH", env.get("COMFYUI_PATH") or "unset")]      # "unset" is listed, never a host
    out.append(("~/comfy/ComfyUI", os.path.expanduser("~/comfy/ComfyUI")))
    out.append(("the ComfyUI this pack is installed in", os.path.dirname(os.path.dirname(REPO))))
    return out


def is_host(path: str) -> bool:
    return path != "unset" and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")) and os.path.isfile(
        os.path.join(path, "nodes.py"))


def find_host() -> tuple[Optional[str], str]:
    """(host path or None, a description of where we looked)."""
    looked = []
    for label, path in host_candidates():
        looked.append(f"{label} ({path})")
        if is_host(path):
            return os.path.abspath(path), ""
    return None, "; ".join(looked)


def register_package() -> None:
    """Make the repository importable as ``comfyui_freespeed`` (idempotent)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = mod
    spec.loader.exec_module(mod)


class HostNotFound(RuntimeError):
    pass


def add_to_path(host: str) -> None:
    """Put the host on ``sys.path`` and, as its main.py does, import its ``utils`` package before
    nodes.py puts ``comfy/`` on ``sys.path`` (else a later ``import utils.x`` finds comfy/utils.py)."""
    if host not in sys.path:
        sys.path.insert(0, host)
    import importlib
    for name in ("utils.install_util", "utils.json_util"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def setup(device: str = "cpu", pytorch_attention: bool = False) -> str:
    """Find the host, put it on sys.path, set ComfyUI's flags and register the pack.

    ``device == "cpu"`` sets ``args.cpu`` (``--cpu``); ``pytorch_attention`` sets
    ``--use-pytorch-cross-attention``.  Both only take effect if ``comfy.model_management`` has not
    been imported yet (inside pytest the conftest has already done it with ``args.cpu = True``);
    the bench does not rely on the global kernel choice anyway, it chooses the kernel per model
    through ``optimized_attention_override``.
    """
    host, looked = find_host()
    if host is None:
        raise HostNotFound(f"no ComfyUI host found (looked at: {looked}); set COMFYUI_PATH")
    add_to_path(host)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args  # parses nothing: comfy.options.args_parsing is False
        if device == "cpu":
            args.cpu = True
        if pytorch_attention:
            args.use_pytorch_cross_attention = True
    register_package()
    return host
