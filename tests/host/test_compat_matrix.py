"""The compatibility matrix (issue 17), UNet part: every FreeSpeed node next to what users put beside it,
through the real host on tiny SD1.5/SDXL models with peaked attention, one test per cell.

A cell *works* when (``compat_harness.check_works``): the node's "off" setting + the partner gives exactly
the partner's own output; with the node on, the output is finite, the node acted (its run stats), the steps
before it acts are bit-identical to the partner's own run, and the partner's effect is still there (the
partner changes the plain output, and with the node on it still moves the output the same way by a comparable
amount).  A cell is a *clear refusal* when the node raises, or logs one warning, naming both nodes and why.
Anything else fails the test (the cell is recorded as wrong).  Results go to ``compat_results.json``; the
README block is generated from it (``python -m tests.host.compat_report``; ``test_compat_readme.py``).
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import comfy.model_management as mm
import nodes as comfy_nodes

import compat_harness as H
import compat_report as R

NODES = H.NODES
STEPS = H.STEPS
CFG_COLUMNS = ("rescalecfg", "cfgnorm", "apg", "tcfg")


@pytest.fixture(scope="module", autouse=True)
def _record():
    H.MEMO.clear()
    yield
    H.RECORDER.flush()
    H.MEMO.clear()


class Ctx:
    """One tiny model and what its columns need (LoRA file, ControlNet, IP-Adapter-like patch)."""

    def __init__(self, tiny, arch: str, lora_dir: str):
        self.tiny, self.arch, self.base = tiny, arch, tiny.model
        self.lora = H.write_lora(self.base, lora_dir, f"freespeed_compat_{arch}.safetensors")
        self._cn = None

    @property
    def cn(self):
        if self._cn is None:
            self._cn = H.tiny_controlnet(self.tiny)
        return self._cn

    def run(self, model, **kw) -> H.Result:
        return H.ksampler(model, self.tiny, **kw)


@pytest.fixture(scope="module")
def ctx(sd15, sdxl, loras):
    return {"sd15": Ctx(sd15, "sd15", loras), "sdxl": Ctx(sdxl, "sdxl", loras)}


def archs(column: str) -> tuple:
    models = R.COLUMN_MODELS[column]
    return tuple(a for a, name in (("sd15", "SD1.5"), ("sdxl", "SDXL")) if name in models)


# ------------------------------------------------------------------------------------------------
# columns: partner model patches, conditioning partners and sampler routes
# ------------------------------------------------------------------------------------------------
def _controlnet_run(c: Ctx):
    def run(model):
        pos, neg = H.apply_controlnet(c.cn, c.tiny.cond(1), c.tiny.cond(2))
        return c.run(model, positive=pos, negative=neg)
    return run


def _guider_runs(c: Ctx):
    sigmas = H.basic_sigmas(c.base)
    return dict(run=lambda m: H.custom(m, c.tiny, sigmas, guider=H.cfg_guider(m, c.tiny)),
                run_partner=lambda m: H.custom(m, c.tiny, sigmas, guider=H.perpneg_guider(m, c.tiny)))


ONE = ("before",)

COLUMNS = {
    "lora_before": lambda c: [dict(partner=lambda m: H.lora(m, c.lora), orders=("before",))],
    "lora_after": lambda c: [dict(partner=lambda m: H.lora(m, c.lora), orders=("after",))],
    "controlnet": lambda c: [dict(run_partner=_controlnet_run(c))],
    "ipadapter": lambda c: [dict(partner=H.IPAdapterLike().apply)],
    # guidance functions live in sampler options FreeSpeed never touches: one order (FreeSpeed after them)
    "sag": lambda c: [dict(partner=H.sag, orders=ONE)],
    "pag": lambda c: [dict(partner=H.pag, orders=ONE)],
    "perpneg": lambda c: [_guider_runs(c)],
    "rescalecfg": lambda c: [dict(partner=H.rescale_cfg, orders=ONE)],
    "cfgnorm": lambda c: [dict(partner=H.cfg_norm, orders=ONE)],
    "apg": lambda c: [dict(partner=H.apg, orders=ONE)],
    "tcfg": lambda c: [dict(partner=H.tcfg, orders=ONE)],
    "freeu": lambda c: [dict(partner=H.freeu_v2)],
    "tome": lambda c: [dict(partner=H.tome)],
    # SDXL has no attention at its full latent resolution: HyperTile needs max_depth 1 there
    "hypertile": lambda c: [dict(partner=lambda m: H.hypertile(m, 0 if c.arch == "sd15" else 1))],
    "easycache": lambda c: [dict(partner=H.easycache)],
    "lazycache": lambda c: [dict(partner=H.lazycache)],
    "diffdiff": lambda c: [dict(partner=H.diff_diffusion, route="inpaint", orders=ONE,
                                run=lambda m: c.run(m, latent=H.image_latent(c.tiny), noise_mask=H.inpaint_mask()))],
    "vpred": lambda c: [dict(partner=H.vpred_zsnr, ms=H.vpred_zsnr(c.base).get_model_object("model_sampling"))],
    # every step of a denoise-0.3 run lies past 50%: the node acts from its first step (no prefix to compare)
    "img2img": lambda c: [dict(run=lambda m: c.run(m, latent=H.image_latent(c.tiny), denoise=0.3), prefix=False)],
    "custom_sigmas": lambda c: [dict(run=lambda m: H.custom(m, c.tiny, H.ays_sigmas(
        "SD1" if c.arch == "sd15" else "SDXL")))],
    "sde_ancestral": lambda c: [dict(run=lambda m: c.run(m, sampler="euler_ancestral")),
                                dict(run=lambda m: c.run(m, sampler="dpmpp_2m_sde"))],
}

# partner names a refusal or warning must mention, per column
PARTNER_NAMES = {"perpneg": ("PerpNeg",), "easycache": ("EasyCache",)}


def _note_for(node: str, column: str, measured: list) -> str:
    notes = []
    for m in measured:
        for s in (m.get("stats") or {}).values():
            n = H.aside_note(node, s, m["alone_stats"])
            if n and n not in notes:
                notes.append(n)
    if node == "tgate" and column in CFG_COLUMNS:
        skipped = all(s.get("uncond_evaluations_skipped", 0) > 0 for m in measured for s in m["stats"].values())
        assert skipped, "T-GATE should drop CFG after the gate"
        notes.append("after the gate T-GATE drops CFG (positive = negative), so this CFG function acts until the gate")
    return "; ".join(notes)


@pytest.mark.parametrize("column", list(COLUMNS))
@pytest.mark.parametrize("node", NODES)
def test_cell(node, column, ctx):
    special = SPECIAL.get((node, column))
    with H.RECORDER.cell(node, column):
        if special is not None:
            status, note = special(node, column, ctx)
        else:
            measured = []
            for arch in archs(column):
                c = ctx[arch]
                for i, kw in enumerate(COLUMNS[column](c)):
                    route = kw.pop("route", "ksampler" if "run" not in kw else f"{column}:{i}")
                    cell = H.Cell(node, c.base, kw.pop("run", c.run), **kw)
                    measured.append(H.check_works(cell, memo_key=(arch, column, i), route_key=(arch, route)))
            status, note = R.WORKS, _note_for(node, column, measured)
        getattr(H.RECORDER, status)(node, column, note)


# ------------------------------------------------------------------------------------------------
# special cells
# ------------------------------------------------------------------------------------------------
def _tgate_perpneg(node, column, ctx):
    """PerpNeg's guider evaluates positive, negative and empty prompt together; T-GATE's frozen cross-attention
    (one mean) would make them identical and PerpNeg's projection 0/0: T-GATE leaves such runs alone, with one
    warning naming the guider."""
    c = ctx["sd15"]
    runs = _guider_runs(c)
    alone = runs["run_partner"](c.base)
    m = H.fs(node, c.base)
    with H.warnings_logged() as log:
        got = runs["run_partner"](m)
    msgs = [x for x in log.messages() if "T-GATE" in x]
    assert len(msgs) == 1, log.messages()
    H.assert_clear_refusal(msgs[0], node, PARTNER_NAMES[column])
    assert H.same(got, alone) and torch.isfinite(got.out).all()
    assert H.activity(node, H.stats(m, node)) == 0
    # the standard CFG guider on the same route is gated as usual
    std = runs["run"](m)
    assert H.activity(node, H.stats(m, node)) > 0 and torch.isfinite(std.out).all()
    return R.REFUSED, ("PerpNegGuider evaluates positive, negative and empty prompt together; T-GATE's frozen "
                       "cross-attention would make them identical (PerpNeg's projection 0/0, NaN), so T-GATE leaves "
                       "the run unchanged with one warning")


def _encprop_easycache(node, column, ctx):
    """EasyCache before Encoder Propagation works; after it, EasyCache sits inside Encoder Propagation's
    DIFFUSION_MODEL wrapper and never sees decoder-only steps: one warning says so."""
    c = ctx["sd15"]
    measured = [H.check_works(H.Cell(node, c.base, c.run, partner=H.easycache, orders=("before",)),
                              memo_key=("sd15", column, 0), route_key=("sd15", "ksampler"))]
    m = H.easycache(H.fs(node, c.base))
    with H.warnings_logged() as log:
        got = c.run(m)
    msgs = [x for x in log.messages() if "Encoder Propagation" in x]
    assert len(msgs) == 1, log.messages()
    H.assert_clear_refusal(msgs[0], node, PARTNER_NAMES[column])
    assert torch.isfinite(got.out).all() and H.activity(node, H.stats(m, node)) > 0
    note = _note_for(node, column, measured)
    return R.WORKS, "; ".join(x for x in (note, "EasyCache after the node: one warning (it then sees only key "
                                                "steps); put it before") if x)


SPECIAL = {("tgate", "perpneg"): _tgate_perpneg, ("encprop", "easycache"): _encprop_easycache}


# ------------------------------------------------------------------------------------------------
# stacks of two FreeSpeed nodes, both orders
# ------------------------------------------------------------------------------------------------
PAIRS = [(a, b) for i, a in enumerate(NODES) for b in NODES[i:]]
# in stacks ToDo keeps level 2 full (its node default), so AT-EDM has stacks left to prune
STACK_KW = {"todo": dict(factors=(2.0, 1.0))}


def short(node: str) -> str:
    return H.label(node).replace("FreeSpeed ", "")


def _sfs(node, model, mode="late", kw=None):
    if mode == "off":
        return H.fs(node, model, "off")
    return H.fs(node, model, mode, **{**STACK_KW.get(node, {}), **((kw or {}).get(node) or {})})


def _stack_pair(c: Ctx, first: str, second: str, kw=None, prefix: bool = True) -> tuple:
    """``second`` on top of ``first``: both act, finite, no step before either acts changes, each one's "off"
    leaves exactly the other one's output, the stack differs from each alone and does not blow up.
    Returns (stats per node, FreeSpeed warnings logged)."""
    key = repr(sorted((kw or {}).items()))
    plain = H.MEMO.get(((c.arch, "ksampler"), ("plain",)), lambda: c.run(c.base))
    one = {n: H.MEMO.get((c.arch, "stack_alone", n, key), lambda n=n: c.run(_sfs(n, c.base, kw=kw)))
           for n in (first, second)}
    m = _sfs(second, _sfs(first, c.base, kw=kw), kw=kw)
    with H.warnings_logged() as log:
        got = c.run(m)
    assert torch.isfinite(got.out).all()
    for n in (first, second):
        assert H.activity(n, H.stats(m, n)) > 0, f"{H.label(n)} did nothing: {H.stats(m, n)}"
    assert not H.same(got, one[first]) and not H.same(got, one[second])
    if prefix:
        ms = c.base.get_model_object("model_sampling")
        for x, y in zip(got.prefix(ms), plain.prefix(ms)):
            assert torch.equal(x, y), "a step before either node acts differs"
    assert H.same(c.run(_sfs(second, _sfs(first, c.base, "off", kw), kw=kw)), one[second]), \
        f"{first} off changed {second}"
    assert H.same(c.run(_sfs(second, _sfs(first, c.base, kw=kw), "off", kw)), one[first]), \
        f"{second} off changed {first}"
    size = H.norm(got.out - plain.out) / (H.norm(one[first].out - plain.out) + H.norm(one[second].out - plain.out))
    assert size < 2.0, f"the stack moves the output {size:.2f}x the two nodes' own effects together"
    return {n: dict(H.stats(m, n)) for n in (first, second)}, [x for x in log.messages() if "FreeSpeed" in x]


def _stack_twice(c: Ctx, node: str) -> str:
    """The same node twice: exactly one node's output (the second one adds nothing, and breaks nothing)."""
    once = H.MEMO.get((c.arch, "stack_alone", node, repr([])), lambda: c.run(_sfs(node, c.base)))
    got = c.run(_sfs(node, _sfs(node, c.base)))
    assert torch.isfinite(got.out).all()
    assert H.same(got, once), f"two {H.label(node)} nodes differ from one"
    return {"encprop": "a second one replaces the first"}.get(node, "a second one changes nothing (same output as one)")


