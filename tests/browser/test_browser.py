"""FreeSpeed in a real browser: headless Chromium (Debian package ``chromium``) driven by
playwright-core (npm, ``tests/browser/package.json``) against a real ComfyUI server on 127.0.0.1
serving its frontend package, with the pack installed in ``custom_nodes``.

Opt-in: ``FREESPEED_BROWSER=1`` (``make test-browser``); it takes about a minute, mostly the server
start and the frontend load.  ``run.mjs`` does the browser side and prints a JSON report:

1. every shipped workflow (``workflows/*.json``) loads in the real frontend with each node's widget
   values exactly where the JSON puts them (the frontend's own widget order, KSampler's
   control_after_generate included) and no node missing;
2. the frontend's template API lists them under the pack's folder name;
3. the stacked workflow, made runnable on the tiny checkpoint (test conditioning for
   CLIPTextEncode, SaveLatent for VAEDecode -> SaveImage, 64² latent, 10 steps), is queued from the
   page; every FreeSpeed node receives ``freespeed.stats`` and draws its readout on the canvas;
   screenshots go to ``tests/browser/out/`` (``canvas.png``, ``readout.png``);
4. changing T-GATE's ``gate`` widget redraws the schedule bar as a preview (``preview.png``): the report
   waits (polls, 30 s at most) until the server's preview answer is in and the canvas has drawn it;
5. the template browser shows the pack's category with every workflow's title and description
   (``web/templates.json``, written into the cards by ``web/templates.js``) and its thumbnail loaded
   (``templates.png``).

Each workflow's thumbnail (``<name>.jpg``, 512x512: the whole graph framed in the real UI, scaled down in
the page) is written to ``tests/browser/out/workflows/``; ``make thumbnails`` (``FREESPEED_WRITE_THUMBNAILS=1``)
copies them next to the workflows.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "out")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ENABLED = os.environ.get("FREESPEED_BROWSER") == "1"
# `make thumbnails`: copy each workflow's template thumbnail (out/workflows/<name>.jpg) next to it
WRITE_THUMBNAILS = os.environ.get("FREESPEED_WRITE_THUMBNAILS") == "1"
STEPS = 10
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    not ENABLED, reason="FreeSpeed browser test is opt-in: FREESPEED_BROWSER=1 (or `make test-browser`)")

if ENABLED:
    sys.path.insert(0, os.path.join(REPO, "tests", "host"))
    from conftest import HOST  # noqa: E402
    if HOST is None:
        pytest.skip("FreeSpeed browser test: no ComfyUI host found", allow_module_level=True)
    from comfy_graph import CKPT_NAME, COND_NODE, LATENT_SIZE, PACK_DIR_NAME, template_meta  # noqa: E402
    from test_server import server  # noqa: E402,F401  (module fixture: real headless main.py with the pack)

WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
STACKED = "freespeed_max_speed_sd15"


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tiny_ui(wf: dict, steps: int = STEPS) -> dict:
    """The UI workflow made runnable on the tiny checkpoint (no CLIP, no VAE)."""
    wf = copy.deepcopy(wf)
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {ln[0]: ln for ln in wf["links"]}

    def drop_link(lid):
        ln = links.pop(lid)
        src = by_id.get(ln[1])
        if src is not None:
            out = src["outputs"][ln[2]]
            out["links"] = [x for x in out.get("links") or [] if x != lid]

    for n in list(wf["nodes"]):
        t = n["type"]
        if t == "CheckpointLoaderSimple":
            n["widgets_values"] = [CKPT_NAME]
        elif t == "CLIPTextEncode":
            for inp in n["inputs"]:
                if inp.get("link") is not None:
                    drop_link(inp["link"])
            n.update(type=COND_NODE, inputs=[], widgets_values=[n["id"], "fixed", 768],
                     properties={"Node name for S&R": COND_NODE})
        elif t == "EmptyLatentImage":
            n["widgets_values"] = [LATENT_SIZE, LATENT_SIZE, 1]
        elif t == "KSampler":
            n["widgets_values"][2] = steps
    dec = next(n for n in wf["nodes"] if n["type"] == "VAEDecode")
    save = next(n for n in wf["nodes"] if n["type"] == "SaveImage")
    samples = next(i for i in dec["inputs"] if i["name"] == "samples")["link"]
    sampler_id, slot = links[samples][1], links[samples][2]
    for inp in dec["inputs"] + save["inputs"]:
        if inp.get("link") is not None:
            drop_link(inp["link"])
    wf["nodes"] = [n for n in wf["nodes"] if n is not dec]
    lid = max(links) + 1
    links[lid] = [lid, sampler_id, slot, save["id"], 0, "LATENT"]
    by_id[sampler_id]["outputs"][slot]["links"] = [lid]
    save.update(type="SaveLatent", inputs=[{"name": "samples", "type": "LATENT", "link": lid}],
                outputs=[], widgets_values=["freespeed_browser"], properties={"Node name for S&R": "SaveLatent"})
    wf["links"] = [links[k] for k in sorted(links)]
    wf["last_link_id"] = lid
    return wf


def test_readout_appears_on_the_canvas(server):
    node = shutil.which("node")
    assert node, "node (Node.js) is needed for the browser test"
    assert os.path.isfile(CHROMIUM), f"{CHROMIUM} missing: apt-get install -y chromium chromium-driver"
    assert os.path.isdir(os.path.join(HERE, "node_modules", "playwright-core")), (
        "playwright-core missing: cd tests/browser && npm install")
    # no first-run template dialog over the canvas
    server.post("/settings/Comfy.TutorialCompleted", json=True)

    shipped = {os.path.splitext(os.path.basename(p))[0]: load(p) for p in WORKFLOWS}
    run_wf = tiny_ui(shipped[STACKED])
    os.makedirs(OUT, exist_ok=True)
    spec_path = os.path.join(OUT, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump({"shipped": shipped, "run": run_wf, "steps": STEPS, "timeout_s": 180, "pack": PACK_DIR_NAME}, f)
    proc = subprocess.run([node, os.path.join(HERE, "run.mjs"), server.url, spec_path, OUT], cwd=HERE,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"run.mjs failed ({proc.returncode}):\n{proc.stderr[-4000:]}{server.log_tail()}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(os.path.join(OUT, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)

    # errors raised by our extension or a file of ours the page asked for (a missing thumbnail is a 404 here);
    # the frontend's own start-up errors are only reported
    # (`make thumbnails` writes the thumbnails first: the browser's 404s for the missing ones are expected then)
    if WRITE_THUMBNAILS:
        for name in shipped:
            shutil.copyfile(os.path.join(OUT, "workflows", f"{name}.jpg"),
                            os.path.join(REPO, "workflows", f"{name}.jpg"))
    ours = [e for e in report["pageErrors"] + report["console"] if "freespeed" in e.lower()
            and not (WRITE_THUMBNAILS and ".jpg" in e)]
    assert not ours, ours
    for name, res in report["shipped"].items():
        assert not res["missing"] and not res["mismatches"], (name, res)
        assert res["nodes"] == len(shipped[name]["nodes"]), (name, res)
    listed = report["templates"].get(PACK_DIR_NAME, [])
    assert sorted(listed) == sorted(shipped), report["templates"]

    run = report["run"]
    assert not run["errors"], f"{run['errors']}{server.log_tail()}"
    types = {v["type"] for v in run["nodes"].values()}
    assert {"FreeSpeedToDo", "FreeSpeedTGate", "FreeSpeedEncoderPropagation"} <= types, run
    for nid, v in run["nodes"].items():
        assert v["readout"], (nid, v)
        drawn = v["drawn"]
        assert drawn and drawn["tag"] == "last run" and drawn["text"] == f"last run: {v['readout']}", (nid, v)
        assert drawn["segments"] == v["segments"] and v["segments"], (nid, v)
    tg = next(v for v in run["nodes"].values() if v["type"] == "FreeSpeedTGate")
    assert tg["readout"].startswith("gate at step 5/10"), tg["readout"]

    prev = report["preview"]
    assert prev["before"]["tag"] == "last run" and prev["after"]["tag"] == "preview", prev
    assert prev["after"]["text"].startswith("preview: gate at step 7/10"), prev
    # the template browser shows every workflow with its title, description and thumbnail (web/templates.js)
    dialog = report["templateDialog"]
    assert dialog["error"] is None, dialog["error"]
    meta = template_meta()
    missing = [n for n in shipped if meta[n]["title"] not in dialog["text"]]
    assert not missing, (missing, dialog["text"][:2000])
    for name in shipped:
        card = dialog["cards"].get(name)
        assert card, (name, sorted(dialog["cards"]))
        assert card["title"] == meta[name]["title"] and card["description"] == meta[name]["description"], (name, card)
        assert (card["thumbnail"] or {}).get("loaded") or WRITE_THUMBNAILS, (name, card)
    for p in report["screenshots"]:
        assert os.path.getsize(p) > 10_000, p


# FreeSpeed Auto in the browser (issue 23): a tiny search on the tiny checkpoint, deterministic cost
AUTO_WIDGETS = {"seed": 0, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "seeds": 1,
                "budget": 3, "candidates": "FreeSpeed only", "cost": "flops", "save_as": ""}


def test_auto_node_renders_and_shows_its_report(server):
    """FreeSpeedAuto, built on the canvas from the node library, runs a tiny search (budget 3, one seed,
    cost=flops) on the tiny checkpoint: the node draws its readout (the winner) and the report image it
    outputs shows on the canvas (``auto.png``).  Skipped while the host has no FreeSpeedAuto node."""
    info = server.get("/object_info/FreeSpeedAuto").json()
    if "FreeSpeedAuto" not in info:
        pytest.skip("FreeSpeedAuto is not a node of this pack yet")
    names = set(info["FreeSpeedAuto"]["input"]["required"]) | set(info["FreeSpeedAuto"]["input"].get("optional", {}))
    server.post("/settings/Comfy.TutorialCompleted", json=True)
    os.makedirs(OUT, exist_ok=True)
    spec_path = os.path.join(OUT, "spec_auto.json")
    # (the seed's frontend-only control widget "fixed": the settings stay the run's, the panel shows "last run")
    widgets = {**{k: v for k, v in AUTO_WIDGETS.items() if k in names}, "control_after_generate": "fixed"}
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump({"auto": {"ckpt": CKPT_NAME, "cond": COND_NODE, "size": LATENT_SIZE, "widgets": widgets},
                   "timeout_s": 240}, f)
    proc = subprocess.run([shutil.which("node"), os.path.join(HERE, "run.mjs"), server.url, spec_path, OUT],
                          cwd=HERE, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"run.mjs failed ({proc.returncode}):\n{proc.stderr[-4000:]}{server.log_tail()}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(os.path.join(OUT, "report_auto.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    ours = [e for e in report["pageErrors"] + report["console"] if "freespeed" in e.lower()]
    assert not ours, ours
    auto = report["auto"]
    assert not auto["errors"], f"{auto['errors']}{server.log_tail()}"
    assert auto["type"] == "FreeSpeedAuto" and auto["size"][0] > 100 and auto["size"][1] > 100, auto
    assert auto["readout"], auto
    assert auto["drawn"] and auto["drawn"]["text"] == f"last run: {auto['readout']}", auto   # its canvas panel
    img = auto["image"]
    assert img and img["width"] >= 256 and img["height"] >= 128, auto     # a readable chart, not a stub
    for p in report["screenshots"]:
        assert os.path.getsize(p) > 10_000, p
