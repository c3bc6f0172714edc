// FreeSpeed canvas readout and schedule preview.
//
// Every FreeSpeed node gets a small panel at the bottom of its body:
//  * a bar over the denoising range (left = first step, right = end of denoising) showing where the
//    technique is active: green = saving work (gated, downsampled, decoder-only, map reused),
//    amber = steps it needs in full (key steps, cache step, maps kept), grey = runs as usual;
//  * one to three lines of text.
// Before a run (and whenever an input changes after one) the bar is a *preview* computed here from
// the node's widgets and the step count of the KSampler it feeds; the text names the setting.
// After a run the Python side sends "freespeed.stats" (nodes/hooks.py publish) with the run's stats,
// the readout line and the run's real segments (nodes/readout.py); those are shown until an input
// of the node changes again.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PANEL_H = 64;
const PAD = 10;
const BAR_H = 10;
const LINE_H = 13;
const MAX_LINES = 3;
const COLORS = { full: "#4b5563", active: "#22c55e", key: "#f59e0b" };
const DEFAULT_STEPS = 20;
const PAPER_50LS = [0, 2, 4, 6, 10, 20, 30, 50, 70];

// node id -> last message (kept even if the node is not on the canvas yet, e.g. inside a reload)
const lastRun = new Map();
// exposed for tests and for curious users (read-only use)
window.FreeSpeed = { lastRun, drawn: new Map(), previewSegments, widgetValue: (n, k) => widget(n, k) };

function isFreeSpeed(type) {
  return typeof type === "string" && type.startsWith("FreeSpeed") && !type.startsWith("FreeSpeedTest");
}

function widget(node, name) {
  const w = node.widgets?.find((x) => x.name === name);
  return w ? w.value : undefined;
}

function num(v, d) {
  const x = Number(v);
  return Number.isFinite(x) ? x : d;
}

function linkById(graph, id) {
  if (id == null || !graph) return null;
  const links = graph.links;
  if (!links) return null;
  return typeof links.get === "function" ? links.get(id) : links[id];
}

// steps of the first sampler downstream of this node's MODEL output (through other patch nodes)
function downstreamSteps(node, depth = 0) {
  if (!node || depth > 8) return null;
  const graph = node.graph ?? app.graph;
  for (const out of node.outputs ?? []) {
    for (const id of out.links ?? []) {
      const l = linkById(graph, id);
      const target = l && graph.getNodeById(l.target_id);
      if (!target) continue;
      const steps = widget(target, "steps");
      if (steps !== undefined && Number.isFinite(Number(steps))) return Number(steps);
      const deeper = downstreamSteps(target, depth + 1);
      if (deeper) return deeper;
    }
  }
  return null;
}

function stepOf(percent, steps) {
  // first step at or past a percent of denoising (0..100), as the Python side maps percents
  return Math.max(0, Math.min(steps, Math.ceil((percent / 100) * steps - 1e-9)));
}

function merge(kinds, steps) {
  const out = [];
  let start = 0;
  for (let i = 1; i <= steps; i++) {
    if (i === steps || kinds[i][0] !== kinds[start][0] || kinds[i][1] !== kinds[start][1]) {
      out.push({ start: start / steps, end: i / steps, kind: kinds[start][0], label: kinds[start][1] });
      start = i;
    }
  }
  return out;
}

function parsePercents(text) {
  return String(text ?? "")
    .split(/[,\s]+/)
    .map((s) => Number(s.replace("%", "")))
    .filter((x) => Number.isFinite(x) && x >= 0 && x <= 100);
}

