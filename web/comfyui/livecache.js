// LiveCache frontend extension: shows on each LiveCache node what its last run did
// (e.g. how many U-Net calls were computed vs reused), from the "livecache.stats" event
// that our nodes send through ComfyUI's PromptServer. The event names the node that applied the
// technique (not the sampler that ran it).
//
// Why a DOM widget: a disabled canvas "text" widget is drawn as an empty greyed row by recent
// frontends (1.27+), and a node's {"ui": {"text": ...}} output is not rendered by all of them.
// A read-only <textarea> mounted through node.addDOMWidget shows on every frontend that has DOM
// widgets (all of 1.x); older ones fall back to the canvas text widget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WIDGET = "livecache_stats";

function statsBox() {
  const box = document.createElement("textarea");
  box.className = "livecache-stats";
  box.readOnly = true;
  box.rows = 3;
  box.spellcheck = false;
  Object.assign(box.style, {
    width: "100%", boxSizing: "border-box", resize: "none", overflow: "hidden",
    font: "11px monospace", color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
    border: "1px solid var(--border-color, #444)", borderRadius: "4px", padding: "4px",
  });
  return box;
}

function statsWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (existing) return existing;
  let widget;
  if (typeof node.addDOMWidget === "function") {
    const box = statsBox();
    widget = node.addDOMWidget(WIDGET, "livecache_stats", box, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => box.value,
      setValue: (value) => { box.value = value; },
      getMinHeight: () => 56,
    });
  } else {
    widget = node.addWidget("text", WIDGET, "", () => {}, { serialize: false });
    widget.disabled = true;
  }
  widget.serialize = false; // a run's report, not a setting: never saved into the workflow
  return widget;
}

function showStats(node, text) {
  const widget = statsWidget(node);
  widget.value = text;
  if (widget.element) widget.element.title = text;
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "LiveCache.Stats",
  setup() {
    api.addEventListener("livecache.stats", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (node) showStats(node, detail.text);
    });
  },
});
