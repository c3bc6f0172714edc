"""FreeSpeedToDo through ComfyUI's real graph executor, with the pack loaded the way ComfyUI loads it.

The pack is symlinked into a temporary ``custom_nodes/comfyui-freespeed`` and imported with
``nodes.load_custom_node`` after ``nodes.init_extra_nodes`` (so ComfyUI names the module after its
path and the V3 ``comfy_entrypoint`` registers the nodes).  The graph CheckpointLoaderSimple (a tiny
detectable SD1.5 checkpoint) -> FreeSpeedToDo -> KSampler -> SaveLatent runs in
``execution.PromptExecutor`` with the classic output cache on; latents are read back from the files
SaveLatent wrote.
"""
from __future__ import annotations

import asyncio
import copy
import os
import sys

import pytest
import torch

if "nodes" not in sys.modules:
    # main.py imports the host's ``utils`` package before nodes.py puts ComfyUI/comfy on sys.path (where
    # ``utils`` would resolve to comfy/utils.py and break comfy_extras/nodes_images' ``import server``)
    import utils.install_util  # noqa: F401

import comfy.model_management
import execution
import folder_paths
import nodes

from comfy_graph import (CKPT_ID, PACK_DIR_NAME, SAMPLER_ID, SAVE_ID, TODO_ID, build_prompt, link_checkpoint,
                         read_latent, saved_latent_path, todo_inputs, write_cond_node)
from conftest import REPO


class _Server:
    """Just enough of server.PromptServer for execution.PromptExecutor."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Temp models/output/custom_nodes, the pack and the test node loaded by ComfyUI's loader.
    Global host state touched here (folder paths, output dir, node mappings) is restored afterwards."""
    base = tmp_path_factory.mktemp("freespeed_graph")
    ckpt_dir = base / "models" / "checkpoints"
    custom = base / "custom_nodes"
    out_dir = base / "output"
    out_dir.mkdir()
    link_checkpoint(tmp_path_factory, str(ckpt_dir))
    cond_file = write_cond_node(str(custom))
    pack = custom / PACK_DIR_NAME
    os.symlink(REPO, pack, target_is_directory=True)

    saved_ckpt_paths = list(folder_paths.folder_names_and_paths["checkpoints"][0])
    saved_out = folder_paths.get_output_directory()
    saved_mappings = dict(nodes.NODE_CLASS_MAPPINGS)
    saved_names = dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir), is_default=True)
    folder_paths.set_output_directory(str(out_dir))
    try:
        # built-in extras (comfy_extras/*) not all loaded yet in this process (another test may have loaded some)
        if not {"TomePatchModel", "SaveAnimatedWEBP", "EasyCache", "EmptyHunyuanLatentVideo"} <= set(nodes.NODE_CLASS_MAPPINGS):
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        loaded_pack = asyncio.run(nodes.load_custom_node(str(pack)))
        loaded_cond = asyncio.run(nodes.load_custom_node(cond_file))
        assert loaded_pack, f"nodes.load_custom_node({pack}) failed (see the log above)"
        assert loaded_cond, f"nodes.load_custom_node({cond_file}) failed"
        yield {"base": str(base), "pack": str(pack), "output": str(out_dir)}
    finally:
        folder_paths.folder_names_and_paths["checkpoints"][0][:] = saved_ckpt_paths
        folder_paths.filename_list_cache.pop("checkpoints", None)   # it would still list the temp checkpoint
        folder_paths.set_output_directory(saved_out)
        nodes.NODE_CLASS_MAPPINGS.clear()
        nodes.NODE_CLASS_MAPPINGS.update(saved_mappings)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.clear()
        nodes.NODE_DISPLAY_NAME_MAPPINGS.update(saved_names)
        comfy.model_management.unload_all_models()


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    same = torch.equal(a, b)
    assert same, f"{what}: max |diff| {(a - b).abs().max().item():.3g}"