// { segments, text } previewed from the node's current inputs
function previewSegments(node) {
  const steps = Math.max(1, Math.round(num(downstreamSteps(node), DEFAULT_STEPS)));
  const t = node.type ?? node.comfyClass;
  if (t === "FreeSpeedToDo") {
    const f1 = num(widget(node, "factor_level_1"), 1);
    const f2 = num(widget(node, "factor_level_2"), 1);
    const s = num(widget(node, "start_percent"), 0);
    const e = num(widget(node, "end_percent"), 1);
    if ((f1 <= 1 && f2 <= 1) || e < s) return { segments: [{ start: 0, end: 1, kind: "full", label: "off" }], text: "factors 1: off" };
    const segs = [];
    if (s > 0) segs.push({ start: 0, end: s, kind: "full", label: "full attention" });
    segs.push({ start: s, end: e, kind: "active", label: "K/V downsampled" });
    if (e < 1) segs.push({ start: e, end: 1, kind: "full", label: "full attention" });
    const lv = [f1 > 1 ? `÷${f1} at level 1` : null, f2 > 1 ? `÷${f2} at level 2` : null].filter(Boolean).join(", ");
    return { segments: segs, text: `K/V ${lv} · window ${Math.round(s * 100)}–${Math.round(e * 100)}%` };
  }
  if (t === "FreeSpeedTGate") {
    const g = num(widget(node, "gate"), 0.4);
    if (g >= 1) return { segments: [{ start: 0, end: 1, kind: "full", label: "gate off" }], text: "gate off (100%)" };
    const before = stepOf(g * 100, steps);
    const kinds = [];
    for (let i = 0; i < steps; i++) kinds.push(i < before ? (i === before - 1 ? ["key", "cache step"] : ["full", "before gate"]) : ["active", "gated"]);
    const cfg = widget(node, "keep_cfg") ? "CFG kept" : "CFG off after gate";
    return { segments: merge(kinds, steps), text: `gate at step ${before}/${steps} · ${cfg}` };
  }
  if (t === "FreeSpeedEncoderPropagation") {
    const mode = widget(node, "schedule") ?? "paper 50ls";
    let keys;
    if (mode === "every k steps") {
      const k = Math.max(1, Math.round(num(widget(node, "every_k"), 4)));
      keys = [];
      for (let i = 0; i < steps; i += k) keys.push(i);
    } else {
      const ps = mode === "custom percents" ? parsePercents(widget(node, "key_percents")) : PAPER_50LS;
      keys = ps.map((p) => stepOf(p, steps));
    }
    const keySet = new Set([0, ...keys.filter((k) => k < steps)]);
    const kinds = [];
    for (let i = 0; i < steps; i++) kinds.push(keySet.has(i) ? ["key", "key step"] : ["active", "decoder only"]);
    return { segments: merge(kinds, steps), text: `${keySet.size} key steps/${steps} · ${steps - keySet.size} decoder-only` };
  }
  if (t === "FreeSpeedAttentionMapReuse") {
    const mode = widget(node, "schedule") ?? "late (paper)";
    const reuse = new Set();
    if (mode === "late (paper)") {
      const first = stepOf(num(widget(node, "start"), 0.5) * 100, steps);
      const k = Math.max(0, Math.round(num(widget(node, "refresh_every"), 0)));
      for (let i = first; i < steps; i++) {
        const p = first > 0 ? i - first + 1 : i - first;
        if (i === 0 || (k > 0 && p % k === 0)) continue;
        reuse.add(i);
      }
    } else if (mode === "custom percents") {
      for (const p of parsePercents(widget(node, "custom_percents"))) {
        const s = stepOf(p, steps);
        if (s > 0 && s < steps) reuse.add(s);
      }
    }
    const kinds = [];
    for (let i = 0; i < steps; i++) kinds.push(reuse.has(i) ? ["active", "map reused"] : reuse.has(i + 1) ? ["key", "maps kept"] : ["full", "computed"]);
    return { segments: merge(kinds, steps), text: reuse.size ? `${reuse.size} reuse steps/${steps}` : "no reuse step" };
  }
  if (t === "FreeSpeedAttentionMapReuseSearch") {
    const n = Math.round(num(widget(node, "steps"), 20));
    const budget = Math.round(num(widget(node, "reuse_steps"), 10));
    return { segments: [], text: `searches ${budget} reuse steps of ${n} (${n + 2} calibration runs)` };
  }
  return { segments: [], text: "" };
}

function signature(node) {
  return JSON.stringify([(node.widgets ?? []).map((w) => w.value), downstreamSteps(node)]);
}

function wrap(ctx, text, width) {
  const words = String(text).split(" ");
  const lines = [];
  let line = "";
  for (const w of words) {
    const next = line ? `${line} ${w}` : w;
    if (ctx.measureText(next).width > width && line) {
      lines.push(line);
      line = w;
    } else {
      line = next;
    }
  }
  if (line) lines.push(line);
  if (lines.length > MAX_LINES) {
    lines.length = MAX_LINES;
    lines[MAX_LINES - 1] += " …";
  }
  return lines;
}

