// FreeSpeed canvas readout and schedule preview.
//
// Every FreeSpeed node gets a small panel at the bottom of its body:
//  * a bar over the denoising range (left = first step, right = end of denoising) showing where the
//    technique is active: green = saving work (gated, downsampled, decoder-only, map reused),
//    amber = steps it needs in full (key steps, cache step, maps kept), grey = runs as usual;
//  * one to three lines of text.
// Before a run (and whenever an input changes after one) the bar is a *preview* the server computes with the
// Python schedules (core/preview.py) from the node's widgets and the step count of the KSampler it feeds.
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

// node id -> last message (kept even if the node is not on the canvas yet, e.g. inside a reload)
const lastRun = new Map();
// node id -> { sig, segments, text, pending }: the schedule preview the server computed (POST /freespeed/preview,
// the Python schedules themselves: one definition of every schedule)
const previews = new Map();
// exposed for tests and for curious users (read-only use)
window.FreeSpeed = { lastRun, previews, drawn: new Map(), previewSegments, widgetValue: (n, k) => widget(n, k) };

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

// { segments, text } of the node's current inputs: the server's answer for this signature, asked for once
function previewSegments(node) {
  const id = String(node.id);
  const sig = signature(node);
  const known = previews.get(id);
  if (known && known.sig === sig) return known;
  const entry = { sig, segments: known?.segments ?? [], text: known?.text ?? "…", pending: true };
  previews.set(id, entry);
  const widgets = Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value]));
  const steps = Math.max(1, Math.round(num(downstreamSteps(node), DEFAULT_STEPS)));
  api
    .fetchApi("/freespeed/preview", { method: "POST", body: JSON.stringify({ type: node.type ?? node.comfyClass, widgets, steps }) })
    .then((r) => r.json())
    .then((p) => {
      if (previews.get(id) !== entry) return;
      previews.set(id, { sig, segments: Array.isArray(p.segments) ? p.segments : [], text: String(p.text ?? ""), pending: false });
      app.graph?.setDirtyCanvas?.(true, false);
    })
    .catch(() => {
      if (previews.get(id) === entry) previews.set(id, { sig, segments: [], text: "no preview", pending: false });
    });
  return entry;
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
  const tag = fresh ? "last run" : "preview"; // a run's readout is labelled as such, bar or no bar (FreeSpeed Auto)
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