def _alone_stats(c: Ctx, node: str, kw=None) -> dict:
    def make():
        m = _sfs(node, c.base, kw=kw)
        c.run(m)
        return dict(H.stats(m, node))
    return H.MEMO.get((c.arch, "stack_alone_stats", node, repr(sorted((kw or {}).items()))), make)


def _mapreuse_atedm(c: Ctx, notes: dict) -> None:
    """Where Map Reuse computes attention (its keep and reuse steps) AT-EDM gets no map: with both acting late
    AT-EDM prunes nothing and says so in one warning; with AT-EDM from the start they split the run."""
    for first, second in (("mapreuse", "atedm"), ("atedm", "mapreuse")):
        m = _sfs(second, _sfs(first, c.base))
        with H.warnings_logged() as log:
            got = c.run(m)
        assert torch.isfinite(got.out).all() and H.activity("mapreuse", H.stats(m, "mapreuse")) > 0
        assert H.activity("atedm", H.stats(m, "atedm")) == 0
        msgs = [x for x in log.messages() if "AT-EDM" in x]
        assert len(msgs) == 1, log.messages()
        H.assert_clear_refusal(msgs[0], "atedm", ("Attention Map Reuse",))
        _stack_pair(c, first, second, kw={"atedm": dict(dsap_end=0.0, early_scale=1.0)}, prefix=False)
    notes["atedm"].append("AT-EDM prunes nothing where Map Reuse computes attention (its keep and reuse steps; one "
                          "warning): they act on different steps")
    notes["mapreuse"].append("AT-EDM prunes only outside Map Reuse's steps (one AT-EDM warning)")


