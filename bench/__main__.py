"""``python -m bench`` — FreeSpeed's benchmark CLI.

Built-in default (what ``make bench`` runs): the suite (:mod:`bench.suite`) on ``fixture``, the SD1.x-family
UNet trained here: baseline, every FreeSpeed node at its defaults, a stacked preset, fewer-steps runs and
ComfyUI's peers, on the fixture's bench prompts; a counted pass (FLOPs per sample, closeness = PSNR/SSIM vs
the full run, quality = prompt accuracy and fixture FD) and 3 interleaved timed rounds; each row's verdict
against the fewer-steps run of equal counted FLOPs and, when the timing passes its self-check, of equal wall
time ("timing inconclusive" otherwise), and the fixture's realism figures.  Writes
``bench/out/suite.{json,md,png}``.  ``--model fixture-sdxl|fixture-flux|fixture-pixart`` (the other fixtures),
``sd15|sdxl`` (full-size, random weights: speed only) or a checkpoint path.  On ``fixture`` it then runs
FreeSpeed Auto's search (``--auto-budget`` trials, counted FLOPs; ``bench/out/auto.json``).

``python -m bench sweep --technique NAME``: the tuning sweep (held-out prompts; :mod:`bench.sweep`).
``python -m bench speed [...]``: ToDo's attention-kernel measurement.
``python -m bench auto --model fixture``: FreeSpeed Auto's search on a fixture (:mod:`bench.auto`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional

from . import host

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

log = logging.getLogger("FreeSpeed.bench")


def parse_resolution(text: str) -> tuple[int, int]:
    """``1024`` or ``1024x768`` (width x height, pixels; multiples of 8)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"resolution {text!r}: expected e.g. 1024 or 1024x768")
    if len(parts) > 2 or w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"resolution {text!r}: width and height must be positive multiples of 8")
    return w, h


