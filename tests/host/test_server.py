"""FreeSpeed in a real headless ComfyUI server (``main.py``), installed the way users install it.

A temporary ``--base-directory`` holds ``custom_nodes/comfyui-freespeed`` (a symlink to this repo),
a test-only conditioning node, the tiny detectable SD1.5 checkpoint in ``models/checkpoints`` and
the outputs, so the host checkout is never written to (``PYTHONDONTWRITEBYTECODE=1`` too).  The
server starts once per module, listens on 127.0.0.1 only and is killed (process group) at teardown;
its log goes to a file whose tail is attached to every failure.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from comfy_graph import (PACK_DIR_NAME, SAVE_ID, TODO_ID, build_prompt, free_port, link_checkpoint, read_latent,
                         saved_latent_path, todo_inputs, write_cond_node)
from conftest import HOST, REPO

START_TIMEOUT_S = 90
PROMPT_TIMEOUT_S = 90
HTTP_TIMEOUT_S = 10


class Server:
    def __init__(self, url: str, base: str, log_path: str, proc: subprocess.Popen):
        self.url = url
        self.base = base
        self.log_path = log_path
        self.proc = proc
        self.http = requests.Session()
        self.http.trust_env = False          # no proxy settings from the environment: 127.0.0.1 only

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            return f"(no server log: {e})"
        return "\n--- server log (tail) ---\n" + text[-chars:]

    def get(self, path: str, timeout: float = HTTP_TIMEOUT_S, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=timeout, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.http.post(self.url + path, timeout=HTTP_TIMEOUT_S, **kw)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("freespeed_server")
    custom = base / "custom_nodes"
    write_cond_node(str(custom))
    os.symlink(REPO, custom / PACK_DIR_NAME, target_is_directory=True)
    link_checkpoint(tmp_path_factory, str(base / "models" / "checkpoints"))
    port = free_port()
    log_path = str(base / "server.log")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=HOST, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", str(base), log_path, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        up = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {proc.returncode} during start-up{srv.log_tail()}")
            try:
                up = srv.get("/system_stats", timeout=2).status_code == 200
            except requests.RequestException:
                up = False
            if up:
                break
            time.sleep(0.5)
        if not up:
            pytest.fail(f"ComfyUI did not answer /system_stats within {START_TIMEOUT_S} s{srv.log_tail()}")
        yield srv
    finally:
        _stop(proc)
        srv.http.close()


def test_pack_imports_without_failure(server):
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        lines = [ln for ln in f.read().splitlines() if ln.rstrip().endswith(os.sep + PACK_DIR_NAME)]
    assert lines, f"the pack is missing from the custom node import times{server.log_tail()}"
    assert not any("IMPORT FAILED" in ln for ln in lines), f"{lines}{server.log_tail()}"


def test_object_info_describes_todo(server):
    r = server.get("/object_info/FreeSpeedToDo")
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}{server.log_tail()}"
    info = r.json().get("FreeSpeedToDo")
    assert info is not None, f"FreeSpeedToDo not in /object_info: {r.text[:500]}{server.log_tail()}"
    assert info["display_name"] == "FreeSpeed ToDo (token downsampling)"
    assert info["category"] == "model_patches/freespeed"
    assert info["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
    assert info["output"] == ["MODEL"] and info["output_node"] is False
    req = info["input"]["required"]
    assert list(req) == ["model", "factor_level_1", "factor_level_2", "method", "start_percent", "end_percent"]
    assert req["model"][0] == "MODEL"
    expected = {"factor_level_1": (2.0, 1.0, 8.0), "factor_level_2": (1.0, 1.0, 8.0),
                "start_percent": (0.0, 0.0, 1.0), "end_percent": (1.0, 0.0, 1.0)}
    for name, (default, lo, hi) in expected.items():
        kind, opts = req[name]
        assert kind == "FLOAT" and (opts["default"], opts["min"], opts["max"]) == (default, lo, hi), (name, opts)
    kind, opts = req["method"]
    assert kind == "COMBO" and opts["options"] == ["nearest", "avg-pool", "bilinear"], opts
    assert opts["default"] == "nearest"


def test_extensions_endpoint_lists_the_pack_web_files(server):
    r = server.get("/extensions")
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}{server.log_tail()}"
    listed = r.json()
    assert isinstance(listed, list) and all(isinstance(x, str) for x in listed), listed
    prefix = f"/extensions/{PACK_DIR_NAME}/"
    ours = sorted(x for x in listed if x.startswith(prefix))
    web = os.path.join(REPO, "web")
    js = sorted(prefix + os.path.relpath(p, web).replace(os.sep, "/")
                for p in glob.glob(os.path.join(glob.escape(web), "**", "*.js"), recursive=True))
    assert ours == js, (ours, js)
    for url in ours:          # every listed script is served
        got = server.get(url)
        assert got.status_code == 200 and got.content, f"GET {url}: {got.status_code}{server.log_tail()}"


def test_schedule_preview_route_answers_from_the_python_schedules(server):
    r = server.post("/freespeed/preview", json={"type": "FreeSpeedTGate", "widgets": {"gate": 0.7}, "steps": 10})
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}{server.log_tail()}"
    body = r.json()
    assert body["text"].startswith("gate at step 7/10") and body["segments"][-1]["kind"] == "active"
    assert server.post("/freespeed/preview", data="not json").json() == {"segments": [], "text": ""}


def test_invalid_prompt_is_rejected_naming_the_input(server):
    r = server.post("/prompt", json={"prompt": build_prompt(todo_inputs(0.5)), "client_id": "freespeed-test"})
    assert r.status_code == 400, f"{r.status_code} {r.text[:1000]}{server.log_tail()}"
    node_errors = r.json()["node_errors"]
    assert list(node_errors) == [TODO_ID], node_errors
    assert [e["extra_info"]["input_name"] for e in node_errors[TODO_ID]["errors"]] == ["factor_level_1"], node_errors


def test_prompt_with_todo_runs_to_a_saved_latent(server):
    r = server.post("/prompt", json={"prompt": build_prompt(todo_inputs(2.0, 1.0)), "client_id": "freespeed-test"})
    assert r.status_code == 200, f"{r.status_code} {r.text[:1000]}{server.log_tail()}"
    body = r.json()
    assert body.get("node_errors") == {}, f"{body}{server.log_tail()}"
    pid = body["prompt_id"]

    deadline = time.monotonic() + PROMPT_TIMEOUT_S
    entry = None
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"server died while running the prompt{server.log_tail()}"
        h = server.get(f"/history/{pid}")
        assert h.status_code == 200, f"{h.status_code} {h.text[:500]}{server.log_tail()}"
        entry = h.json().get(pid)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            if entry["status"]["completed"] or entry["status"].get("status_str") == "error":
                break
        time.sleep(0.25)
    assert entry is not None, f"prompt {pid} not in /history after {PROMPT_TIMEOUT_S} s{server.log_tail()}"
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"] is True, (
        f"{status}{server.log_tail()}")
    ui = entry["outputs"].get(SAVE_ID)
    assert ui is not None, f"no SaveLatent output: {entry['outputs']}{server.log_tail()}"
    latent = read_latent(saved_latent_path(os.path.join(server.base, "output"), ui))
    assert latent.shape == (1, 4, 8, 8) and bool(latent.isfinite().all()), latent.shape
