// Readable titles and one-line descriptions for the pack's workflows in ComfyUI's template browser.
//
// What ComfyUI 0.3.64 and its frontend (comfyui-frontend-package 1.27) offer a custom node pack: the JSON files
// in the pack's workflows/ folder are listed by file name (app/custom_node_manager.py, GET /workflow_templates),
// and the browser shows that name as the card's title and, with "_" and "-" turned into spaces, as its
// description (useTemplateWorkflows: getTemplateTitle / getTemplateDescription); the thumbnail is <name>.jpg
// next to the workflow (shipped for every workflow, made by `make thumbnails`).  There is no index.json or
// metadata field for custom-node templates in this frontend (a .json index in workflows/ would itself be listed
// as a template).  So titles and descriptions live in templates.json next to this file (one entry per
// workflow, checked by tests/host/test_workflows.py), and this extension writes them into the pack's own cards
// (data-testid "template-workflow-<name>") when the browser renders them.  Nothing of the frontend is replaced:
// with another card layout nothing matches and the file names show as before.
import { app } from "../../scripts/app.js";

const CARD = '[data-testid^="template-workflow-"]';
const PREFIX = "template-workflow-";
let meta = {};

function relabel(root) {
  const cards = root.matches?.(CARD) ? [root] : root.querySelectorAll?.(CARD) ?? [];
  for (const card of cards) {
    const m = meta[card.getAttribute("data-testid").slice(PREFIX.length)];
    if (!m) continue;
    const title = card.querySelector("h3");
    const desc = card.querySelector("h3 ~ p") ?? card.querySelector("p");
    if (title && title.textContent !== m.title) {
      title.textContent = m.title;
      title.title = m.title;
    }
    if (desc && desc.textContent !== m.description) {
      desc.textContent = m.description;
      desc.title = m.description;
    }
    for (const img of card.querySelectorAll("img")) img.alt = m.title;
  }
}

app.registerExtension({
  name: "FreeSpeed.Templates",

  async setup() {
    try {
      const r = await fetch(new URL("./templates.json", import.meta.url));
      meta = r.ok ? await r.json() : {};
    } catch (e) {
      console.warn("FreeSpeed templates: no titles", e);
      return;
    }
    window.FreeSpeedTemplates = meta; // read-only, for tests
    relabel(document.body);
    new MutationObserver((records) => {
      for (const rec of records) {
        for (const n of rec.addedNodes) if (n.nodeType === 1) relabel(n);
        // the frontend rewrote a card's text (a re-render): write ours again
        const el = rec.target.nodeType === 1 ? rec.target : rec.target.parentElement;
        const card = el?.closest?.(CARD);
        if (card) relabel(card);
      }
    }).observe(document.body, { childList: true, subtree: true, characterData: true });
  },
});
