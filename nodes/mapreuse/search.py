"""FreeSpeed Attention Map Reuse Search: calibration runs on the user's own settings pick the reuse steps
(greedy, in the spirit of the paper's PHAST; ``core.mapreuse.search_schedule``) and return them as percents
for the custom schedule, applied to the output MODEL."""
from __future__ import annotations

from dataclasses import replace

import comfy.sample
import comfy.samplers
from comfy_api.v0_0_2 import io

from ...core.mapreuse import distortion, search_schedule, steps_to_percents
from ...core.schedule import parse_percent_list
from ..hooks import FreeSpeedNode, logger, prepare_sampling
from .config import MapReuseConfig
from .node import apply_mapreuse, find_mapreuse, layer_config, layer_inputs


def search(model, sample_fn, budget: int, base: MapReuseConfig) -> dict:
    """Run the search on ``model``: ``sample_fn(m)`` samples a patched clone with the calibration
    settings.  One reference run (schedule off) gives the run's schedule and the reference output."""
    off = apply_mapreuse(model, replace(base, schedule="off"))
    ref = sample_fn(off)
    schedule = find_mapreuse(off).last_schedule

    def distortion_of(steps):
        pct = tuple(steps_to_percents(steps, schedule))
        return distortion(sample_fn(apply_mapreuse(model, replace(base, schedule="custom", percents=pct))), ref)

    return search_schedule(schedule, budget, distortion_of)


class MapReuseSearchNode(FreeSpeedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema(
            "FreeSpeedAttentionMapReuseSearch", "FreeSpeed Attention Map Reuse Search",
            description=("Finds a reuse schedule for your model (greedy, in the spirit of the paper's PHAST): one "
                         "reference run, one calibration run per step (that step alone reuses), then the 'budget' "
                         "steps of least distortion and the late schedule are compared in full; the better one is "
                         "returned as percents for the custom schedule, and applied to the output MODEL. "
                         "Costs steps + 2 sampling runs: calibrate small (few steps, low resolution)."),
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff),
                io.Int.Input("steps", default=20, min=2, max=200),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Int.Input("reuse_steps", default=10, min=1, max=199,
                             tooltip="Budget: how many steps reuse maps (the latency saving)."),
                *layer_inputs(),
            ],
            outputs=[io.Model.Output(display_name="model"),
                     io.String.Output(display_name="custom_percents"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, reuse_steps,
                self_attention=True, cross_attention=True, levels="all", cache_limit_mb=1024.0, fp16_maps=True,
                cache_on_cpu=False) -> io.NodeOutput:
        layer = layer_config(self_attention, cross_attention, levels, cache_limit_mb, fp16_maps, cache_on_cpu)
        latent, noise, mask = prepare_sampling(model, latent_image, seed)

        def sample_fn(m):
            return comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                       denoise=1.0, noise_mask=mask, seed=seed, disable_pbar=True)

        res = search(model, sample_fn, reuse_steps, MapReuseConfig(schedule="off", **layer))
        logger.info("FreeSpeed Map Reuse Search: %s", res)
        config = MapReuseConfig("custom", percents=tuple(parse_percent_list(res["percents"])), **layer)
        report = (f"{res['chosen']} schedule, reuse steps {res['reuse_steps']} of {res['steps']} "
                  f"(PSNR {res['psnr']:g} dB vs full; greedy {res['greedy_steps']} {res['greedy_psnr']:g} dB, late "
                  f"{res['late_steps']} {res['late_psnr']:g} dB); percents: {res['percents']}")
        # the returned MODEL reports its runs on this node's canvas readout
        return io.NodeOutput(apply_mapreuse(model, config, node_id=cls.node_id()), res["percents"], report)
