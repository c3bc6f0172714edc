"""Shared host-test fixtures: tiny real models with peaked attention (q/k init raised: random weights at the
usual init give nearly uniform attention, so every approximation would look free)."""
from __future__ import annotations

import os

import pytest

from bench.host import find_host

# what the root conftest computes, for host tests that `from conftest import` it (this file shadows it here)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = find_host()[0]

from tiny import tiny_sd15, tiny_sdxl


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15(qk_std=0.3)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(qk_std=0.3)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A temporary ComfyUI ``loras`` folder (for ``LoraLoaderModelOnly``), removed from the search paths after."""
    import folder_paths
    d = str(tmp_path_factory.mktemp("loras"))
    saved = folder_paths.folder_names_and_paths.get("loras")
    saved = (list(saved[0]), set(saved[1])) if saved else None
    folder_paths.add_model_folder_path("loras", d)
    yield d
    if saved is not None:
        folder_paths.folder_names_and_paths["loras"] = saved
