// FreeSpeed browser check, driven by tests/browser/test_browser.py (which starts the ComfyUI server).
//
//   node run.mjs <server url> <spec.json> <out dir>
//
// spec.json: {"shipped": {name: ui workflow}, "run": ui workflow, "steps": n, "timeout_s": s}
// Prints one JSON report on stdout; screenshots go to <out dir>.  Headless Chromium from the Debian
// package (/usr/bin/chromium, or $CHROMIUM_PATH) driven by playwright-core (no bundled browser).
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const [url, specPath, outDir] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(specPath, "utf-8"));
const timeout = (spec.timeout_s ?? 180) * 1000;
fs.mkdirSync(outDir, { recursive: true });

const report = { console: [], pageErrors: [], shipped: {}, templates: null, run: null, preview: null, screenshots: [] };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 }, deviceScaleFactor: 1 });
  page.setDefaultTimeout(timeout);
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") report.console.push(`${m.type()}: ${m.text()}`.slice(0, 500));
  });
  page.on("pageerror", (e) => report.pageErrors.push(String(e.stack || e).slice(0, 1500)));
  page.on("response", (r) => {
    if (r.status() >= 400) report.console.push(`HTTP ${r.status()} ${r.url()}`);
  });

  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.FreeSpeed, null, { timeout });
  await page.waitForTimeout(1000);
  await page.keyboard.press("Escape");

  // place nodes centred in a screen box (default: the canvas below the menu), zoomed to fit (at most maxScale):
  // ids = node ids, "freespeed" = the FreeSpeed nodes (all when there are none), null = all; returns the screen
  // rectangle they occupy (with a margin)
  const fit = (ids, box = null, maxScale = 1.25) => page.evaluate(({ ids, box, maxScale }) => {
    const app = window.comfyAPI.app.app;
    const all = app.graph._nodes;
    const ours = all.filter((n) => String(n.type).startsWith("FreeSpeed"));
    const nodes = ids === "freespeed" ? (ours.length ? ours : all) : ids ? ids.map((id) => app.graph.getNodeById(id)) : all;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 30;
    const y0 = Math.min(...nodes.map((n) => n.pos[1])) - 60;
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 30;
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 30;
    const rect = app.canvas.canvas.getBoundingClientRect();
    const b = box ?? { x: rect.left + 20, y: rect.top + 100, width: rect.width - 40, height: rect.height - 140 };
    const scale = Math.min(maxScale, b.width / (x1 - x0), b.height / (y1 - y0));
    const w = (x1 - x0) * scale;
    const h = (y1 - y0) * scale;
    const left = b.x + (b.width - w) / 2;
    const top = b.y + (b.height - h) / 2;
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(left - rect.left) / scale - x0, (top - rect.top) / scale - y0];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return { x: left, y: top, width: w, height: h };
  }, { ids, box, maxScale });

  // a square JPEG of the workflow (the template card's thumbnail box is square): its FreeSpeed nodes framed in
  // the middle of a square region of the canvas below the menu (the rest of the graph around them, as far as it
  // fits), screenshotted (DOM widgets included), scaled down to 512² in the page
  const thumbnail = async (file) => {
    const box = { x: 60 + (1540 - 816) / 2, y: 80, width: 816, height: 816 };
    await fit("freespeed", box, 1.5);
    await page.waitForTimeout(150);
    const png = await page.screenshot({ clip: box });
    const jpeg = await page.evaluate(async (src) => {
      const img = new Image();
      img.src = src;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = 512;
      c.height = 512;
      const ctx = c.getContext("2d");
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(img, 0, 0, c.width, c.height);
      return c.toDataURL("image/jpeg", 0.85).split(",")[1];
    }, `data:image/png;base64,${png.toString("base64")}`);
    fs.writeFileSync(file, Buffer.from(jpeg, "base64"));
  };

  // steps 1-5: the shipped workflows, a run of the stacked one, the preview, the template browser
  // (spec.shipped); step 6: the Auto node (spec.auto)
  if (spec.shipped) {
    // 1. every shipped workflow loads with its widget values exactly where the JSON put them
    fs.mkdirSync(path.join(outDir, "workflows"), { recursive: true });
    for (const [name, wf] of Object.entries(spec.shipped)) {
      report.shipped[name] = await page.evaluate(async (wf) => {
        const app = window.comfyAPI.app.app;
        await app.loadGraphData(structuredClone(wf), true, false, null);
        const out = { nodes: app.graph._nodes.length, mismatches: [], missing: [], sizes: {} };
        for (const n of wf.nodes) {
          const node = app.graph.getNodeById(n.id);
          if (!node) { out.missing.push(n.id); continue; }
          if (node.type !== n.type) out.mismatches.push(`${n.id}: type ${node.type} != ${n.type}`);
          out.sizes[n.type] = [node.size[0], node.size[1], ...node.computeSize()];
          if (n.type === "Note") continue;
          const got = (node.widgets ?? []).filter((w) => w.serialize !== false || w.name === "control_after_generate").map((w) => w.value);
          const want = n.widgets_values ?? [];
          if (JSON.stringify(got) !== JSON.stringify(want)) out.mismatches.push(`${n.id} ${n.type}: ${JSON.stringify(got)} != ${JSON.stringify(want)}`);
        }
        return out;
      }, wf);
      const shot = path.join(outDir, "workflows", `${name}.png`);
      await fit(null);
      await page.waitForTimeout(100);
      await page.screenshot({ path: shot });
      report.screenshots.push(shot);
      // its template-browser thumbnail (<name>.jpg next to the workflow; `make thumbnails` copies them there)
      await thumbnail(path.join(outDir, "workflows", `${name}.jpg`));
    }

    // 2. the template browser's listing names them under the pack
    report.templates = await page.evaluate(async () => {
      const api = window.comfyAPI.api.api;
      return await api.getWorkflowTemplates();
    });

    // 3. the tiny workflow runs; every FreeSpeed node draws its readout
    const ids = await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      const api = window.comfyAPI.api.api;
      window.__fsErrors = [];
      api.addEventListener("execution_error", ({ detail }) => window.__fsErrors.push(detail?.exception_message ?? "error"));
      await app.loadGraphData(structuredClone(wf), true, false, "freespeed-browser-test");
      await app.queuePrompt(0, 1);
      return wf.nodes.filter((n) => n.type.startsWith("FreeSpeed") && !n.type.startsWith("FreeSpeedTest")).map((n) => String(n.id));
    }, spec.run);
    await page.waitForFunction(
      (ids) => ids.every((id) => window.FreeSpeed.lastRun.has(id)) || window.__fsErrors.length > 0,
      ids,
      { timeout },
    );
    // frame the FreeSpeed nodes and redraw
    const clip = await fit(ids);
    await page.waitForTimeout(500);
    report.run = await page.evaluate((ids) => {
      const F = window.FreeSpeed;
      return {
        errors: window.__fsErrors,
        nodes: Object.fromEntries(ids.map((id) => [id, {
          type: window.comfyAPI.app.app.graph.getNodeById(id).type,
          readout: F.lastRun.get(id)?.readout ?? null,
          segments: F.lastRun.get(id)?.segments ?? null,
          drawn: F.drawn.get(id) ?? null,
        }])),
      };
    }, ids);
    const full = path.join(outDir, "canvas.png");
    await page.screenshot({ path: full });
    const crop = path.join(outDir, "readout.png");
    await page.screenshot({ path: crop, clip });
    report.screenshots.push(full, crop);

    // 4. live preview: change T-GATE's gate, the bar and text follow without a run (the server computes the
    //    preview with the Python schedules: redraw until its answer is in)
    report.preview = await page.evaluate(async () => {
      const app = window.comfyAPI.app.app;
      const node = app.graph._nodes.find((n) => n.type === "FreeSpeedTGate");
      if (!node) return null;
      const before = window.FreeSpeed.drawn.get(String(node.id));
      const w = node.widgets.find((x) => x.name === "gate");
      w.value = 0.7;
      w.callback?.(0.7, app.canvas, node);
      return { id: String(node.id), before };
    });
    if (report.preview) {
      // wait for the redraw: the server's answer for the new gate is in (not pending) and the canvas has drawn
      // it as the preview (polled with a redraw each time; a fixed sleep raced the answer on a slow machine)
      await page.waitForFunction((id) => {
        const app = window.comfyAPI.app.app;
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        const entry = window.FreeSpeed.previews.get(id);
        const drawn = window.FreeSpeed.drawn.get(id);
        return !!entry && !entry.pending && drawn?.tag === "preview" && drawn.text.startsWith(`preview: ${entry.text}`);
      }, report.preview.id, { timeout: 30000, polling: 100 });
      report.preview.after = await page.evaluate((id) => window.FreeSpeed.drawn.get(id), report.preview.id);
    }
    const prev = path.join(outDir, "preview.png");
    await page.screenshot({ path: prev, clip });
    report.screenshots.push(prev);

    // 5. the template browser: the pack's category lists the workflows
    report.templateDialog = { error: null, text: "", cards: {} };
    try {
      await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
      const dialog = page.locator(".p-dialog").last();
      await dialog.waitFor({ state: "visible", timeout: 30000 });
      await dialog.getByText(spec.pack, { exact: false }).first().click({ timeout: 30000 });
      // the pack's cards carry their titles (web/templates.js) and thumbnails: wait for both on the first screen
      // (the frontend's LazyImage: a card on screen shows its image once loaded, or an icon when it failed)
      await page.waitForFunction(() => {
        const cards = [...document.querySelectorAll('.p-dialog [data-testid^="template-workflow-freespeed"]')];
        const meta = window.FreeSpeedTemplates ?? {};
        return cards.length > 0 && cards.every((c) => {
          const m = meta[c.getAttribute("data-testid").slice("template-workflow-".length)];
          const img = c.querySelector("img");
          const onScreen = c.getBoundingClientRect().top < window.innerHeight;
          const settled = !onScreen || c.querySelector(".pi-image") || (img?.complete && img.naturalWidth > 0);
          return m && c.querySelector("h3")?.textContent === m.title && settled;
        });
      }, null, { timeout: 30000, polling: 200 });
      await page.waitForTimeout(800);
      const tpl = path.join(outDir, "templates.png");
      await page.screenshot({ path: tpl });
      report.screenshots.push(tpl);
      // what each of the pack's cards shows: title, description, thumbnail (loaded or not)
      const cards = () => page.evaluate(() => Object.fromEntries(
        [...document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]')].map((c) => {
          const img = c.querySelector("img");
          return [c.getAttribute("data-testid").slice("template-workflow-".length), {
            title: c.querySelector("h3")?.textContent ?? null,
            description: c.querySelector("h3 ~ p")?.textContent ?? c.querySelector("p")?.textContent ?? null,
            thumbnail: img ? { src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0 && getComputedStyle(img).display !== "none" } : null,
          }];
        })));
      report.templateDialog.cards = await cards();
      // the grid renders lazily as it scrolls: collect its text while scrolling every scrollable part
      let seen = await dialog.innerText();
      for (let i = 0; i < 25; i++) {
        const moved = await page.evaluate(() => {
          const dlg = [...document.querySelectorAll(".p-dialog")].pop();
          let any = false;
          for (const el of dlg ? dlg.querySelectorAll("*") : []) {
            if (el.scrollHeight > el.clientHeight + 4 && el.scrollTop + el.clientHeight < el.scrollHeight - 2) {
              el.scrollTop += el.clientHeight;
              any = true;
            }
          }
          return any;
        });
        await page.waitForTimeout(400);
        seen += "\n" + (await dialog.innerText());
        for (const [name, card] of Object.entries(await cards())) {
          if (!report.templateDialog.cards[name]?.thumbnail?.loaded) report.templateDialog.cards[name] = card;
        }
        if (!moved) break;
      }
      report.templateDialog.text = seen.slice(0, 60000);
    } catch (e) {
      report.templateDialog.error = String(e).slice(0, 1000);
    }
  }

  // 6. FreeSpeed Auto on the canvas: built from the node library (widgets set by name), run on the tiny
  //    checkpoint with a tiny budget; its readout is drawn and its report image shows on the canvas
  //    (in the Auto node or in the PreviewImage fed by its report output)
  if (spec.auto) {
    const ids = await page.evaluate(async (cfg) => {
      const app = window.comfyAPI.app.app;
      const api = window.comfyAPI.api.api;
      const LG = window.LiteGraph ?? window.comfyAPI.litegraph?.LiteGraph;
      window.__fsErrors = [];
      api.addEventListener("execution_error", ({ detail }) => window.__fsErrors.push(detail?.exception_message ?? "error"));
      app.graph.clear();
      const add = (type, pos, widgets = {}) => {
        const n = LG.createNode(type);
        n.pos = pos;
        app.graph.add(n);
        for (const [k, v] of Object.entries(widgets)) {
          const w = n.widgets?.find((x) => x.name === k);
          if (w) w.value = v;
        }
        return n;
      };
      const ckpt = add("CheckpointLoaderSimple", [20, 40], { ckpt_name: cfg.ckpt });
      const pos = add(cfg.cond, [20, 220], { seed: 1 });
      const neg = add(cfg.cond, [20, 380], { seed: 2 });
      const lat = add("EmptyLatentImage", [20, 540], { width: cfg.size, height: cfg.size, batch_size: 1 });
      const auto = add("FreeSpeedAuto", [420, 40], cfg.widgets);
      const prev = add("PreviewImage", [900, 40]);
      const slot = (n, name) => n.outputs.findIndex((o) => o.name === name || o.label === name);
      const inSlot = (n, name) => n.inputs.findIndex((i) => i.name === name);
      ckpt.connect(0, auto, inSlot(auto, "model"));
      pos.connect(0, auto, inSlot(auto, "positive"));
      neg.connect(0, auto, inSlot(auto, "negative"));
      lat.connect(0, auto, inSlot(auto, "latent_image"));
      auto.connect(Math.max(0, slot(auto, "report")), prev, 0);
      await app.queuePrompt(0, 1);
      return { auto: String(auto.id), preview: String(prev.id) };
    }, spec.auto);
    const shown = (ids) => {
      const app = window.comfyAPI.app.app;
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      const loaded = (id) => {
        const n = app.graph.getNodeById(id) ?? app.graph.getNodeById(Number(id));
        return (n?.imgs ?? []).some((im) => im.complete && im.naturalWidth > 0);
      };
      return window.__fsErrors.length > 0 || (window.FreeSpeed.lastRun.has(ids.auto) && (loaded(ids.auto) || loaded(ids.preview)));
    };
    await page.waitForFunction(shown, ids, { timeout, polling: 250 });
    const clip = await fit([Number(ids.auto), Number(ids.preview)]);
    await page.waitForTimeout(300);
    report.auto = await page.evaluate((ids) => {
      const app = window.comfyAPI.app.app;
      const img = (id) => {
        const n = app.graph.getNodeById(Number(id));
        const im = (n?.imgs ?? []).find((x) => x.complete && x.naturalWidth > 0);
        return im ? { width: im.naturalWidth, height: im.naturalHeight } : null;
      };
      const node = app.graph.getNodeById(Number(ids.auto));
      return {
        ids,
        errors: window.__fsErrors,
        type: node?.type ?? null,
        size: node ? [node.size[0], node.size[1]] : null,
        readout: window.FreeSpeed.lastRun.get(ids.auto)?.readout ?? null,
        drawn: window.FreeSpeed.drawn.get(ids.auto) ?? null,
        image: img(ids.auto) ?? img(ids.preview),
      };
    }, ids);
    const shot = path.join(outDir, "auto.png");
    await page.screenshot({ path: shot, clip });
    report.screenshots.push(shot);
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report) + "\n");
