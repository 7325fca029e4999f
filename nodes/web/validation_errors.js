// Shows the pack's widget-validation messages in ComfyUI's error dialog.
//
// When only some outputs of a graph fail validation, the server queues the others and answers 200
// with `node_errors`; this page then only outlines the node in red and never says why. For the
// pack's nodes the message tells what to fix (e.g. "strength must be between 0 and 1"), so show it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

/** The dialog text for the pack's entries of a /prompt reply's `node_errors` ("" when there are none). */
export function formatPackErrors(nodeErrors) {
	const lines = [];
	for (const [id, entry] of Object.entries(nodeErrors ?? {})) {
		if (!String(entry?.class_type ?? "").startsWith("SAeUron")) continue;
		const title = app.graph?.getNodeById(Number(id))?.title ?? entry.class_type;
		lines.push(`${title} (node ${id}):`);
		for (const error of entry.errors ?? []) {
			lines.push(`    - ${error.message}${error.details ? ": " + error.details : ""}`);
		}
	}
	if (!lines.length) return "";
	return ["These nodes failed validation; outputs that need them were skipped:", ...lines].join("\n");
}

app.registerExtension({
	name: "SAeUron.ValidationErrors",
	setup() {
		const queuePrompt = api.queuePrompt.bind(api);
		api.queuePrompt = async function (number, prompt) {
			const reply = await queuePrompt(number, prompt);
			const text = formatPackErrors(reply?.node_errors);
			if (text) {
				const message = document.createElement("span");
				message.className = "saeuron-validation-errors";
				message.textContent = text;
				app.ui.dialog.show(message);
			}
			return reply;
		};
	},
});
