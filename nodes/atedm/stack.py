"""One UNet transformer stack run pruned (AT-EDM, arXiv 2405.05252 Sec. 3.1-3.2): ComfyUI's
``SpatialTransformer.forward`` step by step, calling each ``BasicTransformerBlock``'s own forward (other
nodes' attention patches keep working), with the pruning layer's self-attention map computed by an override
valid for that layer call only, the following layers on the kept tokens and every pruned token recovered
before ``proj_out``.  Placement choices: docs/atedm.md."""
from __future__ import annotations

from ...core.attention import attention_with_mean_map
from ...core.pruning import gather_tokens, gwpr_scores, recover_tokens, recovery_source, select_kept
from ..sites import forward_is_patched, with_attention_override


CHUNK_BYTES = 512 * 2 ** 20          # scores of at most this many bytes per head chunk


def map_bytes(batch: int, n: int, heads: int) -> int:
    """Peak bytes of the explicit map at a pruning layer: the fp32 mean map plus one head chunk of
    scores and its softmax (see :func:`core.attention.attention_with_mean_map`)."""
    per_head = batch * n * n * 4
    chunk = per_head * min(max(heads, 1), max(1, CHUNK_BYTES // per_head))
    return per_head + 2 * chunk


def patched(block, attr: str) -> bool:
    """Whether another node object-patched ``block.<attr>.forward`` (T-GATE, Map Reuse)."""
    sub = getattr(block, attr, None)
    return sub is not None and forward_is_patched(sub.forward, sub)


class PrunedCall:
    """What one stack call did: the map (while needed), the kept tokens and their recovery source, why it
    was not pruned (``refused``: "kv" when the pruning layer's K/V length was changed), and the layers
    whose cross-attention ran on the recovered full grid."""
    __slots__ = ("n", "map", "tried", "refused", "kept", "source", "full_grid")

    def __init__(self, n: int):
        self.n, self.map, self.tried, self.refused, self.kept, self.source = n, None, False, None, None, None
        self.full_grid: list = []


def pruned_forward(mod, x, context, transformer_options: dict, keep: int, iterations: int):
    """(output, :class:`PrunedCall`) of the stack ``mod`` keeping ``keep`` tokens after its first layer
    (a depth-1 stack prunes right after its self-attention)."""
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
    call = PrunedCall(h * w)
    for i, block in enumerate(blocks):
        transformer_options["block_index"] = i
        if i == 0:
            to = _pruning_layer_options(transformer_options, call, keep, iterations, prune_mid=(depth == 1))
            if depth == 1 and patched(block, "attn2"):
                to = _full_grid_cross_attention(to, call)
                call.full_grid.append(0)
            x = block(x, context=context[i], transformer_options=to)
            if call.kept is None and call.map is not None and depth > 1:
                prune(call, keep, iterations)
                x = gather_tokens(x, call.kept)
            call.map = None
        elif call.kept is None:
            x = block(x, context=context[i], transformer_options=transformer_options)
        else:
            to = dict(transformer_options)
            if patched(block, "attn2"):
                to = _full_grid_cross_attention(to, call)
                call.full_grid.append(i)
            x = block(x, context=context[i], transformer_options=to)
    if call.kept is not None:
        x = recover_tokens(x, call.source)
    if mod.use_linear:
        x = mod.proj_out(x)
    x = x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
    if not mod.use_linear:
        x = mod.proj_out(x)
    return x + x_in, call


def _pruning_layer_options(transformer_options: dict, call: PrunedCall, keep: int, iterations: int,
                           prune_mid: bool) -> dict:
    """Options of the pruning layer's call: an override computing its self-attention map."""
    def mine(call_next, func, *args, **kwargs):
        if not call.tried:
            call.tried = True          # the layer's first kernel call is its self-attention
            if len(args) >= 3 and kwargs.get("mask") is None and not kwargs.get("skip_reshape"):
                q, k, v = args[:3]
                heads = args[3] if len(args) > 3 else kwargs.get("heads")
                if heads is not None and q.ndim == 3 and q.shape[1] == call.n and k.shape[1] == call.n:
                    out, call.map = attention_with_mean_map(q, k, v, int(heads), chunk_bytes=CHUNK_BYTES)
                    return out.to(q.dtype)
                call.refused = "kv" if q.ndim == 3 and q.shape[1] == call.n else "other"
        return call_next(func, *args, **kwargs)

    to = with_attention_override(transformer_options, mine)
    if prune_mid:
        def middle(x, extra_options):
            if call.kept is None and call.map is not None and x.shape[1] == call.n:
                prune(call, keep, iterations)
                return gather_tokens(x, call.kept)
            return x

        patches = dict(to.get("patches") or {})
        patches["middle_patch"] = list(patches.get("middle_patch", [])) + [middle]
        to["patches"] = patches
    return to


def prune(call: PrunedCall, keep: int, iterations: int) -> None:
    scores = gwpr_scores(call.map, iterations)
    call.kept = select_kept(scores, keep)
    call.source = recovery_source(call.map, call.kept)


def _full_grid_cross_attention(to: dict, call: PrunedCall) -> dict:
    """Cross-attention another node patched (T-GATE caches per token position) runs on the recovered grid."""
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


__all__ = ["CHUNK_BYTES", "map_bytes", "patched", "PrunedCall", "pruned_forward", "prune"]