def build_speed_parser() -> argparse.ArgumentParser:
    from .models import PUBLIC_MODELS, SPECS
    from .speed import SPEED_SPECS
    p = argparse.ArgumentParser(prog="python -m bench speed",
                                description="ToDo's attention-kernel measurement: attention share, ideal and measured "
                                            "ratio per kernel, one model evaluation of the full-size architecture.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--technique", choices=sorted(SPEED_SPECS), default="todo", help="technique to measure")
    p.add_argument("--model", choices=list(SPECS), default="sd15", metavar="{" + ",".join(PUBLIC_MODELS) + "}",
                   help="architecture (full size, random weights)")
    p.add_argument("--resolution", type=parse_resolution, default=(1024, 1024), metavar="PIXELS",
                   help="image size, e.g. 1024 or 1024x768 (latent = pixels / 8)")
    p.add_argument("--batch", type=int, default=1, help="latent batch (the UNet batch is twice this with CFG)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps per run (1 = one model evaluation)")
    p.add_argument("--sampler", default="euler", help="ComfyUI sampler name")
    p.add_argument("--scheduler", default="normal", help="ComfyUI scheduler name")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale (1 drops the uncond branch)")
    p.add_argument("--factor", type=float, default=2.0, help="ToDo K/V downsampling factor")
    p.add_argument("--level", type=int, default=1, help="ToDo attention level (1 = highest resolution)")
    p.add_argument("--method", default="nearest", help="ToDo downsampling method")
    p.add_argument("--attention", choices=("pytorch", "sub_quad", "both"), default="both",
                   help="attention kernel: pytorch = SDPA (--use-pytorch-cross-attention), "
                        "sub_quad = ComfyUI's CPU default")
    p.add_argument("--repeats", type=int, default=0, help="interleaved base/patched rounds; 0 = fit --budget")
    p.add_argument("--max-repeats", type=int, default=5, help="upper bound of rounds when --repeats is 0")
    p.add_argument("--budget", type=float, default=420.0, help="seconds the automatic repeat count aims to fit in")
    p.add_argument("--warmup", choices=("auto", "full", "small", "none"), default="auto",
                   help="warm-up run before timing: full = at the measured size, small = at 128², "
                        "auto = full on CUDA, small on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="JSON output (default bench/out/speed.json)")
    p.add_argument("--markdown", default=None, metavar="PATH", help="markdown table (default bench/out/speed.md)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def options_from_args(a: argparse.Namespace):
    from .speed import KERNELS, SpeedOptions
    kernels = KERNELS if a.attention == "both" else (a.attention,)
    return SpeedOptions(model=a.model, width=a.resolution[0], height=a.resolution[1], batch=a.batch, steps=a.steps,
                        sampler=a.sampler, scheduler=a.scheduler, cfg=a.cfg, technique=a.technique, factor=a.factor,
                        level=a.level, method=a.method, kernels=kernels, repeats=a.repeats,
                        max_repeats=a.max_repeats, budget_s=a.budget, warmup=a.warmup, device=a.device,
                        dtype=a.dtype, seed=a.seed)


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The suite's options (the default job)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="python -m bench speed --help: ToDo's attention-kernel measurement")
    p.add_argument("--model", default="fixture",
                   help="fixture / fixture-sdxl / fixture-flux / fixture-pixart (trained here), sd15 / sdxl "
                        "(full-size, random weights: speed only) or a checkpoint path")
    p.add_argument("--resolution", type=parse_resolution, default=None, metavar="PIXELS",
                   help="image size, e.g. 512 or 768x512 (default: sd15 512, sdxl 1024; fixtures have their own)")
    p.add_argument("--batch", type=int, default=0,
                   help="samples of the counted pass (FLOPs, closeness, quality; 0: fixtures 8 = 8 bench "
                        "prompts x 1 seed, 64 = the whole bench set; full-size models and checkpoints 1)")
    p.add_argument("--timing-batch", type=int, default=0,
                   help="samples per timed run (0: fixtures 1, others the whole batch)")
    p.add_argument("--steps", type=int, default=0, help="0: the model's default (20)")
    p.add_argument("--sampler", default="", help="default: the model's (euler)")
    p.add_argument("--scheduler", default="", help="default: the model's (normal)")
    p.add_argument("--cfg", type=float, default=0.0, help="CFG scale (0: the fixture's own, others 7)")
    p.add_argument("--rows", default="", help="comma-separated rows (default all): " + ", ".join(_row_names()))
    p.add_argument("--fewer-steps", default="", help="comma-separated step counts for the fewer-steps curve "
                                                     "(default: 6 counts from steps/4 to steps-1)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved timed rounds (a time verdict needs >= 3); 0 = as many as fit --budget")
    p.add_argument("--max-repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=240.0, help="seconds the automatic round count aims to fit in")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of the untimed warm-up run of each row")
    p.add_argument("--attention", choices=("default", "pytorch"), default="default",
                   help="default = ComfyUI's choice (sub-quadratic on CPU), pytorch = SDPA")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default bench/out)")
    p.add_argument("--auto-budget", type=int, default=14,
                   help="after the suite on fixture: FreeSpeed Auto's search with this many trials, cost = counted "
                        "FLOPs (python -m bench auto); 0 = skip")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def _row_names() -> list[str]:
    from .suite import row_names
    return row_names()


def _csv(text: str) -> Optional[list]:
    return [t.strip() for t in text.split(",") if t.strip()] or None


def suite_options(a: argparse.Namespace):
    from .suite import SuiteOptions
    w, h = a.resolution or (0, 0)
    fewer = _csv(a.fewer_steps)
    return SuiteOptions(model=a.model, width=w, height=h, batch=a.batch, steps=a.steps, sampler=a.sampler,
                        scheduler=a.scheduler, cfg=a.cfg, rows=_csv(a.rows),
                        fewer_steps=[int(x) for x in fewer] if fewer else None, repeats=a.repeats,
                        max_repeats=a.max_repeats, budget_s=a.budget, device=a.device, dtype=a.dtype,
                        attention=a.attention, seed=a.seed, warmup_steps=a.warmup_steps, timing_batch=a.timing_batch)


def _setup(argv, pytorch_attention: bool = False) -> bool:
    """Logging and the ComfyUI host (flags set before comfy loads); False when no host is found."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="auto")
    pre.add_argument("--attention", default="")
    pre.add_argument("-q", "--quiet", action="store_true")
    known, _ = pre.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING if known.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    device = known.device if known.device != "auto" else ("cuda" if _cuda_available() else "cpu")
    try:
        host_path = host.setup(device=device, pytorch_attention=pytorch_attention or known.attention == "pytorch")
    except host.HostNotFound as e:
        log.error("%s", e)
        return False
    log.info("ComfyUI host: %s", host_path)
    return True


def main(argv: Optional[list] = None) -> int:
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "speed":
        return main_speed(argv[1:], t_start)
    if argv and argv[0] == "auto":
        from .auto import main as main_auto
        return main_auto(argv[1:], t_start, _setup)
    if argv and argv[0] == "sweep":
        from .sweep import main as main_sweep
        return main_sweep(argv[1:], t_start, _setup)
    if "-h" in argv or "--help" in argv:
        build_parser().parse_args(argv)
    # ComfyUI's flags (--cpu, SDPA) must be set before comfy.model_management is imported
    if not _setup(argv):
        return 2
    args = build_parser().parse_args(argv)
    from . import suite_report
    from .suite import run_suite
    try:
        doc = run_suite(suite_options(args), t_start=t_start)
    except (ValueError, FileNotFoundError) as e:
        log.error("bench: %s", e)
        return 1
    print(suite_report.terminal(doc), flush=True)
    if not args.no_write:
        for path in suite_report.write(doc, args.out or OUT_DIR):
            log.info("wrote %s", os.path.relpath(path))
    if args.auto_budget > 0 and args.model == "fixture":
        # FreeSpeed Auto on the same fixture (the node's own search): what it tries and chooses, fewer steps included
        from .auto import main as main_auto
        auto_argv = ["--model", args.model, "--budget", str(args.auto_budget)]
        if not args.no_write:
            auto_argv += ["--json", os.path.join(args.out or OUT_DIR, "auto.json")]
        print("", flush=True)
        return main_auto(auto_argv, t_start, lambda _argv: True)
    return 0


def main_speed(argv: list, t_start: float) -> int:
    if "-h" in argv or "--help" in argv:
        build_speed_parser().parse_args(argv)
    if not _setup(argv):
        return 2
    args = build_speed_parser().parse_args(argv)
    from . import report
    from .speed import BenchError, run_speed
    opts = options_from_args(args)
    try:
        doc = run_speed(opts, t_start=t_start)
    except BenchError as e:
        log.error("bench check failed: %s", e)
        return 1
    print(report.terminal(doc), flush=True)
    if not args.no_write:
        paths = report.write(doc, args.json or os.path.join(report.OUT_DIR, "speed.json"),
                             args.markdown or os.path.join(report.OUT_DIR, "speed.md"))
        for path in paths:
            log.info("wrote %s", os.path.relpath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
