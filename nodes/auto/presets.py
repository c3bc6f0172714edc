"""FreeSpeed Auto presets in ComfyUI's user directory: ``<user dir>/freespeed/<name>.json`` (validation of
names and documents: ``core.auto``)."""
from __future__ import annotations

import json
import os

from ...core import auto as A

SUBDIR = "freespeed"


def preset_dir() -> str:
    import folder_paths
    return os.path.join(folder_paths.get_user_directory(), SUBDIR)


def preset_path(name: str) -> str:
    return os.path.join(preset_dir(), A.check_preset_name(name) + ".json")


def list_presets() -> list[str]:
    d = preset_dir()
    if not os.path.isdir(d):
        return []
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json") and os.path.isfile(os.path.join(d, f)))


def check_free(name: str) -> str:
    """The path a new preset ``name`` would be written to; an error if the name is bad or already taken
    (checked before a search, so a long search never ends in a refused save)."""
    path = preset_path(name)
    if os.path.exists(path):
        raise ValueError(f"FreeSpeed preset {name!r} already exists ({path}): choose another save_as name or "
                         "delete the file first (presets are never overwritten)")
    return path


def save_preset(name: str, doc: dict) -> str:
    """Write a new preset (never overwriting one): the JSON is built before the file is created."""
    path = check_free(name)
    text = json.dumps(doc, indent=2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ValueError(f"FreeSpeed preset {name!r} was created meanwhile ({path}); not overwritten") from None
    return path


def load_preset(name: str) -> dict:
    path = preset_path(name)
    if not os.path.isfile(path):
        saved = ", ".join(list_presets()) or "none"
        raise ValueError(f"FreeSpeed preset {name!r} not found in {preset_dir()} (saved presets: {saved})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"FreeSpeed preset {name!r} ({path}) is corrupt: {e}") from None


__all__ = ["SUBDIR", "preset_dir", "preset_path", "list_presets", "check_free", "save_preset", "load_preset"]