@pytest.mark.parametrize("a,b", PAIRS)
def test_stack(a, b, ctx):
    ca, cb = f"with_{b}", f"with_{a}"
    with H.RECORDER.cell(a, ca), H.RECORDER.cell(b, cb):
        notes = {a: [], b: []}
        for arch in archs(ca):
            c = ctx[arch]
            if a == b:
                notes[a].append(_stack_twice(c, a))
                continue
            if (a, b) == ("mapreuse", "atedm"):
                _mapreuse_atedm(c, notes)
                continue
            for first, second in ((a, b), (b, a)):
                s, warned = _stack_pair(c, first, second)
                for n, other in ((a, b), (b, a)):
                    note = H.aside_note(n, s[n], _alone_stats(c, n), short(other))
                    if note:
                        notes[n].append(note)
                    mine = [w for w in warned if w.startswith(f"FreeSpeed {H.BY_KEY[n].name}:")]
                    if mine:
                        assert len(mine) == 1, mine
                        H.assert_clear_refusal(mine[0], n, (H.BY_KEY[other].name,))
                        notes[n].append("one warning says so")
        H.RECORDER.works(a, ca, "; ".join(dict.fromkeys(notes[a])))
        if a != b:
            H.RECORDER.works(b, cb, "; ".join(dict.fromkeys(notes[b])))


