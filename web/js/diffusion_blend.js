// Diffusion Blend: show the scores of a "Diffusion Blend Score" node on the node itself.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "diffusion_blend.score_display",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DiffusionBlendScore") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "scores_display");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "scores_display", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.style.opacity = 0.8;
        widget.serialize = false;
      }
      widget.value = text;
      this.onResize?.(this.size);
      app.graph.setDirtyCanvas(true, false);
    };
  },
});
