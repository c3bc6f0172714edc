"""The example workflows in ``workflows/`` against the real host.

* every node type exists in the host's node list (frontend-only nodes such as ``Note`` excepted);
* every widget value fits its input as the host defines it (type, min/max, combo option; KSampler's
  ``seed`` widget is followed by the frontend's ``control_after_generate`` value);
* every link joins an output and an input of the same type (host's RETURN_TYPES / INPUT_TYPES) and
  the node-side link bookkeeping agrees with the link table;
* every FreeSpeed node of the pack (``nodes.NODES``) has an SD1.5 and an SDXL workflow, except the
  known gaps listed below; the stacked "maximum speed" workflow holds every technique;
* the host serves them to the template browser (``/workflow_templates`` and
  ``/api/workflow_templates/<pack>/<name>.json``, ``app/custom_node_manager.py``; ComfyUI 0.3.64
  accepts ``example_workflows``, ``example``, ``examples``, ``workflow`` and ``workflows``), each with its
  ``<name>.jpg`` thumbnail; every workflow has a readable title and a one-line description in
  ``web/templates.json`` (shown in the browser's cards by ``web/templates.js``: the host lists custom-node
  templates by file name only);
* the API-format version of every workflow passes the host's own ``validate_prompt`` (checkpoint
  name swapped for the tiny test checkpoint), and the stacked workflow runs through the real
  ``PromptExecutor`` on the tiny checkpoint, each FreeSpeed node publishing its stats with the
  canvas readout (``freespeed.stats``).

API format.  :func:`ui_to_api` converts the simple graphs shipped here: widget values are matched to
the node's widget inputs in schema order (required, then optional), INT/COMBO inputs with
``control_after_generate`` (or named ``seed``/``noise_seed``, the frontend's legacy rule) take one
extra value that is not sent, links become ``[source id, slot]``.  The tiny checkpoint has no CLIP
and no VAE, so the executed graph swaps ``CLIPTextEncode`` for the test conditioning node and
``VAEDecode -> SaveImage`` for ``SaveLatent`` (:func:`tiny_api`); everything else -- the FreeSpeed
nodes with their shipped settings, KSampler's sampler and scheduler -- runs as shipped, with fewer
steps and a 64² latent.
"""
from __future__ import annotations

import asyncio
import copy
import glob
import json
import os
import sys

import pytest

if "nodes" not in sys.modules:
    import utils.install_util  # noqa: F401  (see test_graph.py)

import execution
import folder_paths
import nodes

from comfy_graph import (CKPT_NAME, COND_NODE, LATENT_SIZE, PACK_DIR_NAME, read_latent, saved_latent_path,
                         template_meta)
from conftest import REPO
from test_graph import _Server, host  # noqa: F401  (module fixture: pack + test node loaded by ComfyUI's loader)

WORKFLOWS_DIR = os.path.join(REPO, "workflows")
WORKFLOWS = sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS]