# ------------------------------------------------------------------------------------------------
# hires second pass, KSamplerAdvanced split, lowvram, torch.compile
# ------------------------------------------------------------------------------------------------
def _upscale(latent: torch.Tensor) -> torch.Tensor:
    return comfy_nodes.LatentUpscaleBy().upscale({"samples": latent}, "nearest-exact", 1.5)[0]["samples"]


@pytest.mark.parametrize("node", NODES)
def test_hires_second_pass(node, ctx):
    """The same patched MODEL samples 16x16 then, upscaled, 24x24 at denoise 0.5: the second pass acts, is
    finite and equals a fresh patched MODEL's run on the same input (nothing left from the other resolution)."""
    with H.RECORDER.cell(node, "hires"):
        for arch in archs("hires"):
            c = ctx[arch]
            m = H.fs(node, c.base)
            up = _upscale(c.run(m).out)
            second = c.run(m, latent=up, denoise=0.5)
            assert torch.isfinite(second.out).all()
            assert H.activity(node, H.stats(m, node)) > 0, H.stats(m, node)
            assert H.same(second, c.run(H.fs(node, c.base), latent=up, denoise=0.5))
            assert not H.same(second, c.run(c.base, latent=up, denoise=0.5))
            plain_up = H.MEMO.get((arch, "hires_up"), lambda: _upscale(c.run(c.base).out))
            plain_second = H.MEMO.get((arch, "hires_second"), lambda: c.run(c.base, latent=plain_up, denoise=0.5))
            off = H.fs(node, c.base, "off")
            assert H.same(c.run(off, latent=plain_up, denoise=0.5), plain_second)
        H.RECORDER.works(node, "hires")


