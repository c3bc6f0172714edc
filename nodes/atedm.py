"""FreeSpeed AT-EDM (attention-driven pruning) -- Wang et al., CVPR 2024, arXiv 2405.05252 (no official code).

AT-EDM prunes redundant tokens at run time, ranked by the attention maps themselves.  The maths
(G-WPR ranking, kept set, similarity-based recovery, DSAP schedule, FLOPs formulas) is in
``core/pruning.py``; this file installs it on a cloned MODEL with native hooks only.

Where.  Every UNet transformer stack (``SpatialTransformer``) at the chosen *attention levels*
(default 1 and 2: SDXL's depth-2 stacks at 64x64 tokens for 1024² and its depth-10 stacks and
middle block at 32x32; SD1.x/SD2.x's 64x64 and 32x32 levels) gets an **object patch of its
``forward``** (``model.add_object_patch("diffusion_model.<path>.forward", fn)``; the original is
taken from ``get_model_object`` so patches chain, nothing is patched globally):

1. the stack runs as ComfyUI's own ``SpatialTransformer.forward`` does (GroupNorm, ``proj_in``,
   layers, ``proj_out``, residual), calling each ``BasicTransformerBlock``'s own forward, so
   attn1/attn2 patches, replace patches and output patches of other nodes keep working;
2. **pruning layer** = the stack's first layer.  Its self-attention is computed explicitly (an
   ``optimized_attention_override`` valid for that layer call only, chaining to any previous
   override) so the heads-averaged softmax map is available;
3. the paper applies the pruning mask *after the feed-forward* of the pruning layer (Sec. 3.1,
   Fig. 3), so in a stack of depth >= 2 the first layer runs in full and layers 2.. run on the kept
   tokens only.  *Choice:* a depth-1 stack (every SD1.x/SD2.x stack) would then save nothing, so
   there the tokens are pruned right after the layer's self-attention (a ``middle_patch`` of that
   call): cross-attention and feed-forward run on the kept tokens;
4. **recovery** before ``proj_out`` and the convolutions that follow (Sec. 3.2): every pruned
   token takes the final value of its most similar kept token, the kept token it attends to most
   in the pruning layer's (heads-averaged) map -- the paper reads similarity from the attention
   map, which costs no extra matmul.

Ranking (G-WPR, Sec. 3.1): heads averaged, ``iterations`` power iterations ``s <- Aᵀ s`` from a
uniform start, per sample (cond and uncond keep different tokens; the count is the same so the
batch stays one tensor).

DSAP (Sec. 3.3), in percent of denoising: before ``dsap_end`` the first attention block of each
down stage and the last of each up stage are not pruned and the other stacks use
``ratio * early_scale``; after it every chosen stack prunes ``ratio``.  *Choices:* the paper's
schedule is given in steps of its 50-step sampler; percent of denoising keeps the same shape at
any step count.  Defaults ratio 0.7, DSAP until 30%, early_scale 1 (the paper's DSAP: only the
stage-edge blocks are spared early) give 39% fewer FLOPs on SDXL at 1024² over 25 steps by this
node's counter (6.76 -> 4.12 TFLOPs per evaluation and sample; paper: 6.7 -> 4.1, 38.8%).

FLOPs: every model call adds the full and the actual FLOPs of the UNet (transformer layers per
layer and token count: attention and FF; convolutions and the stacks' in/out projections from
the weights and the latent size; norms, activations and embeddings ignored).  The pruning
layer's extra work (head average, G-WPR, recovery argmax) is counted as overhead.  The explicit
map costs the same FLOPs as attention, but not the same time: no fused kernel returns maps.

Stacking.
* ToDo (K/V downsampling, an ``attn1_patch``): where ToDo shortens the pruning layer's K/V the map
  is not square, so AT-EDM leaves that stack call unpruned (``stack_calls_left_kv_changed``); the
  kept-token layers of other stacks are not a 2-D grid and ToDo leaves them alone (its
  ``untouched_non_grid``).
* T-GATE (object patch of ``attn2.forward`` that caches the output per token position): in the
  pruned layers of a stack whose cross-attention is object-patched by another node, the
  cross-attention runs on the *recovered full grid* (an ``attn2_patch`` expands the normalised
  tokens by the recovery copy, an ``attn2_output_patch`` takes the kept rows back), so T-GATE's
  cache always holds full-grid outputs, whatever tokens each step keeps
  (``attn2_full_grid_calls``).  Self-attention and FF still run on the kept tokens.
* A foreign object patch of ``attn1.forward`` in the pruned layers (T-GATE v2's self-attention
  cache, Attention Map Reuse) keys its cache by shapes, not token identities: that stack call is
  left unpruned (``stack_calls_left_foreign_attn1``).

Models: SD1.x/SD2.x and SDXL UNets.  Flux and SD3 are refused with a clear message
(:func:`hooks.require_unet`): their joint text-image blocks would need the image tokens and
their rotary/positional rows gathered per block replace patch -- not built here.

Memory: the map is fp32 ``batch x tokens²`` (heads are averaged chunk by chunk).  A stack call whose
map would need more than ``map_budget_mb`` runs unpruned, counted (``stack_calls_left_map_budget``)
with one warning per run, instead of running out of memory mid-sampling.

Ratio 0 installs nothing but the run wrappers (bit-exact, same attention kernels); a stack call
whose scheduled ratio is 0 (DSAP edge blocks early) calls the original forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from comfy_api.v0_0_2 import io

from ..core.pruning import (DSAP, LayerShape, attention_with_mean_map, conv_flops, conv_out, gather_tokens,
                            gwpr_scores, kept_count, layer_flops, ranking_flops, recover_tokens, recovery_source,
                            select_kept, stage_edges)
from ..core.tokens import level_grids
from .hooks import CATEGORY, ModelInfo, RunState, Technique, detect_model, logger, require_unet

CHUNK_BYTES = 512 * 2 ** 20          # scores of at most this many bytes per head chunk


def map_bytes(batch: int, n: int, heads: int) -> int:
    """Peak bytes of the explicit map at a pruning layer: the fp32 mean map plus one head chunk of
    scores and its softmax (see :func:`core.pruning.attention_with_mean_map`)."""
    per_head = batch * n * n * 4
    chunk = per_head * min(max(heads, 1), max(1, CHUNK_BYTES // per_head))
    return per_head + 2 * chunk


LEVEL_CHOICES = {"1+2": (1, 2), "1": (1,), "2": (2,), "1+2+3": (1, 2, 3)}
MAX_CALL_LOG = 20000


@dataclass(frozen=True)
class ATEDMConfig:
    ratio: float = 0.7                 # target pruning ratio (fraction of tokens removed)
    dsap_end: float = 0.3              # percent of denoising where DSAP's early phase ends
    early_scale: float = 1.0           # early-phase ratio of non-edge stacks, as a fraction of `ratio`
    levels: tuple = (1, 2)             # attention levels whose stacks are pruned
    iterations: int = 5                # G-WPR power iterations
    map_budget_mb: float = 2048.0      # largest explicit-map memory per stack call (mean map + one head chunk)

    def __post_init__(self):
        DSAP(self.ratio, self.dsap_end, self.early_scale)       # validates
        if self.iterations < 1:
            raise ValueError("FreeSpeed AT-EDM: G-WPR needs at least one iteration")
        if self.map_budget_mb <= 0:
            raise ValueError("FreeSpeed AT-EDM: the map budget must be positive")

    @property
    def dsap(self) -> DSAP:
        return DSAP(self.ratio, self.dsap_end, self.early_scale)

    @property
    def off(self) -> bool:
        return self.ratio <= 0.0 or not self.levels


@dataclass
class Stack:
    key: tuple                 # ("input"|"middle"|"output", i)
    path: str                  # e.g. "input_blocks.4.1"
    level: int                 # resolution level (1 = full latent)
    att_level: int             # attention level (1 = highest resolution with attention)
    edge: bool                 # first stack of a down stage / last of an up stage (DSAP)
    module: Any
    shapes: list = field(default_factory=list)     # LayerShape per layer


class _Call:
    """State of one pruned stack call (never outlives the call)."""
    __slots__ = ("n", "map", "tried", "refused", "kept", "source")

    def __init__(self, n: int):
        self.n = n
        self.map = None
        self.tried = False
        self.refused = None
        self.kept = None
        self.source = None


def _mro(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def layer_shape(block) -> LayerShape:
    dim = int(block.attn1.to_q.weight.shape[0])
    ctx = int(block.attn2.to_k.weight.shape[1]) if getattr(block, "attn2", None) is not None else 0
    ff = sum(int(m.weight.numel()) for m in block.ff.modules() if isinstance(m, torch.nn.Linear))
    return LayerShape(dim=dim, ctx_dim=ctx, ff_params=ff, heads=int(block.n_heads))


def find_stacks(dm, info: ModelInfo, levels: tuple) -> list[Stack]:
    """The SpatialTransformer stacks of a UNet at the given attention levels."""
    edges = stage_edges(info.block_level)
    out = []
    parts = [("input", "input_blocks", list(dm.input_blocks))]
    if getattr(dm, "middle_block", None) is not None:
        parts.append(("middle", "middle_block", [dm.middle_block]))
    parts.append(("output", "output_blocks", list(dm.output_blocks)))
    for part, attr, blocks in parts:
        for i, block in enumerate(blocks):
            key = (part, 0 if part == "middle" else i)
            att = info.attention_level(key)
            if att is None or att not in levels:
                continue
            for j, layer in enumerate(block):
                if "SpatialTransformer" not in _mro(layer) or "SpatialVideoTransformer" in _mro(layer):
                    continue
                path = f"{attr}.{j}" if part == "middle" else f"{attr}.{i}.{j}"
                out.append(Stack(key, path, info.block_level[key], att, key in edges, layer,
                                 [layer_shape(b) for b in layer.transformer_blocks]))
    return out


def _foreign(module, name: str) -> bool:
    """Whether another node object-patched ``module.<name>.forward`` (an instance attribute)."""
    sub = getattr(module, name, None)
    return sub is not None and "forward" in vars(sub)


class ATEDM(Technique):
    name = "AT-EDM"
    key = "freespeed.atedm"

    def __init__(self, config: ATEDMConfig, info: ModelInfo, stacks: list[Stack], dm, node_id: Optional[str] = None):
        super().__init__(info, node_id)
        self.config = config
        self.stacks = stacks
        self.dm = dm
        self._other_memo: dict = {}
        self._stack_memo: dict = {}

    # -- installation -----------------------------------------------------------------------------
    def install(self, model) -> None:
        super().install(model)
        if self.config.off:
            return
        for stack in self.stacks:
            name = f"diffusion_model.{stack.path}.forward"
            orig = model.get_model_object(name)
            model.add_object_patch(name, self._make_forward(stack, orig))

    def new_run(self, schedule, noise) -> RunState:
        run = super().new_run(schedule, noise)
        run.flops = {"other": 0, "tf_full": 0, "tf_run": 0, "overhead": 0}
        run.slots = [0, 0]                 # token-layer slots after the pruning point: full, kept
        run.kept_shapes = {}               # attention level -> (tokens, kept) of the latest pruned call
        run.calls = []                     # (stack key, sigma, tokens, kept) of every patched stack call
        return run

    # -- per model call: FLOPs of everything outside the patched stacks ----------------------------
    def _apply_model(self, executor, x, t, *args, **kwargs):
        run = self.run
        if run is not None:
            run.begin_eval(float(t.max()) if torch.is_tensor(t) else float(t))
            try:
                ctx = args[1] if len(args) > 1 else kwargs.get("c_crossattn")
                n_ctx = int(ctx.shape[1]) if torch.is_tensor(ctx) and ctx.ndim == 3 else 77
                if x.ndim == 4:
                    run.flops["other"] += x.shape[0] * self._other_flops(int(x.shape[-2]), int(x.shape[-1]), n_ctx)
            except Exception:      # accounting must never break sampling
                pass
        return executor(x, t, *args, **kwargs)

    def _other_flops(self, h: int, w: int, n_ctx: int) -> int:
        """Per-sample FLOPs of convolutions, stack projections and the unpatched stacks' layers."""
        key = (h, w, n_ctx)
        hit = self._other_memo.get(key)
        if hit is not None:
            return hit
        dm = self.dm
        grids = level_grids(h, w, 8)
        patched = {id(s.module) for s in self.stacks} if not self.config.off else set()
        total = 0

        def count(module, lvl):
            nonlocal total
            for name, m in module.named_modules():
                if "transformer_blocks" in name or "emb_layers" in name:
                    continue
                if "SpatialTransformer" in _mro(m):
                    if id(m) not in patched:
                        gh, gw = grids[lvl - 1]
                        for b in m.transformer_blocks:
                            total += sum(layer_flops(layer_shape(b), gh * gw, n_ctx=n_ctx).values())
                    continue
                if isinstance(m, torch.nn.Conv2d):
                    up = ".conv" in f".{name}" and "Upsample" in _mro_parent(module, name)
                    gh, gw = grids[max(lvl - 2, 0)] if up else grids[lvl - 1]
                    total += conv_flops(m.weight.numel(), conv_out(gh, m.stride[0]), conv_out(gw, m.stride[1]))
                elif isinstance(m, torch.nn.Linear) and ("proj_in" in name or "proj_out" in name):
                    gh, gw = grids[lvl - 1]
                    total += 2 * m.weight.numel() * gh * gw

        lvl = 1
        for block in dm.input_blocks:
            count(block, lvl)
            if any(type(m).__name__ == "Downsample" for m in block.modules()):
                lvl += 1
        if getattr(dm, "middle_block", None) is not None:
            count(dm.middle_block, lvl)
        for block in dm.output_blocks:
            count(block, lvl)
            if any(type(m).__name__ == "Upsample" for m in block.modules()):
                lvl -= 1
        if getattr(dm, "out", None) is not None:
            count(dm.out, 1)
        self._other_memo[key] = total
        return total

    # -- the patched stack forward ------------------------------------------------------------------
    def _make_forward(self, stack: Stack, orig):
        tech = self

        def forward(x, context=None, transformer_options={}):
            run = tech.run
            info = run.current if run is not None else None
            if info is None:
                return orig(x, context, transformer_options)
            ratio = tech.config.dsap.ratio_at(info.percent, stack.edge)
            if ratio <= 0.0:
                run.count("stack_calls_full")
                tech._account(run, stack, x, context, None, None)
                return orig(x, context, transformer_options)
            blocks = stack.module.transformer_blocks
            if any(_foreign(b, "attn1") for b in list(blocks)[1:]):
                run.count("stack_calls_left_foreign_attn1")
                tech._account(run, stack, x, context, None, None)
                return orig(x, context, transformer_options)
            n = int(x.shape[-2]) * int(x.shape[-1])
            need = map_bytes(int(x.shape[0]), n, stack.shapes[0].heads)
            if need > tech.config.map_budget_mb * 2 ** 20:
                run.count("stack_calls_left_map_budget")
                if not getattr(run, "warned_budget", False):
                    run.warned_budget = True
                    logger.warning("FreeSpeed AT-EDM: the self-attention map of a %d-token stack (batch %d) needs %.0f MB, "
                                   "over map_budget_mb %g: such stacks run unpruned", n, int(x.shape[0]),
                                   need / 2 ** 20, tech.config.map_budget_mb)
                tech._account(run, stack, x, context, None, None)
                return orig(x, context, transformer_options)
            return tech._pruned(run, stack, x, context, transformer_options, ratio)
        return forward

    def _pruned(self, run: RunState, stack: Stack, x, context, transformer_options, ratio: float):
        mod = stack.module
        blocks = mod.transformer_blocks
        depth = len(blocks)
        if not isinstance(context, list):
            context = [context] * depth
        b, c, h, w = x.shape
        transformer_options["activations_shape"] = list(x.shape)
        x_in = x
        x = mod.norm(x)
        if not mod.use_linear:
            x = mod.proj_in(x)
        x = x.movedim(1, 3).flatten(1, 2).contiguous()
        if mod.use_linear:
            x = mod.proj_in(x)
        n = h * w
        keep = kept_count(n, ratio)
        call = _Call(n)
        foreign_attn2 = []
        for i, block in enumerate(blocks):
            transformer_options["block_index"] = i
            if i == 0:
                to = self._pruning_layer_options(transformer_options, call, keep, prune_mid=(depth == 1))
                if depth == 1 and _foreign(block, "attn2"):
                    to = self._full_grid_cross_attention(to, call)
                    foreign_attn2.append(0)
                x = block(x, context=context[i], transformer_options=to)
                if call.kept is None and call.map is not None and depth > 1:
                    self._prune(call, keep)
                    x = gather_tokens(x, call.kept)
                call.map = None
            elif call.kept is None:
                x = block(x, context=context[i], transformer_options=transformer_options)
            else:
                to = dict(transformer_options)
                if _foreign(block, "attn2"):
                    to = self._full_grid_cross_attention(to, call)
                    foreign_attn2.append(i)
                x = block(x, context=context[i], transformer_options=to)
        if call.kept is not None:
            x = recover_tokens(x, call.source)
            run.count("stack_calls_pruned")
            run.count(f"level{stack.att_level}_pruned_calls")
            if foreign_attn2:
                run.count("attn2_full_grid_calls", len(foreign_attn2))
            run.kept_shapes[stack.att_level] = (n, keep)
            after = depth - 1 if depth > 1 else 1
            run.slots[0] += b * n * after
            run.slots[1] += b * keep * after
        else:
            run.count("stack_calls_left_kv_changed" if call.refused == "kv" else "stack_calls_left_no_map")
        if len(run.calls) < MAX_CALL_LOG:
            run.calls.append((stack.key, run.current.sigma, n, keep if call.kept is not None else n))
        self._account(run, stack, x_in, context[0], keep if call.kept is not None else None,
                      foreign_attn2 if call.kept is not None else None)
        if mod.use_linear:
            x = mod.proj_out(x)
        x = x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
        if not mod.use_linear:
            x = mod.proj_out(x)
        return x + x_in

    def _pruning_layer_options(self, transformer_options: dict, call: _Call, keep: int, prune_mid: bool) -> dict:
        """Options of the pruning layer's call: an override computing its self-attention map."""
        to = dict(transformer_options)
        prev = transformer_options.get("optimized_attention_override")

        def override(func, *args, **kwargs):
            if not call.tried:
                call.tried = True          # the layer's first kernel call is its self-attention
                if len(args) >= 3 and kwargs.get("mask") is None and not kwargs.get("skip_reshape"):
                    q, k, v = args[:3]
                    heads = args[3] if len(args) > 3 else kwargs.get("heads")
                    if heads is not None and q.ndim == 3 and q.shape[1] == call.n and k.shape[1] == call.n:
                        out, call.map = attention_with_mean_map(q, k, v, int(heads), chunk_bytes=CHUNK_BYTES)
                        return out.to(q.dtype)
                    call.refused = "kv" if q.ndim == 3 and q.shape[1] == call.n else "other"
            if prev is not None:
                return prev(func, *args, **kwargs)
            return func(*args, **kwargs)

        to["optimized_attention_override"] = override
        if prune_mid:
            tech = self

            def middle(x, extra_options):
                if call.kept is None and call.map is not None and x.shape[1] == call.n:
                    tech._prune(call, keep)
                    return gather_tokens(x, call.kept)
                return x

            patches = dict(to.get("patches") or {})
            patches["middle_patch"] = list(patches.get("middle_patch", [])) + [middle]
            to["patches"] = patches
        return to

    def _prune(self, call: _Call, keep: int) -> None:
        scores = gwpr_scores(call.map, self.config.iterations)
        call.kept = select_kept(scores, keep)
        call.source = recovery_source(call.map, call.kept)

    def _full_grid_cross_attention(self, to: dict, call: _Call) -> dict:
        def expand(n, context_attn2, value_attn2, extra_options):
            if call.kept is not None and n.shape[1] == call.kept.shape[1] != call.n:
                n = recover_tokens(n, call.source)
            return n, context_attn2, value_attn2

        def take_kept(n, extra_options):
            return gather_tokens(n, call.kept) if call.kept is not None and n.shape[1] == call.n else n

        patches = dict(to.get("patches") or {})
        patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [expand]
        patches["attn2_output_patch"] = [take_kept] + list(patches.get("attn2_output_patch", []))
        to["patches"] = patches
        return to

    # -- FLOPs ----------------------------------------------------------------------------------------
    def _account(self, run: RunState, stack: Stack, x, context, keep: Optional[int], full_attn2) -> None:
        try:
            b = int(x.shape[0])
            n = int(x.shape[-2]) * int(x.shape[-1]) if x.ndim == 4 else int(x.shape[1])
            if isinstance(context, list):
                context = context[0]
            n_ctx = int(context.shape[1]) if torch.is_tensor(context) else 0
            key = (stack.path, n, n_ctx, keep, tuple(full_attn2 or ()))
            hit = self._stack_memo.get(key)
            if hit is None:
                full = actual = overhead = 0
                depth = len(stack.shapes)
                for i, shape in enumerate(stack.shapes):
                    f = layer_flops(shape, n, n_ctx=n_ctx)
                    full += sum(f.values())
                    if keep is None:
                        actual += sum(f.values())
                        continue
                    p = layer_flops(shape, keep, n_ctx=n_ctx)
                    if i == 0 and depth > 1:
                        actual += sum(f.values())
                    elif i == 0:
                        actual += f["attn1"] + p["ff"] + (f["attn2"] if 0 in (full_attn2 or ()) else p["attn2"])
                    else:
                        actual += p["attn1"] + p["ff"] + (f["attn2"] if i in (full_attn2 or ()) else p["attn2"])
                if keep is not None:
                    overhead = ranking_flops(n, stack.shapes[0].heads, self.config.iterations, keep)
                hit = self._stack_memo[key] = (full, actual, overhead)
            run.flops["tf_full"] += b * hit[0]
            run.flops["tf_run"] += b * hit[1]
            run.flops["overhead"] += b * hit[2]
        except Exception:      # accounting must never break sampling
            pass

    # -- stats ----------------------------------------------------------------------------------------
    def stats(self, run: RunState) -> dict[str, Any]:
        s = super().stats(run)
        for k in ("stack_calls_pruned", "stack_calls_full", "stack_calls_left_kv_changed",
                  "stack_calls_left_foreign_attn1", "stack_calls_left_no_map", "stack_calls_left_map_budget",
                  "attn2_full_grid_calls"):
            s.setdefault(k, 0)
        f = run.flops
        full = f["other"] + f["tf_full"]
        actual = f["other"] + f["tf_run"] + f["overhead"]
        evals = max(run.evals, 1)
        s["gflops_per_eval_full"] = round(full / evals / 1e9, 3)
        s["gflops_per_eval_run"] = round(actual / evals / 1e9, 3)
        s["flops_saved_pct"] = round(100.0 * (1 - actual / full), 1) if full else 0.0
        s["attn_ff_saved_pct"] = (round(100.0 * (1 - (f["tf_run"] + f["overhead"]) / f["tf_full"]), 1)
                                  if f["tf_full"] else 0.0)
        s["tokens_kept_pct"] = round(100.0 * run.slots[1] / run.slots[0], 1) if run.slots[0] else 100.0
        s["kept_tokens"] = {f"level{k}": f"{a}->{b}" for k, (a, b) in sorted(run.kept_shapes.items())}
        s["ratio"] = self.config.ratio
        s["dsap_end_pct"] = round(100 * self.config.dsap_end, 1)
        s["early_scale"] = self.config.early_scale
        s["levels"] = list(self.config.levels)
        s["stacks"] = len(self.stacks)
        return s

    def summary(self, s: dict[str, Any]) -> str:
        toks = ", ".join(f"{k} {v}" for k, v in s["kept_tokens"].items()) or "none"
        left = (s["stack_calls_left_kv_changed"] + s["stack_calls_left_foreign_attn1"] + s["stack_calls_left_no_map"]
                + s["stack_calls_left_map_budget"])
        return (f"{s['evaluations']} evaluations, {s['stack_calls_pruned']} stack calls pruned "
                f"({s['stack_calls_full']} full by DSAP, {left} left alone), tokens kept {s['tokens_kept_pct']:g}% "
                f"({toks}), FLOPs saved {s['flops_saved_pct']:g}% "
                f"({s['gflops_per_eval_full']:g} -> {s['gflops_per_eval_run']:g} GFLOPs per evaluation), "
                f"{s['wall_s']:.2f} s")