function drawPanel(node, ctx) {
  const w = node.size[0];
  const y0 = node.size[1] - PANEL_H + 4;
  const run = lastRun.get(String(node.id));
  const sig = signature(node);
  if (run && run.sig === undefined) run.sig = sig; // first draw after the run: settings are the run's
  const fresh = run && run.sig === sig;
  const useRun = run && run.sig === sig && Array.isArray(run.segments) && run.segments.length;
  const preview = previewSegments(node);
  const segs = useRun ? run.segments : preview.segments;
  const tag = useRun ? "last run" : "preview";
  ctx.save();
  // bar
  const x0 = PAD;
  const bw = Math.max(10, w - 2 * PAD);
  ctx.fillStyle = "#111827";
  ctx.fillRect(x0, y0, bw, BAR_H);
  for (const s of segs) {
    ctx.fillStyle = COLORS[s.kind] ?? COLORS.full;
    const a = x0 + s.start * bw;
    const b = x0 + s.end * bw;
    ctx.fillRect(a, y0, Math.max(1, b - a - 0.5), BAR_H);
  }
  ctx.strokeStyle = useRun ? "#9ca3af" : "#6b7280";
  ctx.setLineDash(useRun ? [] : [3, 2]);
  ctx.strokeRect(x0 + 0.5, y0 + 0.5, bw - 1, BAR_H - 1);
  ctx.setLineDash([]);
  // text
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  let text;
  if (run && fresh) text = `${tag}: ${run.readout}`;
  else if (run) text = `${tag}: ${preview.text} (last run: ${run.readout})`;
  else text = `${tag}: ${preview.text}`;
  ctx.fillStyle = run && fresh ? "#e5e7eb" : "#9ca3af";
  const lines = wrap(ctx, text, bw);
  lines.forEach((ln, i) => ctx.fillText(ln, x0, y0 + BAR_H + 4 + i * LINE_H));
  ctx.restore();
  window.FreeSpeed.drawn.set(String(node.id), { text, tag, segments: segs });
}

app.registerExtension({
  name: "FreeSpeed.Readout",

  async setup() {
    api.addEventListener("freespeed.stats", ({ detail }) => {
      if (!detail || detail.node == null) return;
      const id = String(detail.node);
      const node = app.graph?.getNodeById(id) ?? app.graph?.getNodeById(Number(id));
      const readout = typeof detail.readout === "string" && detail.readout ? detail.readout : summarize(detail.stats);
      lastRun.set(id, {
        readout,
        segments: Array.isArray(detail.segments) ? detail.segments : [],
        stats: detail.stats ?? {},
        speedup: detail.speedup_est ?? null,
        sig: node ? signature(node) : undefined,
        at: Date.now(),
      });
      app.graph?.setDirtyCanvas?.(true, false);
      app.canvas?.setDirty?.(true, false);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isFreeSpeed(nodeData?.name)) return;
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function (...args) {
      const size = computeSize ? computeSize.apply(this, args) : [this.size[0], this.size[1]];
      return [size[0], size[1] + PANEL_H];
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const r = onDrawForeground?.apply(this, [ctx, ...rest]);
      if (!this.flags?.collapsed) {
        try {
          drawPanel(this, ctx);
        } catch (e) {
          console.warn("FreeSpeed readout:", e);
        }
      }
      return r;
    };
    const fit = (node) => {
      const min = node.computeSize();
      if (node.size[1] < min[1] || node.size[0] < min[0]) node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      fit(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      fit(this);
      return r;
    };
  },
});

// a line from the raw stats, for a server whose Python side sent no readout
function summarize(stats) {
  if (!stats || typeof stats !== "object") return "ran";
  const parts = [];
  if (stats.steps) parts.push(`${stats.steps} steps`);
  if (stats.evaluations) parts.push(`${stats.evaluations} model calls`);
  if (stats.wall_s != null) parts.push(`${Number(stats.wall_s).toFixed(2)} s`);
  return parts.join(" · ") || "ran";
}
