// Feature Inspector shows its heat-map overlay in the node itself, as Preview Image does.
// The server sends it under `saeuron_overlay` (temp files); handing it to the page's own image
// preview (the node's `app.nodeOutputs` entry, as `images`) lets the page load, size and draw it,
// in the classic canvas and in Nodes 2.0, also for a node inside a subgraph.
import { app } from "../../scripts/app.js";

/** The key of a node's entry in `app.nodeOutputs`: its id, or `<subgraph id>:<id>` inside a subgraph. */
export function outputKey(node) {
	const graph = node.graph;
	return graph && graph.rootGraph && graph !== graph.rootGraph ? `${graph.id}:${node.id}` : String(node.id);
}

const extension = {
	name: "SAeUron.InspectorPreview",
	nodeCreated(node) {
		if (node.comfyClass !== "SAeUronFeatureInspector") return;
		const onExecuted = node.onExecuted;
		node.onExecuted = function (output) {
			onExecuted?.apply(this, arguments);
			if (!output?.saeuron_overlay?.length) return;
			const key = outputKey(this);
			// A new entry (not a change inside the old one): frontend 1.58 passes it on to its stores.
			app.nodeOutputs[key] = { ...(app.nodeOutputs[key] ?? output), images: output.saeuron_overlay };
			app.canvas?.setDirty(true, true);
		};
	},
};
// Served under two names (pyproject's `web` and WEB_DIRECTORY), this file runs twice: register once.
if (!app.extensions.some((e) => e.name === extension.name)) app.registerExtension(extension);