def _mro_parent(root, name: str) -> list[str]:
    """MRO names of the parent module of ``root.<name>``."""
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    mod = root.get_submodule(parent) if parent else root
    return _mro(mod)


def apply_atedm(model, config: ATEDMConfig, node_id: Optional[str] = None):
    """Clone ``model`` and install AT-EDM on the clone (the input MODEL is never modified)."""
    info = detect_model(model)
    require_unet(info, "AT-EDM", "AT-EDM prunes the 2-D token grid inside UNet transformer stacks and recovers it "
                                 "before the convolutions; Flux/SD3 joint text-image blocks with positional rows "
                                 "are not supported.")
    dm = model.model.diffusion_model
    stacks = find_stacks(dm, info, tuple(config.levels))
    m = model.clone()
    ATEDM(config, info, stacks, dm, node_id).install(m)
    return m


class ATEDMNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FreeSpeedATEDM",
            display_name="FreeSpeed AT-EDM (attention-driven pruning)",
            category=CATEGORY,
            description=("AT-EDM (arXiv 2405.05252): inside the UNet's transformer stacks, tokens are ranked by "
                         "Generalized Weighted PageRank over the self-attention map, the lowest are pruned for the "
                         "following layers and recovered by copying their most similar kept token before the "
                         "convolutions. DSAP prunes less in early steps. Paper: 38.8% fewer FLOPs on SDXL."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("ratio", default=0.7, min=0.0, max=0.95, step=0.05,
                               tooltip="Target pruning ratio: the fraction of tokens removed after the pruning "
                                       "layer of each stack. 0 = off (the unpatched model exactly)."),
                io.Float.Input("dsap_end_percent", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="DSAP: until this percent of denoising the first/last attention block of "
                                       "each stage is not pruned and the others prune ratio × early_scale "
                                       "(attention maps vary most early). 0 = no DSAP."),
                io.Float.Input("early_scale", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="DSAP: the early-phase ratio of the other stacks, as a fraction of ratio (1 = the paper's "
                                       "DSAP: only the stage-edge blocks are spared early; lower = prune less early)."),
                io.Combo.Input("levels", options=list(LEVEL_CHOICES), default="1+2",
                               tooltip="Attention levels whose stacks are pruned (1 = highest resolution with "
                                       "attention: 64x64 tokens for SD1.5 at 512² and SDXL at 1024²)."),
                io.Int.Input("map_budget_mb", default=2048, min=64, max=262144, step=64,
                             tooltip="Largest memory for one explicit self-attention map (fp32, batch x tokens²). "
                                     "Stacks whose map would need more run unpruned (counted, one warning). SDXL with "
                                     "CFG needs ~1.1 GB at 1024², ~1.9 GB at 1536², ~6 GB at 2048²."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, levels=None):
        # ComfyUI 0.3.64 does not validate V3 combos (see ToDo)
        if levels is not None and levels not in LEVEL_CHOICES:
            return f"levels must be one of {', '.join(LEVEL_CHOICES)}, got {levels!r}"
        return True

    @classmethod
    def execute(cls, model, ratio, dsap_end_percent, early_scale, levels, map_budget_mb=2048) -> io.NodeOutput:
        config = ATEDMConfig(float(ratio), float(dsap_end_percent), float(early_scale), LEVEL_CHOICES[levels],
                             map_budget_mb=float(map_budget_mb))
        return io.NodeOutput(apply_atedm(model, config, node_id=cls.hidden.unique_id if cls.hidden else None))
