// Save SAE says what it wrote ("saved my_sae.safetensors") under its widgets once it has run.
import { app } from "../../scripts/app.js";

const extension = {
	name: "SAeUron.SaveStatus",
	nodeCreated(node) {
		if (node.comfyClass !== "SAeUronSaveSAE") return;
		const onExecuted = node.onExecuted;
		node.onExecuted = function (output) {
			onExecuted?.apply(this, arguments);
			this.saeuronStatus = (output?.text ?? []).join(" ");
			this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1] + 24)]);
			app.graph.setDirtyCanvas(true, false);
		};
		const onDrawForeground = node.onDrawForeground;
		node.onDrawForeground = function (ctx) {
			onDrawForeground?.apply(this, arguments);
			if (!this.saeuronStatus || this.flags.collapsed) return;
			ctx.save();
			ctx.fillStyle = "#8c8";
			ctx.font = "13px sans-serif";
			ctx.textAlign = "left";
			ctx.fillText(`✔ ${this.saeuronStatus}`, 12, this.size[1] - 8);
			ctx.restore();
		};
	},
};
// Served under two names (pyproject's `web` and WEB_DIRECTORY), this file runs twice: register once.
if (!app.extensions.some((e) => e.name === extension.name)) app.registerExtension(extension);
