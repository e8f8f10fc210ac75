// LiveCache frontend extension: shows on each LiveCache node what its last run did
// (e.g. how many U-Net calls were computed vs reused), from the "livecache.stats" event
// that our nodes send through ComfyUI's PromptServer.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WIDGET = "livecache_stats";

function showStats(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = node.addWidget("text", WIDGET, "", () => {}, { serialize: false });
    widget.disabled = true;
  }
  widget.value = text;
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