# nodes the frontend defines itself (no Python class): notes, reroutes, primitive widgets
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# combo inputs whose options are the user's model files: any file name with a model extension is valid
MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".sft", ".gguf")
FILE_COMBOS = {(t, n): MODEL_EXTS for t, n in (
    ("CheckpointLoaderSimple", "ckpt_name"), ("UNETLoader", "unet_name"), ("VAELoader", "vae_name"),
    ("CLIPLoader", "clip_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
    ("TripleCLIPLoader", "clip_name1"), ("TripleCLIPLoader", "clip_name2"), ("TripleCLIPLoader", "clip_name3"))}
# the model folder each loader's file combo lists (API validation: the workflow's names are added to it)
FILE_FOLDERS = {"unet_name": "diffusion_models", "vae_name": "vae", "clip_name": "text_encoders",
                "clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# FreeSpeed nodes that may exist without a workflow yet (node id -> why); anything else must have one
# (the benchmark node of issue 7, any "*Bench*" id, is a known gap too: its workflow waits for the node)
KNOWN_GAPS: dict[str, str] = {}
# techniques the "maximum speed" workflows stack (Attention Map Reuse is left out: its maps are memory-bound at
# the resolutions where ToDo pays off, and it leaves T-GATE's cross-attention to T-GATE anyway)
STACKABLE = ("FreeSpeedToDo", "FreeSpeedEncoderPropagation", "FreeSpeedTGate")
FAMILIES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# DiT families (issues 15-16): every technique node has a Flux, an SD3.5 and a Wan workflow
DIT_FAMILIES = {"flux": "Flux", "sd35": "SD3.5", "wan": "Wan"}
DIT_NODES = ("FreeSpeedToDo", "FreeSpeedTGate", "FreeSpeedEncoderPropagation", "FreeSpeedATEDM",
             "FreeSpeedAttentionMapReuse")
# (loader, its file input, what the file name holds) and the latent node of each family's workflows
RECOMMENDED = {"sd15": ("CheckpointLoaderSimple", "v1-5"), "sdxl": ("CheckpointLoaderSimple", "sd_xl_base"),
               "flux": ("UNETLoader", "flux1-dev"), "sd35": ("CheckpointLoaderSimple", "sd3.5"),
               "wan": ("UNETLoader", "wan2.1_t2v")}
LATENTS = {"sd15": ("EmptyLatentImage", 512), "sdxl": ("EmptyLatentImage", 1024), "flux": ("EmptySD3LatentImage", 1024),
           "sd35": ("EmptySD3LatentImage", 1024), "wan": ("EmptyHunyuanLatentVideo", 480)}
SAVERS = ("SaveImage", "SaveAnimatedWEBP")
STACKED = "freespeed_max_speed_sd15"


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# host schema helpers and the UI -> API converter
# ------------------------------------------------------------------------------------------------
def node_class(type_: str):
    cls = nodes.NODE_CLASS_MAPPINGS.get(type_)
    assert cls is not None, f"node type {type_!r} is not in the host's node list"
    return cls


def input_specs(type_: str) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) of a node's inputs in schema order (hidden inputs left out)."""
    it = node_class(type_).INPUT_TYPES()
    out = []
    for section, required in (("required", True), ("optional", False)):
        for name, spec in (it.get(section) or {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, (list, tuple)):
                opts = dict(opts, options=list(kind))
                kind = "COMBO"
            out.append((name, kind, opts, required))
    return out


def is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def has_control(name: str, kind: str, opts: dict) -> bool:
    if kind == "INT":
        return bool(opts.get("control_after_generate")) or name in ("seed", "noise_seed")
    return kind == "COMBO" and bool(opts.get("control_after_generate"))


def widget_slots(type_: str) -> list[tuple[str, str, dict]]:
    """Widget values in UI order: (input name or "<name>:control", type, options)."""
    out = []
    for name, kind, opts, _ in input_specs(type_):
        if is_widget(kind, opts):
            out.append((name, kind, opts))
            if has_control(name, kind, opts):
                out.append((f"{name}:control", "CONTROL", {}))
    return out


def output_types(type_: str) -> list[str]:
    return list(node_class(type_).RETURN_TYPES)


def real_nodes(wf: dict) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY]


def ui_to_api(wf: dict) -> dict:
    """API-format prompt of a UI workflow made of plain nodes (no groups/subgraphs/reroutes/muted nodes)."""
    links = {ln[0]: ln for ln in wf["links"]}
    prompt = {}
    for n in real_nodes(wf):
        assert n.get("mode", 0) == 0, f"node {n['id']} ({n['type']}) is muted/bypassed: not supported here"
        inputs = {}
        values = list(n.get("widgets_values") or [])
        slots = widget_slots(n["type"])
        assert len(values) == len(slots), (
            f"node {n['id']} ({n['type']}): {len(values)} widget values for widgets {[s[0] for s in slots]}")
        for (name, _, _), v in zip(slots, values):
            if not name.endswith(":control"):
                inputs[name] = v
        for inp in n.get("inputs") or []:
            if inp.get("link") is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def with_ckpt(prompt: dict, name: str = CKPT_NAME) -> dict:
    p = copy.deepcopy(prompt)
    for node in p.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = name
    return p


def tiny_api(prompt: dict, steps: int) -> dict:
    """The API prompt runnable on the tiny checkpoint (no CLIP, no VAE): test conditioning for
    CLIPTextEncode, SaveLatent for VAEDecode -> SaveImage, a 64² latent and ``steps`` steps."""
    p = with_ckpt(prompt)
    for nid, node in list(p.items()):
        ct = node["class_type"]
        if ct == "CLIPTextEncode":
            p[nid] = {"class_type": COND_NODE, "inputs": {"seed": int(nid), "dim": 768}}
        elif ct == "EmptyLatentImage":
            node["inputs"].update(width=LATENT_SIZE, height=LATENT_SIZE, batch_size=1)
        elif ct in ("KSampler", "FreeSpeedBenchmark"):
            node["inputs"]["steps"] = steps
        elif ct == "VAEDecode":
            del p[nid]
        elif ct == "SaveImage":
            src = next(n for n in prompt.values() if n["class_type"] == "VAEDecode")
            p[nid] = {"class_type": "SaveLatent",
                      "inputs": {"samples": src["inputs"]["samples"], "filename_prefix": "freespeed_workflow"}}
    return p


# ------------------------------------------------------------------------------------------------
# the converter itself
# ------------------------------------------------------------------------------------------------
def test_workflows_exist():
    assert WORKFLOWS, f"no workflows in {WORKFLOWS_DIR}"
    for name in NAMES:
        assert name.startswith("freespeed_") and name.endswith(tuple(f"_{k}" for k in {**FAMILIES, **DIT_FAMILIES})), name


def test_ui_to_api_maps_widgets_by_schema_order_and_skips_control_values(host):
    wf = load(os.path.join(WORKFLOWS_DIR, "freespeed_tgate_sd15.json"))
    api = ui_to_api(wf)
    by_type = {v["class_type"]: (k, v) for k, v in api.items()}
    _, ks = by_type["KSampler"]
    assert ks["inputs"]["seed"] == 42 and ks["inputs"]["steps"] == 25, ks
    assert "control_after_generate" not in ks["inputs"] and "seed:control" not in ks["inputs"]
    assert ks["inputs"]["sampler_name"] == "euler" and ks["inputs"]["scheduler"] == "normal"
    tg_id, tg = by_type["FreeSpeedTGate"]
    assert tg["inputs"] == {"model": [by_type["CheckpointLoaderSimple"][0], 0], "gate": 0.4, "keep_cfg": False,
                            "self_attention": False, "self_attention_warmup": 2, "self_attention_interval": 5,
                            "cache_on_cpu": False, "dit_gate": 0.6}
    assert ks["inputs"]["model"] == [tg_id, 0]
    assert "Note" not in by_type
    broken = copy.deepcopy(wf)
    next(n for n in broken["nodes"] if n["type"] == "KSampler")["widgets_values"].pop(1)   # no control value
    with pytest.raises(AssertionError, match="widget values"):
        ui_to_api(broken)


# ------------------------------------------------------------------------------------------------
# each workflow against the host's schemas
# ------------------------------------------------------------------------------------------------
def check_value(type_: str, name: str, kind: str, opts: dict, v) -> str | None:
    where = f"{type_}.{name}={v!r}"
    if kind == "CONTROL":
        return None if v in CONTROL_VALUES else f"{where}: not one of {CONTROL_VALUES}"
    if kind == "BOOLEAN":
        return None if isinstance(v, bool) else f"{where}: not a boolean"
    if kind == "STRING":
        return None if isinstance(v, str) else f"{where}: not a string"
    if kind == "COMBO":
        exts = FILE_COMBOS.get((type_, name))
        if exts is not None:
            return None if isinstance(v, str) and v.lower().endswith(exts) else f"{where}: not a model file name"
        options = opts.get("options") or []
        return None if v in options else f"{where}: not one of {options}"
    if kind == "INT" and (isinstance(v, bool) or not isinstance(v, int)):
        return f"{where}: not an integer"
    if kind == "FLOAT" and (isinstance(v, bool) or not isinstance(v, (int, float))):
        return f"{where}: not a number"
    if "min" in opts and v < opts["min"]:
        return f"{where}: below min {opts['min']}"
    if "max" in opts and v > opts["max"]:
        return f"{where}: above max {opts['max']}"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_node_types_exist_in_host(host, name):
    wf = load(os.path.join(WORKFLOWS_DIR, name + ".json"))
    missing = sorted({n["type"] for n in real_nodes(wf)} - set(nodes.NODE_CLASS_MAPPINGS))
    assert not missing, f"{name}: node types not in the host's node list: {missing}"
    assert any(n["type"].startswith("FreeSpeed") for n in wf["nodes"]), f"{name} holds no FreeSpeed node"


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_fit_their_inputs(host, name):
    wf = load(os.path.join(WORKFLOWS_DIR, name + ".json"))
    problems = []
    for n in real_nodes(wf):
        slots = widget_slots(n["type"])
        values = n.get("widgets_values") or []
        if len(values) != len(slots):
            problems.append(f"node {n['id']} {n['type']}: {len(values)} values for widgets {[s[0] for s in slots]}")
            continue
        for (wname, kind, opts), v in zip(slots, values):
            err = check_value(n["type"], wname, kind, opts, v)
            if err:
                problems.append(f"node {n['id']} {err}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_links_join_matching_types(host, name):
    wf = load(os.path.join(WORKFLOWS_DIR, name + ".json"))
    by_id = {n["id"]: n for n in wf["nodes"]}
    problems = []
    assert len({ln[0] for ln in wf["links"]}) == len(wf["links"]), "duplicate link ids"
    assert wf["last_link_id"] >= max(ln[0] for ln in wf["links"]) and wf["last_node_id"] >= max(by_id)
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        s, d = by_id.get(src), by_id.get(dst)
        if s is None or d is None:
            problems.append(f"link {lid}: unknown node {src if s is None else dst}")
            continue
        out_t = output_types(s["type"])[sslot]
        d_inp = d["inputs"][dslot]
        in_t = {nm: k for nm, k, _, _ in input_specs(d["type"])}.get(d_inp["name"])
        if in_t == "*":               # an any-type input (PreviewAny) takes what it is given
            in_t = out_t
        if not (out_t == in_t == typ == d_inp["type"] == s["outputs"][sslot]["type"]):
            problems.append(f"link {lid}: {s['type']}[{sslot}] {out_t} -> {d['type']}.{d_inp['name']} {in_t} "
                            f"(link says {typ})")
        if d_inp.get("link") != lid or lid not in (s["outputs"][sslot].get("links") or []):
            problems.append(f"link {lid}: node-side bookkeeping disagrees with the link table")
    for n in real_nodes(wf):          # every required socket input is connected
        linked = {i["name"] for i in n.get("inputs") or [] if i.get("link") is not None}
        for nm, kind, opts, required in input_specs(n["type"]):
            if required and not is_widget(kind, opts) and nm not in linked:
                problems.append(f"node {n['id']} {n['type']}: required input {nm} ({kind}) not connected")
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_api_format_passes_host_validation(host, name, monkeypatch):
    prompt = with_ckpt(ui_to_api(load(os.path.join(WORKFLOWS_DIR, name + ".json"))))
    # the DiT loaders list the user's model files: the workflow's file names are "installed" for validation
    files: dict = {}
    for node in prompt.values():
        for inp, folder in FILE_FOLDERS.items():
            if isinstance(node["inputs"].get(inp), str):
                files.setdefault(folder, set()).add(node["inputs"][inp])
    listing = folder_paths.get_filename_list
    monkeypatch.setattr(folder_paths, "get_filename_list",
                        lambda folder: sorted(set(listing(folder)) | files.get(folder, set())))
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(f"freespeed-wf-{name}", prompt, None))
    assert ok, f"{name}: {err} {node_errors}"
    out_nodes = [k for k, v in prompt.items() if getattr(node_class(v["class_type"]), "OUTPUT_NODE", False)]
    assert sorted(outputs) == sorted(out_nodes) and out_nodes, (outputs, out_nodes)
    assert any(prompt[k]["class_type"] in SAVERS for k in outputs), outputs


def test_every_freespeed_node_has_sd15_and_sdxl_workflows(host):
    from comfyui_freespeed.nodes import NODES
    ids = [cls.GET_SCHEMA().node_id for cls in NODES]
    assert ids and all(i.startswith("FreeSpeed") for i in ids), ids
    used: dict[str, set] = {}
    for name in NAMES:
        fam = name.rsplit("_", 1)[1]
        for n in load(os.path.join(WORKFLOWS_DIR, name + ".json"))["nodes"]:
            used.setdefault(n["type"], set()).add(fam)
    gaps, missing = [], []
    for nid in ids:
        have = used.get(nid, set())
        if have >= set(FAMILIES):
            continue
        if nid in KNOWN_GAPS or "Bench" in nid:
            gaps.append(nid)
        else:
            missing.append(f"{nid} (has {sorted(have) or 'none'})")
    assert not missing, f"FreeSpeed nodes without an SD1.5 and an SDXL workflow: {missing}"
    if gaps:
        print(f"known workflow gaps: {gaps}")
    for nid in DIT_NODES:    # the DiT families: a Flux, an SD3.5 and a Wan workflow per technique node
        assert used.get(nid, set()) >= set(DIT_FAMILIES), (nid, sorted(used.get(nid, set())))
    for fam in FAMILIES:     # the stacked workflows hold every stackable technique
        stacked = [n["type"] for n in load(os.path.join(WORKFLOWS_DIR, f"freespeed_max_speed_{fam}.json"))["nodes"]
                   if n["type"].startswith("FreeSpeed")]
        assert stacked == list(STACKABLE), (fam, stacked)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_uses_its_models_recommended_checkpoint(name):
    wf = load(os.path.join(WORKFLOWS_DIR, name + ".json"))
    fam = name.rsplit("_", 1)[1]
    loader, want = RECOMMENDED[fam]
    (ck,) = [n for n in wf["nodes"] if n["type"] == loader]
    assert want in ck["widgets_values"][0], (name, ck["widgets_values"])
    by_id = {n["id"]: n for n in wf["nodes"]}
    (ks,) = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    lat_link = next(i["link"] for i in ks["inputs"] if i["name"] == "latent_image")
    lat = by_id[next(ln for ln in wf["links"] if ln[0] == lat_link)[1]]
    lat_type, side = LATENTS[fam]
    assert lat["type"] == lat_type, lat["type"]
    assert min(lat["widgets_values"][:2]) >= side, lat["widgets_values"]
    assert any(n["type"] == "Note" and n["widgets_values"][0] for n in wf["nodes"]), "no settings note"


# ------------------------------------------------------------------------------------------------
# the template browser
# ------------------------------------------------------------------------------------------------
# Its card (16rem wide) shows a title over two lines at most and a description clamped to two lines (~62
# characters; the whole text shows on hover); its thumbnail box is square (the image is fitted, not cropped)
TITLE_MAX, DESCRIPTION_MAX = 40, 62
THUMB_SIZE, THUMB_MAX_BYTES = (512, 512), 60_000


def test_every_workflow_has_a_title_description_and_thumbnail():
    """web/templates.json (what web/templates.js writes into the browser's cards: ComfyUI 0.3.64 lists
    custom-node templates by file name only) names every workflow and nothing else, with a readable title
    and a one-line description; every workflow has its <name>.jpg thumbnail (square, small; `make thumbnails`)."""
    from PIL import Image

    meta = template_meta()
    assert sorted(meta) == NAMES, sorted(set(meta) ^ set(NAMES))
    titles = [m["title"] for m in meta.values()]
    assert len(set(titles)) == len(titles), "two workflows share a title"
    for name, m in meta.items():
        assert set(m) == {"title", "description"}, (name, m)
        title, desc = m["title"].strip(), m["description"].strip()
        assert 8 <= len(title) <= TITLE_MAX and "_" not in title and title != name, (name, title)
        assert 20 <= len(desc) <= DESCRIPTION_MAX and "\n" not in desc and desc != title, (name, desc)
        thumb = os.path.join(WORKFLOWS_DIR, name + ".jpg")
        assert os.path.isfile(thumb), f"{name}: no thumbnail {thumb} (make thumbnails)"
        assert os.path.getsize(thumb) <= THUMB_MAX_BYTES, (name, os.path.getsize(thumb))
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size == THUMB_SIZE, (name, im.format, im.size)
    stray = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOWS_DIR, "*.jpg"))}
    assert stray <= set(NAMES), stray - set(NAMES)