def _ksa(model, c: Ctx, latent: dict, add_noise: str, start: int, end: int, leftover: str) -> dict:
    return comfy_nodes.KSamplerAdvanced().sample(model, add_noise, 0, STEPS, H.CFG, "euler", "normal", c.tiny.cond(1),
                                                 c.tiny.cond(2), latent, start, end, leftover)[0]


def _split(model, c: Ctx, node=None, at: int = 3):
    """KSamplerAdvanced steps 0..at with ``return_with_leftover_noise``, then at..end without noise, same MODEL;
    returns (samples, activity of the node in each segment)."""
    empty = {"samples": c.tiny.latent(H.H, H.W)}
    one = _ksa(model, c, empty, "enable", 0, at, "enable")
    acts = [H.activity(node, H.stats(model, node))] if node else []
    two = _ksa(model, c, one, "disable", at, 10000, "disable")
    if node:
        acts.append(H.activity(node, H.stats(model, node)))
        acts.append(dict(H.stats(model, node)))
    return two["samples"], acts


@pytest.mark.parametrize("node", NODES)
def test_ksampler_advanced_split(node, ctx):
    with H.RECORDER.cell(node, "ksampler_advanced"):
        c = ctx["sd15"]
        plain, _ = _split(c.base, c)
        assert H.close(plain, c.run(c.base).out)            # the split itself changes nothing (but rounding)
        off, _ = _split(H.fs(node, c.base, "off"), c)
        assert torch.equal(off, plain)
        m = H.fs(node, c.base)
        got, (act1, act2, seg2) = _split(m, c, node)
        assert torch.isfinite(got).all() and not torch.equal(got, plain)
        assert act2 > 0, seg2                                  # the second segment (steps 3-4, past 50%) acts
        fs_full = c.run(H.fs(node, c.base)).out
        if node in ("todo", "atedm"):                        # per-step techniques: the split run is the full run
            assert H.close(got, fs_full)
            note = ""
        else:                                                # caches restart with the second KSamplerAdvanced
            claims = {"tgate": (lambda: seg2["steps_before_gate"] == 0 and seg2["uncond_evaluations"] >= 1
                                and seg2["attn2_calls_skipped"] > 0 and seg2["uncond_evaluations_skipped"] >= 1,
                                "the second segment starts without T-GATE's cache: it caches at its first step and "
                                "gates the rest"),
                      "encprop": (lambda: seg2["planned_key_steps"] == [0] and seg2["decoder_only_steps"] > 0,
                                  "each segment starts with a key step (the second one's first step)"),
                      "mapreuse": (lambda: seg2["keep_steps"] == [0] and seg2["reuse_steps"] == [1],
                                   "the second segment keeps its maps at its first step and reuses them after")}
            ok, note = claims[node]
            assert ok(), seg2
            assert not H.close(got, fs_full)
        H.RECORDER.works(node, "ksampler_advanced", note)


@contextlib.contextmanager
def lowvram(memory: int = 64 * 1024):
    """Every model load as ComfyUI's lowvram mode does it (``ModelPatcher.partially_load`` with a small
    ``lowvram_model_memory``: weights cast per call, LoRA patches applied per call); restored afterwards."""
    orig = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return orig(self, memory, force_patch_weights=force_patch_weights)

    mm.unload_all_models()
    mm.LoadedModel.model_load = model_load
    try:
        yield
    finally:
        mm.LoadedModel.model_load = orig
        mm.unload_all_models()


@pytest.mark.parametrize("node", NODES)
def test_lowvram_partial_loading(node, ctx):
    """With a LoRA applied per call (lowvram): exactly the fully loaded model's output, plain and patched."""
    with H.RECORDER.cell(node, "lowvram"):
        c = ctx["sd15"]
        build = lambda mode: H.fs(node, H.lora(c.base, c.lora), mode)       # noqa: E731
        full = {mode: c.run(build(mode)) for mode in ("late", "off")}
        plain = c.run(H.lora(c.base, c.lora))
        with lowvram():
            m = build("late")
            got = c.run(m)
            assert m.model.model_lowvram and m.model.lowvram_patch_counter > 0
            assert H.activity(node, H.stats(m, node)) > 0
            off = c.run(build("off"))
            lv_plain = c.run(H.lora(c.base, c.lora))
        assert H.same(lv_plain, plain) and H.same(off, plain)
        assert H.same(got, full["late"]) and not H.same(got, plain)
        H.RECORDER.works(node, "lowvram")


