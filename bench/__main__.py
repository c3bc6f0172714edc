"""``python -m bench`` — FreeSpeed's benchmark CLI.

Built-in default (what ``make bench`` runs): ToDo factor 2 at attention level 1 against the
unpatched model on the full-size SD1.5 UNet (random weights) at 1024² (128×128 latent), one model
evaluation with CFG (UNet batch 2), with ComfyUI's SDPA attention and with its CPU default
(sub-quadratic), on CUDA when available else CPU.  Prints a table (attention share, ideal ratio,
measured ratio per kernel) and writes ``bench/out/speed.json`` and ``bench/out/speed.md``.

On CPU the number of interleaved rounds is chosen to fit ``--budget`` seconds (default 420 s, the
whole default run is meant to finish within 10 minutes on 2 cores); ``--repeats N`` fixes it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional

from . import host

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


def build_parser() -> argparse.ArgumentParser:
    from .models import PUBLIC_MODELS, SPECS
    from .techniques import TECHNIQUES
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--technique", choices=sorted(TECHNIQUES), default="todo", help="technique to measure")
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


def main(argv: Optional[list] = None) -> int:
    t_start = time.perf_counter()
    # parse first: ComfyUI's flags (--cpu) must be set before comfy.model_management is imported
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="auto")
    pre.add_argument("-q", "--quiet", action="store_true")
    known, _ = pre.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING if known.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    device = known.device if known.device != "auto" else ("cuda" if _cuda_available() else "cpu")
    try:
        host_path = host.setup(device=device)
    except host.HostNotFound as e:
        log.error("%s", e)
        return 2
    log.info("ComfyUI host: %s", host_path)
    args = build_parser().parse_args(argv)
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