def test_host_serves_the_workflows_as_templates(host):
    """app/custom_node_manager.py's routes, in-process: the listing names every workflow under the pack
    folder's name and each file is served as stored."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app.custom_node_manager import CustomNodeManager

    custom_dir = os.path.dirname(host["pack"])
    saved = list(folder_paths.folder_names_and_paths["custom_nodes"][0])
    folder_paths.folder_names_and_paths["custom_nodes"][0][:] = [custom_dir]

    async def check():
        routes = web.RouteTableDef()
        app = web.Application()
        CustomNodeManager().add_routes(routes, app, [(PACK_DIR_NAME, host["pack"])])
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/workflow_templates")
            assert r.status == 200
            listing = await r.json()
            assert sorted(listing.get(PACK_DIR_NAME, [])) == NAMES, listing
            for name in NAMES:
                r = await client.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
                assert r.status == 200, (name, r.status)
                assert json.loads(await r.text()) == load(os.path.join(WORKFLOWS_DIR, name + ".json"))
                # the thumbnail the browser asks for (<name>.jpg, frontend 1.27 getTemplateThumbnailUrl)
                r = await client.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
                assert r.status == 200 and r.content_type == "image/jpeg", (name, r.status, r.content_type)

    try:
        asyncio.run(check())
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"][0][:] = saved


# ------------------------------------------------------------------------------------------------
# the stacked workflow through the real executor
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for PromptServer.instance: keeps what hooks.publish sends."""

    def __init__(self):
        self.sent = []
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data))