# ------------------------------------------------------------------------------------------------
# hygiene: bypass (the input MODEL), re-queue (the cached patched MODEL again), another step count in between
# ------------------------------------------------------------------------------------------------
def _options_fingerprint(model) -> str:
    """What a node could have changed on a MODEL: its options, wrappers, callbacks, object and weight patches."""
    to = model.model_options.get("transformer_options", {})
    return repr((sorted(model.model_options), sorted(to), sorted((k, sorted(v)) for k, v in model.wrappers.items()),
                 sorted((k, sorted(v)) for k, v in model.callbacks.items()), sorted(model.object_patches),
                 sorted(model.patches), model.patches_uuid))


@pytest.mark.parametrize("node", NODES)
def test_hygiene(node, ctx):
    with H.RECORDER.cell(node, "bypass"), H.RECORDER.cell(node, "requeue"), H.RECORDER.cell(node, "step_change"):
        for arch in archs("bypass"):
            c = ctx[arch]
            before = _options_fingerprint(c.base)
            plain = H.MEMO.get(((arch, "ksampler"), ("plain",)), lambda: c.run(c.base))
            m = H.fs(node, c.base)
            assert _options_fingerprint(c.base) == before          # patching left the input MODEL alone
            first = c.run(m)
            assert H.technique(m, node).run is None              # the run state is dropped at the end of a run
            # bypass: the graph without the node samples the input MODEL, right after the patched one ran
            assert H.same(c.run(c.base), plain) and _options_fingerprint(c.base) == before
            assert not H.same(first, plain)
            # re-queue: the executor's cached patched MODEL sampled again
            assert H.same(c.run(m), first)
            # another step count in between (and the plain model), then the first setting again
            four = c.run(m, steps=4)
            assert H.same(four, c.run(H.fs(node, c.base), steps=4))
            c.run(c.base, steps=3)
            assert H.same(c.run(m), first)
        for column in ("bypass", "requeue", "step_change"):
            H.RECORDER.works(node, column)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smallest():
    """The smallest model for torch.compile, with SDPA attention: a one-level SD1.5 UNet, 2 steps (dynamo traces
    the whole UNet and every FreeSpeed hook; on CPU that costs seconds per graph)."""
    with H.sdpa_attention():
        yield H.smallest_sd15()


@pytest.fixture(scope="module")
def compiled_plain(smallest):
    with H.compile_counter() as cc:
        m = H.torch_compiled(smallest.model, cc)
        first = H.ksampler(m, smallest, steps=H.COMPILE_STEPS)
        g1 = cc.take()
        again = H.ksampler(m, smallest, steps=H.COMPILE_STEPS)
        g2 = cc.take()
    assert torch.allclose(first.out, H.ksampler(smallest.model, smallest, steps=H.COMPILE_STEPS).out, rtol=1e-5,
                          atol=1e-5 * float(first.out.abs().max()))
    assert H.same(again, first) and g1 > 0 and g2 == 0
    return first, g1, cc.breaks


@pytest.mark.parametrize("node", NODES)
def test_torch_compile(node, smallest, compiled_plain):
    """TorchCompileModel's wrapper (``comfy_api.torch_helpers.set_torch_compile_wrapper``, what the node calls)
    after the FreeSpeed node, with a backend that counts the graphs dynamo hands it and runs them eagerly: the
    node must still act and give its uncompiled output; recompiles and graph breaks are reported."""
    with H.RECORDER.cell(node, "torch_compile"):
        plain, plain_graphs, plain_breaks = compiled_plain
        kw = H.COMPILE_FS.get(node, {})
        eager_m = H.fs(node, smallest.model, **kw)
        eager = H.ksampler(eager_m, smallest, steps=H.COMPILE_STEPS)
        with H.compile_counter() as cc:
            m = H.torch_compiled(H.fs(node, smallest.model, **kw), cc)
            got = H.ksampler(m, smallest, steps=H.COMPILE_STEPS)
            cc.take()
            per_step = list(cc.per_step)
            assert H.activity(node, H.stats(m, node)) == H.activity(node, H.stats(eager_m, node)) > 0
            again = H.ksampler(m, smallest, steps=H.COMPILE_STEPS)
            requeue = cc.take()
        assert torch.isfinite(got.out).all()
        assert torch.allclose(got.out, eager.out, rtol=1e-5, atol=1e-5 * float(eager.out.abs().max()))
        assert not H.same(got, plain) and H.same(again, got)
        reasons = sorted(set(cc.breaks) - set(plain_breaks))
        H.RECORDER.works(node, "torch_compile", H.compile_note(per_step, requeue, reasons))
