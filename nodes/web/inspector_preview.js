// Feature Inspector shows its heat-map overlay in the node itself, as Preview Image does.
// The server sends it under `saeuron_overlay` (temp files); handing it to the page's own image
// preview (`app.nodeOutputs[id].images`) lets the page load, size and draw it as usual.
import { app } from "../../scripts/app.js";

const extension = {
	name: "SAeUron.InspectorPreview",
	nodeCreated(node) {
		if (node.comfyClass !== "SAeUronFeatureInspector") return;
		const onExecuted = node.onExecuted;
		node.onExecuted = function (output) {
			onExecuted?.apply(this, arguments);
			const outputs = app.nodeOutputs[this.id + ""];
			if (outputs && output?.saeuron_overlay?.length) {
				outputs.images = output.saeuron_overlay;
				app.graph.setDirtyCanvas(true, false);
			}
		};
	},
};
// Served under two names (pyproject's `web` and WEB_DIRECTORY), this file runs twice: register once.
if (!app.extensions.some((e) => e.name === extension.name)) app.registerExtension(extension);