class Runner:
    """One PromptExecutor (one cache) and the latents its prompts produce."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
        self.n = 0

    def run(self, prompt: dict) -> tuple[torch.Tensor, list]:
        """Validate + execute; returns (saved latent, ids of the nodes the executor served from cache)."""
        prompt = copy.deepcopy(prompt)   # the executor writes "is_changed" into it; the server gets fresh JSON
        self.n += 1
        pid = f"freespeed-graph-{self.n}"
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        assert ok, f"validate_prompt rejected the graph: {err} {node_errors}"
        assert outputs == [SAVE_ID], outputs
        ex = self.executor
        ex.execute(prompt, pid, extra_data={}, execute_outputs=outputs)
        events = dict(ex.status_messages)
        assert ex.success and "execution_success" in events, (
            f"execution failed: {events.get('execution_error', {}).get('exception_message')}\n"
            f"{''.join(events.get('execution_error', {}).get('traceback', []))}")
        ui = ex.history_result["outputs"].get(SAVE_ID)
        assert ui is not None, f"SaveLatent produced no output: {ex.history_result['outputs']}"
        latent = read_latent(saved_latent_path(self.output_dir, ui))
        assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all(), latent.shape
        return latent, list(events["execution_cached"]["nodes"])


@pytest.fixture(scope="module")
def runner(host):
    return Runner(host["output"])


@pytest.fixture(scope="module")
def plain_latent(runner):
    latent, _ = runner.run(build_prompt(None))
    return latent


def test_pack_is_registered_by_comfyui_loader(host):
    cls = nodes.NODE_CLASS_MAPPINGS.get("FreeSpeedToDo")
    assert cls is not None, "FreeSpeedToDo not registered by comfy_entrypoint"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FreeSpeedToDo"] == "FreeSpeed ToDo (token downsampling)"
    assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{PACK_DIR_NAME}"
    # the class comes from the copy ComfyUI imported from custom_nodes/, not the tests' own import
    module_file = os.path.abspath(sys.modules[cls.__module__].__file__)
    assert module_file.startswith(host["pack"] + os.sep), module_file


@pytest.mark.parametrize("factors", [(1.0, 1.0), (1.0, 2.0)], ids=["factors-1-1", "factors-1-2"])
def test_factor_one_reproduces_graph_without_todo_exactly(runner, plain_latent, factors):
    """(1, 2) too: the one-level checkpoint has all its attention (input and middle block) at attention
    level 1, so a level-2 factor has nothing to act on."""
    latent, _ = runner.run(build_prompt(todo_inputs(*factors)))
    assert_same(latent, plain_latent, f"factors {factors} changed the latent of the graph without ToDo")


def test_factor_two_changes_the_latent(runner, plain_latent):
    latent, _ = runner.run(build_prompt(todo_inputs(2.0, 1.0)))
    diff = (latent - plain_latent).abs().max().item()
    assert diff > 1e-3, f"factor 2 left the latent (almost) unchanged: max |diff| {diff}"


def test_requeue_with_cached_patched_model_reproduces_first_run(host):
    """Same prompt queued again (and again after a run with another schedule in between) on one
    executor: CheckpointLoaderSimple and FreeSpeedToDo are served from the cache, so the sampler
    reuses the same patched MODEL; its result must be identical to the first run's."""
    r = Runner(host["output"])
    todo = todo_inputs(2.0, 1.0, method="avg-pool", end_percent=0.6)   # window depends on the run's schedule
    prompt = build_prompt(todo)
    first, cached = r.run(prompt)
    assert TODO_ID not in cached, cached

    again, cached = r.run(prompt)
    assert {CKPT_ID, TODO_ID} <= set(cached) and SAMPLER_ID not in cached, f"cached nodes: {cached}"
    assert_same(again, first, "re-queue of the same prompt (cached patched MODEL) changed the latent")

    other, cached = r.run(build_prompt(todo, steps=3))
    assert TODO_ID in cached, f"cached nodes: {cached}"
    assert not torch.equal(other, first), "3 steps gave the same latent as 4 steps"

    third, cached = r.run(prompt)
    assert TODO_ID in cached, f"cached nodes: {cached}"
    assert_same(third, first, "re-queue after a run with another schedule changed the latent")


# ComfyUI 0.3.64's validate_prompt checks combo values only for V1 list-style combos: a V3 io.Combo
# arrives as ("COMBO", {"options": [...]}) and is never compared with its options, so the node rejects
# an unknown method itself (validate_inputs -> "custom_validation_failed" naming the input).


@pytest.mark.parametrize("name,value,error_types", [
    ("method", "foo", {"value_not_in_list", "custom_validation_failed"}),
    ("factor_level_1", 0.5, {"value_smaller_than_min"}),
    ("factor_level_2", 9.0, {"value_bigger_than_max"}),
    ("end_percent", 1.5, {"value_bigger_than_max"}),
])
def test_invalid_widget_value_is_rejected_by_validation(host, name, value, error_types):
    todo = todo_inputs()
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("freespeed-valid", build_prompt(todo), None))
    assert ok, node_errors

    todo[name] = value
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("freespeed-invalid", build_prompt(todo), None))
    assert not ok and outputs == [], f"{name}={value!r} passed validation"
    assert err["type"] == "prompt_outputs_failed_validation", err
    assert set(node_errors) == {TODO_ID}, node_errors
    errors = node_errors[TODO_ID]["errors"]
    assert len(errors) == 1 and errors[0]["type"] in error_types, errors
    assert errors[0]["extra_info"].get("input_name") == name, errors
