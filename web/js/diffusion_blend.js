// Diffusion Blend: show the scores of a "Diffusion Blend Score" node on the node itself.
//
// The frontend's current API is the global window.comfyAPI (app, widgets); the legacy module
// paths (/scripts/app.js, /scripts/widgets.js) are only a fallback for frontends without it --
// newer frontends warn about them and will remove them.
async function comfy() {
  const api = window.comfyAPI;
  if (api?.app?.app && api?.widgets?.ComfyWidgets) {
    return { app: api.app.app, ComfyWidgets: api.widgets.ComfyWidgets };
  }
  const [{ app }, { ComfyWidgets }] = await Promise.all([
    import("../../scripts/app.js"),
    import("../../scripts/widgets.js"),
  ]);
  return { app, ComfyWidgets };
}

const { app, ComfyWidgets } = await comfy();

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
