"""FreeSpeed Auto and FreeSpeed Preset: the V3 nodes (the search: ``search.py``; decisions: ``core.auto``)."""
from __future__ import annotations

import json

import comfy.samplers
from comfy_api.v0_0_2 import io

from ...core import auto as A
from ..hooks import CATEGORY, LAST_STATS, FreeSpeedNode, publish
from ..sites import detect_model
from . import presets
from .search import CANDIDATES, COSTS, Job, apply_parts, report_image, run_auto

AUTO = "FreeSpeed Auto"
PRESET = "FreeSpeed Preset"
NO_PRESETS = "(no presets saved yet)"


def show(node_id, technique: str, line: str, extra: dict) -> None:
    """The node's canvas readout (the same channel as the techniques' runs)."""
    if node_id is None:
        return
    stats = {"technique": technique, "readout": line, **extra}
    LAST_STATS[str(node_id)] = stats
    publish(str(node_id), stats)


class AutoNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedAuto",
            display_name=AUTO,
            category=CATEGORY,
            description=("Finds the fastest setting that keeps your image, on your model and device: one full run per "
                         "seed as the reference, then every FreeSpeed node (and ComfyUI's EasyCache/ToMe) from "
                         "conservative to aggressive settings while the result stays within `target` dB PSNR of the "
                         "full run on every seed, the original at fewer steps, and greedy stacks. Outputs the winner's "
                         "MODEL and the steps to sample with; copy your KSampler's settings here."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, tooltip="First seed; seeds are seed, seed+1, ..."),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("target", default=A.DEFAULT_TARGET_DB, min=5.0, max=80.0, step=0.5,
                               tooltip="Least PSNR (dB) against the full run, on every seed. 32 dB: the level published "
                                       "caching results call near-lossless (cache-dit on Flux 35.2 dB at 1.53x; 32 dB is "
                                       "their conservative floor). Video models: about 24 dB."),
                io.Int.Input("seeds", default=2, min=1, max=16, tooltip="The target must hold on each seed."),
                io.Int.Input("budget", default=A.DEFAULT_BUDGET, min=0, max=500,
                             tooltip="Trial runs at most (each samples every seed; the reference runs and the "
                                     "finalists' re-timing come on top)."),
                io.Combo.Input("candidates", options=list(CANDIDATES), default=CANDIDATES[0]),
                io.Combo.Input("cost", options=list(COSTS), default="time",
                               tooltip="time: wall time on this device (finalists re-timed in interleaved rounds); "
                                       "flops: counted FLOPs (deterministic, device-independent)."),
                io.String.Input("save_as", default="", tooltip="Preset name to save the winner under (user dir "
                                "freespeed/<name>.json; never overwritten). Empty: do not save."),
                io.Vae.Input("vae", optional=True, tooltip="Compare decoded images (what you see) instead of latents."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Int.Output(display_name="steps"),
                     io.String.Output(display_name="settings"), io.Image.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                target, seeds, budget, candidates, cost, save_as="", vae=None) -> io.NodeOutput:
        name = (save_as or "").strip()
        if name:
            presets.check_free(name)                 # a bad or taken name fails before the search, not after
        job = Job(model, positive, negative, latent_image, int(seed), int(steps), float(cfg), sampler_name, scheduler,
                  float(denoise), float(target), vae, int(seeds), int(budget), candidates, cost)
        res = run_auto(job)
        settings = res["settings"]
        if name:
            doc = A.preset_doc(name, settings["model"], settings["resolution"], job.steps, res["winner"], settings)
            settings["preset"] = presets.save_preset(name, doc)
        title = (f"{AUTO}: {settings['verdict']}"[:150])
        notes = [f"{settings['search']['trials']} trials of {job.budget}, {settings['search']['wall_s']:.1f} s; target "
                 f"{job.target:g} dB PSNR on {settings['target']['on']}, every one of {job.seeds} seeds; cost = {job.cost}"]
        image = report_image(res["reference"], res["log"], res["winner"], title, notes)
        show(cls.node_id(), AUTO, A.readout(settings), {"steps": res["steps"]})
        return io.NodeOutput(res["model"], res["steps"], json.dumps(settings, indent=1), image)


class PresetNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedPreset",
            display_name=PRESET,
            category=CATEGORY,
            description=("Applies a preset saved by FreeSpeed Auto (user dir freespeed/<name>.json) to a MODEL without "
                         "searching; outputs the steps to sample with. The preset must come from the same model family."),
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("preset", options=presets.list_presets() or [NO_PRESETS])],
            outputs=[io.Model.Output(display_name="model"), io.Int.Output(display_name="steps"),
                     io.String.Output(display_name="info")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, preset=None):
        return True          # the list changes while ComfyUI runs: execute checks the name and the file

    @classmethod
    def fingerprint_inputs(cls, model=None, preset=None):
        try:
            import os
            return os.path.getmtime(presets.preset_path(preset))
        except (OSError, ValueError):
            return float("nan")

    @classmethod
    def execute(cls, model, preset) -> io.NodeOutput:
        if preset == NO_PRESETS:
            raise ValueError(f"{PRESET}: no presets saved yet in {presets.preset_dir()}: run FreeSpeed Auto with save_as")
        doc = presets.load_preset(preset)
        family = detect_model(model).family
        steps, parts = A.check_preset(doc, family, repr(preset))
        out = apply_parts(model, parts)
        res = doc.get("resolution") or ["?", "?"]
        info = (f"{doc.get('winner', 'original')}: tuned on {doc['family']} at {res[0]}x{res[1]} px, "
                f"{doc.get('tuned_steps')} steps; sample with {steps} steps")
        show(cls.node_id(), PRESET, info, {"steps": steps})
        return io.NodeOutput(out, steps, info)


__all__ = ["AutoNode", "PresetNode", "AUTO", "PRESET"]
