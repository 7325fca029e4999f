// Save SAE and Save Concepts say what they wrote ("✔ saved my_sae.safetensors") under their widgets once
// they have run.
// A DOM widget (not drawn on the canvas): the classic canvas and Nodes 2.0 both show those.
import { app } from "../../scripts/app.js";

const STATUS = "saeuron_status";

function statusWidget(node) {
	const found = node.widgets?.find((w) => w.name === STATUS);
	if (found) return found;
	const element = document.createElement("div");
	element.className = "saeuron-save-status";
	element.style.cssText = "color: #8c8; font: 13px sans-serif; padding: 2px 8px; overflow: hidden; " +
		"white-space: nowrap; text-overflow: ellipsis;";
	// Not a value: kept out of the saved workflow and of the graph sent to the server.
	const widget = node.addDOMWidget(STATUS, "saeuron-status", element, {
		serialize: false,
		hideOnZoom: false,
		getMinHeight: () => 22,
		getMaxHeight: () => 22,
	});
	widget.serialize = false;
	return widget;
}

const extension = {
	name: "SAeUron.SaveStatus",
	nodeCreated(node) {
		if (!["SAeUronSaveSAE", "SAeUronSaveConcepts"].includes(node.comfyClass)) return;
		const onExecuted = node.onExecuted;
		node.onExecuted = function (output) {
			onExecuted?.apply(this, arguments);
			const text = (output?.text ?? []).join(" ");
			if (!text) return;
			statusWidget(this).element.textContent = `✔ ${text}`;
			this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
			app.canvas?.setDirty(true, true);
		};
	},
};
// Served under two names (pyproject's `web` and WEB_DIRECTORY), this file runs twice: register once.
if (!app.extensions.some((e) => e.name === extension.name)) app.registerExtension(extension);
