"""Train the benchmark's fixture model (``bench/fixture.py``): seeded, reproducible, CPU-friendly.

``python -m bench.train_fixture [--steps N] [--batch B] [--minutes M] [--out PATH]``

DDPM v-prediction training with ComfyUI's own discrete schedule (the SD1.5 ``model_sampling``:
1000 steps, scaled-linear betas): x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, the UNet predicts
v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0 from (x_t, t, context), MSE loss.  That is exactly what ComfyUI's
``V_PREDICTION`` model computes at sampling time (``calculate_input`` scales x = x0 + σε by
1/sqrt(σ²+1), giving the same x_t; ``calculate_denoised`` = x/(σ²+1) − v·σ/sqrt(σ²+1) = x0).
v rather than ε: see :func:`bench.fixture.build_model`.
10% of the prompts are replaced by the empty prompt so classifier-free guidance works.  AdamW,
cosine learning rate, EMA of the weights (the EMA is what is saved, in fp16, with the embedding
table).  Everything is seeded; on the same torch build and thread count the run is reproducible.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

log = logging.getLogger("FreeSpeed.fixture")


def train(steps: int = 2500, batch: int = 16, lr: float = 1e-3, seed: int = 0, minutes: float = 25.0,
          out: str = "", threads: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file

    from . import fixture as fx

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = fx.build_model(device=torch.device("cpu"))
    dm = model.diffusion_model
    # comfy's disable_weight_init layers skip initialisation: give them a standard one
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        # zero the last conv so training starts from "predict 0"
        dm.out[-1].weight.zero_()
    dm.train()
    # SDPA for training speed (ComfyUI's CPU default, sub-quadratic attention, is several times slower here)
    import comfy.ldm.modules.attention as comfy_attention
    topts = {"optimized_attention_override": lambda func, *a, **k: comfy_attention.attention_pytorch(*a, **k)}
    table = fx.make_embedding(seed)
    ms = model.model_sampling
    alphas = 1.0 / (ms.sigmas.float() ** 2 + 1.0)          # ᾱ_t from ComfyUI's own sigmas
    prompts = fx.all_prompts()
    opt = torch.optim.AdamW(dm.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    decay = 0.998
    t0 = time.perf_counter()
    done, losses = 0, []
    for step in range(steps):
        frac = step / max(1, steps)
        for group in opt.param_groups:
            group["lr"] = lr * (0.5 * (1 + math.cos(math.pi * frac))) * min(1.0, (step + 1) / 200)
        idx = torch.randint(len(prompts), (batch,), generator=g)
        ps = [prompts[i] for i in idx]
        x0 = fx.render(ps, generator=g)
        texts = [p.text if torch.rand((), generator=g).item() > 0.1 else "" for p in ps]
        ctx = fx.encode(texts, table)
        t = torch.randint(0, alphas.shape[0], (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = dm(xt, timesteps=t.float(), context=ctx, transformer_options=topts)
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        loss = torch.nn.functional.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(decay, (1 + step) / (10 + step))
            for k, v in dm.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        done = step + 1
        if done % 100 == 0:
            el = time.perf_counter() - t0
            log.info("step %d/%d loss %.4f (mean of last 100 %.4f), %.0f s", done, steps, losses[-1],
                     sum(losses[-100:]) / 100, el)
        if minutes and time.perf_counter() - t0 > minutes * 60:
            log.warning("time limit of %g min reached at step %d", minutes, done)
            break
    elapsed = time.perf_counter() - t0
    out = out or fx.WEIGHTS
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tensors = {f"diffusion_model.{k}": v.half().contiguous() for k, v in ema.items()}
    tensors["freespeed.embedding"] = table.half().contiguous()
    save_file(tensors, out, metadata={"freespeed.steps": str(done), "freespeed.batch": str(batch),
                                      "freespeed.seed": str(seed), "freespeed.lr": str(lr),
                                      "freespeed.final_loss_mean100": f"{sum(losses[-100:]) / max(1, len(losses[-100:])):.5f}"})
    info = {"steps": done, "seconds": round(elapsed, 1), "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5),
            "path": out, "bytes": os.path.getsize(out)}
    log.info("saved %s (%.1f MB) after %d steps in %.0f s, loss %.4f", out, info["bytes"] / 2 ** 20, done, elapsed,
             info["final_loss"])
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_fixture", description=__doc__.split("\n\n")[1])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=25.0, help="stop (and save) after this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops oversubscribe 2 cores; 0 = torch's default)")
    p.add_argument("--out", default="", help="weights path (default bench/fixture/fixture_unet.safetensors)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from . import host
    host.setup(device="cpu")
    train(a.steps, a.batch, a.lr, a.seed, a.minutes, a.out, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
