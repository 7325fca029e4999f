// The pack's widget-validation messages, once each and naming the input they are about.
//
// A V3 node's `validate_inputs` checks all its inputs at once, and the server reports a failure once
// per input the function takes ("<input> - <message>"), so one bad strength came back 8 times, each
// time under another input's name. Here each distinct message of a pack node is kept once, under the
// input the message names (falling back to no input), before the frontend shows or highlights them.
// When only some outputs of a graph fail validation, the server queues the others and answers 200
// with `node_errors`; frontends without an errors panel (1.27) then only outline the node in red, so
// the message is shown in a dialog there.
//
// Frontends with the errors panel (1.40 and later) report a failed run in a toast that names only the
// node ("Concept Eraser (SAE) failed ... Check its inputs"); for the pack's nodes a second toast gives
// the server's message, under the input it is about (e.g. "concepts: unknown concept 'horse'; ...").
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const isPackNode = (entry) => String(entry?.class_type ?? "").startsWith("SAeUron");

/** The input a message is about: the one it names first (whole word: the name, its first part, or without a plural s). */
export function inputNamedIn(message, inputs) {
	let best = null;
	let bestAt = Infinity;
	for (const input of inputs) {
		for (const word of new Set([input, input.split("_")[0], input.replace(/s$/, "")])) {
			const at = message.search(new RegExp(`(^|[^\\w])${word.replace(/\W/g, "\\$&")}($|[^\\w])`));
			if (at >= 0 && at < bestAt) [best, bestAt] = [input, at];
		}
	}
	return best;
}

/** One entry per distinct `validate_inputs` message of each pack node (`node_errors` is changed in place). */
export function mergeValidationErrors(nodeErrors) {
	for (const entry of Object.values(nodeErrors ?? {})) {
		if (!isPackNode(entry) || !Array.isArray(entry.errors)) continue;
		const merged = new Map(); // message -> [first error, inputs that reported it]
		const others = [];
		for (const error of entry.errors) {
			if (error?.type !== "custom_validation_failed") {
				others.push(error);
				continue;
			}
			const input = error.extra_info?.input_name ?? String(error.details ?? "").split(" - ")[0];
			const cut = String(error.details ?? "").indexOf(" - ");
			const message = cut >= 0 ? String(error.details).slice(cut + 3) : error.message;
			if (!merged.has(message)) merged.set(message, [error, []]);
			merged.get(message)[1].push(input);
		}
		entry.errors = [...others];
		for (const [message, [error, inputs]] of merged) {
			const input = inputNamedIn(message, inputs);
			const extra = { ...error.extra_info };
			if (input) extra.input_name = input;
			else delete extra.input_name; // the message names no input: do not outline a wrong one
			entry.errors.push({ ...error, details: input ? `${input}: ${message}` : message, extra_info: extra });
		}
	}
	return nodeErrors;
}

/** The dialog text for the pack's entries of a /prompt reply's `node_errors` ("" when there are none). */
export function formatPackErrors(nodeErrors) {
	const lines = [];
	for (const [id, entry] of Object.entries(nodeErrors ?? {})) {
		if (!isPackNode(entry)) continue;
		const graph = "rootGraph" in app ? app.rootGraph : app.graph; // rootGraph: frontends 1.28 and later
		const title = graph?.getNodeById(id)?.title ?? entry.class_type;
		lines.push(`${title} (node ${id}):`);
		for (const error of entry.errors ?? []) {
			lines.push(`    - ${error.details || error.message}`);
		}
	}
	if (!lines.length) return "";
	return ["These nodes failed validation; outputs that need them were skipped:", ...lines].join("\n");
}

/** Whether the frontend lists node errors itself (1.40 and later: the issues panel, on by default). */
function frontendShowsNodeErrors() {
	try {
		return !!app.extensionManager?.setting?.get("Comfy.RightSidePanel.ShowErrorsTab");
	} catch {
		return false;
	}
}

/** The toast text for a pack node's run-time error: the server's message under the input it names. */
export function runtimeErrorText(message, inputs) {
	const text = String(message ?? "").trim();
	const input = text && inputNamedIn(text, inputs);
	return input && !text.startsWith(`${input}:`) ? `${input}: ${text}` : text;
}

const extension = {
	name: "SAeUron.ValidationErrors",
	setup() {
		api.addEventListener("execution_error", ({ detail }) => {
			if (!String(detail?.node_type ?? "").startsWith("SAeUron") || !frontendShowsNodeErrors()) return;
			const spec = LiteGraph.registered_node_types[detail.node_type]?.nodeData?.input ?? {};
			const text = runtimeErrorText(detail.exception_message, Object.keys({ ...spec.required, ...spec.optional }));
			if (!text) return;
			const graph = "rootGraph" in app ? app.rootGraph : app.graph;
			const title = graph?.getNodeById(detail.node_id)?.title ?? detail.node_type;
			app.extensionManager.toast.add({ severity: "error", summary: title, detail: text, life: 15000 });
		});
		const queuePrompt = api.queuePrompt.bind(api);
		api.queuePrompt = async function (...args) {
			let reply;
			try {
				reply = await queuePrompt(...args);
			} catch (error) {
				// A refused graph (HTTP 400): the frontend shows this error's node_errors itself.
				mergeValidationErrors(error?.response?.node_errors);
				throw error;
			}
			mergeValidationErrors(reply?.node_errors);
			const text = formatPackErrors(reply?.node_errors);
			if (text && !frontendShowsNodeErrors()) {
				const message = document.createElement("span");
				message.className = "saeuron-validation-errors";
				message.textContent = text;
				app.ui.dialog.show(message);
			}
			return reply;
		};
	},
};
// Served under two names (pyproject's `web` and WEB_DIRECTORY), this file runs twice: register once.
if (!app.extensions.some((e) => e.name === extension.name)) app.registerExtension(extension);