# what each technique's readout must say after a run on the tiny checkpoint (10 steps)
READOUT_CHECKS = {
    "FreeSpeedToDo": lambda s, text: s["downsampled_calls"] > 0 and "K/V ÷2 at level 1" in text,
    "FreeSpeedTGate": lambda s, text: (s["uncond_evaluations_skipped"] > 0
                                       and text.startswith(f"gate at step {s['steps_before_gate']}/{s['steps']}")),
    "FreeSpeedEncoderPropagation": lambda s, text: s["decoder_only_steps"] > 0 and "decoder-only" in text,
    "FreeSpeedAttentionMapReuse": lambda s, text: (s["reuse_calls"] > 0
                                                   and text.startswith(f"{len(s['reuse_steps'])} reuse steps/10")),
}


@pytest.mark.parametrize("name,expected", [
    (STACKED, {"FreeSpeedToDo", "FreeSpeedTGate", "FreeSpeedEncoderPropagation"}),
    ("freespeed_mapreuse_sd15", {"FreeSpeedAttentionMapReuse"}),
    ("freespeed_benchmark_sd15", {"FreeSpeedToDo"}),
])
def test_workflow_runs_in_the_executor_and_publishes_readouts(host, name, expected):
    """The workflow's API form on the tiny checkpoint through the real PromptExecutor; every FreeSpeed node
    publishes ``freespeed.stats`` with its readout and schedule segments."""
    import server as host_server

    wf = load(os.path.join(WORKFLOWS_DIR, name + ".json"))
    steps = 10
    prompt = tiny_api(ui_to_api(wf), steps)
    fs_ids = {k: v["class_type"] for k, v in prompt.items()
              if v["class_type"].startswith("FreeSpeed") and v["class_type"] not in (COND_NODE, "FreeSpeedBenchmark")}
    bench_ids = [k for k, v in prompt.items() if v["class_type"] == "FreeSpeedBenchmark"]
    assert set(fs_ids.values()) == expected, fs_ids

    rec = _Recorder()
    had = hasattr(host_server.PromptServer, "instance")
    saved = getattr(host_server.PromptServer, "instance", None)
    host_server.PromptServer.instance = rec
    try:
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("freespeed-wf-run", prompt, None))
        assert ok, f"{err} {node_errors}"
        ex = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
        ex.execute(copy.deepcopy(prompt), "freespeed-wf-run", extra_data={}, execute_outputs=outputs)
        events = dict(ex.status_messages)
        assert ex.success, (f"execution failed: {events.get('execution_error', {}).get('exception_message')}\n"
                            f"{''.join(events.get('execution_error', {}).get('traceback', []))}")
        (save_id,) = [k for k in outputs if prompt[k]["class_type"] == "SaveLatent"]
        latent = read_latent(saved_latent_path(host["output"], ex.history_result["outputs"][save_id]))
        for bid in bench_ids:      # the Benchmark node's report reaches its PreviewImage
            (prev,) = [k for k in outputs if prompt[k]["inputs"].get("images") == [bid, 0]]
            assert ex.history_result["outputs"][prev]["images"], ex.history_result["outputs"][prev]
    finally:
        if had:
            host_server.PromptServer.instance = saved
        else:
            del host_server.PromptServer.instance
    assert latent.shape == (1, 4, LATENT_SIZE // 8, LATENT_SIZE // 8) and bool(latent.isfinite().all())

    msgs = {d["node"]: d for e, d in rec.sent if e == "freespeed.stats"}
    assert set(msgs) == set(fs_ids), (sorted(msgs), fs_ids)
    for nid, d in msgs.items():
        assert d["stats"]["steps"] == steps, d["stats"]
        assert isinstance(d["readout"], str) and d["readout"], d
        segs = d["segments"]
        assert segs and segs[0]["start"] == 0.0 and segs[-1]["end"] == 1.0, segs
        json.dumps(d)
        print(f"{fs_ids[nid]} #{nid}: {d['readout']}")
        assert READOUT_CHECKS[fs_ids[nid]](d["stats"], d["readout"]), (fs_ids[nid], d["readout"], d["stats"])
