// Concept picker for Concept Eraser (SAE), Feature Inspector (SAE) and Save Concepts (SAE).
//
// The `concepts` widget stays a plain comma-separated string (what the server and API-format
// workflows use); clicking it opens a menu with the concept names of the SAE chosen upstream in
// Load SAE (following the `sae` link through Learn Concept, Load Concepts and reroutes), fetched from
// the pack's read-only route GET /saeuron/concepts?sae=<name>&concepts=<file>... (one `concepts` per
// Load Concepts file on the way). Names are toggled on and off; "Edit as text…" keeps free typing.
// Names the current SAE does not know are drawn in red.
//
// Works in both node designs: the classic canvas draws the widget every frame; Nodes 2.0
// (`Comfy.VueNodes.Enabled`) draws it on its own small canvas only when asked (`widget.triggerDraw`),
// so the widget is redrawn when its SAE's library arrives and when an upstream SAE changes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PICKER_NODES = new Set(["SAeUronConceptEraser", "SAeUronFeatureInspector", "SAeUronSaveConcepts"]);
const ROUTE = "/saeuron/concepts";

/** Concept names of a widget value: separated by commas or new lines (as the nodes read them). */
export function parseConcepts(text) {
	return String(text ?? "")
		.split(/[\n,]/)
		.map((s) => s.trim())
		.filter(Boolean);
}

/** `{ concepts }` of an SAE file and concept files, or `{ error }` with the server's message. */
export async function fetchConcepts(saeName, files = []) {
	const query = [`sae=${encodeURIComponent(saeName)}`, ...files.map((f) => `concepts=${encodeURIComponent(f)}`)];
	try {
		const res = await api.fetchApi(`${ROUTE}?${query.join("&")}`, { cache: "no-store" });
		const body = await res.json();
		return res.ok ? { concepts: body.concepts } : { error: body.error || `HTTP ${res.status}` };
	} catch (err) {
		return { error: String(err) };
	}
}

/** The link into input `slot` (frontends 1.27 to 1.58 have `getInputLink`; older ones only `input.link`). */
function inputLink(node, slot) {
	if (slot < 0 || !node.graph) return null;
	if (typeof node.getInputLink === "function") return node.getInputLink(slot);
	const id = node.inputs[slot].link;
	return id == null ? null : (node.graph.getLink?.(id) ?? node.graph.links[id] ?? null);
}

/** The node feeding input `inputName` (`null`: the first input), or `null`. */
function linkedOrigin(node, inputName) {
	const slot = inputName === null ? 0 : (node.inputs ?? []).findIndex((i) => i.name === inputName);
	const link = node.inputs?.length ? inputLink(node, slot) : null;
	return link ? node.graph.getNodeById(link.origin_id) : null;
}

function widgetValue(node, name) {
	return node.widgets?.find((w) => w.name === name)?.value;
}

/** Whether `node` is of the pack's node type `type`. */
function isType(node, type) {
	return node.comfyClass === type || node.type === type;
}

/**
 * Where the node's SAE comes from: `{ sae, learned, files }` (the Load SAE file name, names added by
 * Learn Concept nodes and concept files loaded by Load Concepts nodes on the way), or `null` when the
 * SAE is not traced back to a Load SAE.
 */
export function sourceSae(node) {
	const learned = [];
	const files = [];
	let current = linkedOrigin(node, "sae");
	for (let hops = 0; current && hops < 32; hops++) {
		if (isType(current, "SAeUronLoadSAE")) {
			const sae = widgetValue(current, "sae_name");
			return sae ? { sae, learned, files: files.reverse() } : null;
		}
		if (isType(current, "SAeUronLearnConcept")) {
			const name = String(widgetValue(current, "concept_name") ?? "").trim();
			if (name) learned.push(name);
			current = linkedOrigin(current, "sae");
		} else if (isType(current, "SAeUronLoadConcepts")) {
			const file = widgetValue(current, "concepts_name");
			if (file && !files.includes(file)) files.push(file);
			current = linkedOrigin(current, "sae");
		} else if (current.type === "Reroute") {
			current = linkedOrigin(current, null);
		} else {
			return null;
		}
	}
	return null;
}

/** Names offered for a node right now: `{ sae, names }` or `{ error }`. */
export async function offeredConcepts(node) {
	const source = sourceSae(node);
	if (!source) return { error: "connect a Load SAE node to the sae input to pick its concepts" };
	const reply = await fetchConcepts(source.sae, source.files);
	if (reply.error) return { sae: source.sae, error: reply.error };
	const names = [...new Set([...reply.concepts, ...source.learned])].sort();
	return { sae: source.sae, names };
}

/** Redraw a widget in either node design. */
function redraw(widget) {
	widget.triggerDraw?.(); // Nodes 2.0: the widget's own canvas
	app.canvas?.setDirty(true, true); // classic canvas
}

function setValue(node, widget, value) {
	widget.value = value;
	widget.callback?.(value, app.canvas, node);
	node.graph?.change?.();
	redraw(widget);
}

async function openMenu(node, widget, event) {
	const offer = await offeredConcepts(node);
	widget.saeuronLibrary = offer.names ? { sae: offer.sae, names: offer.names } : null;
	const chosen = new Set(parseConcepts(widget.value));
	const mark = (name) => `${chosen.has(name) ? "☑" : "☐"} ${name}`;
	const toggle = (name, suffix = "") => {
		return function () {
			if (chosen.has(name)) chosen.delete(name);
			else chosen.add(name);
			const known = offer.names ?? [];
			// Library order first, then names typed by hand that this SAE does not know.
			const value = [...known.filter((n) => chosen.has(n)), ...[...chosen].filter((n) => !known.includes(n))];
			setValue(node, widget, value.join(", "));
			this.textContent = mark(name) + suffix;
			return true; // keep the menu open: several names can be chosen
		};
	};
	const entries = [];
	for (const name of offer.names ?? []) {
		entries.push({ content: mark(name), saeuronConcept: name, callback: toggle(name) });
	}
	for (const name of chosen) {
		if (!(offer.names ?? []).includes(name)) {
			const suffix = " (not in this SAE)";
			entries.push({ content: mark(name) + suffix, saeuronConcept: name, callback: toggle(name, suffix) });
		}
	}
	if (offer.error) entries.push({ content: offer.error, disabled: true });
	else if (!offer.names.length) entries.push({ content: "this SAE has no concepts yet (use Learn Concept)", disabled: true });
	entries.push(null, {
		content: "Edit as text…",
		callback: () => app.canvas.prompt("concepts", widget.value, (v) => setValue(node, widget, v), event),
	});
	const title = offer.sae ? `Concepts in ${offer.sae}` : "Concepts";
	const menu = new LiteGraph.ContextMenu(entries, {
		event,
		title,
		className: "dark saeuron-concept-menu",
		scale: Math.max(1, app.canvas.ds.scale),
	});
	// Names are file and concept names, not markup: frontends differ in whether they set a
	// menu's text as HTML, so put in the plain text ourselves (entries come in order).
	const items = menu.root.querySelectorAll(".litemenu-entry");
	entries.forEach((entry, i) => entry && items[i] && (items[i].textContent = entry.content));
	const heading = menu.root.querySelector(".litemenu-title");
	if (heading) heading.textContent = title;
}

function refreshLibrary(node, widget) {
	const source = sourceSae(node);
	const key = source ? JSON.stringify([source.sae, source.learned, source.files]) : "";
	if (widget.saeuronKey === key) return;
	widget.saeuronKey = key;
	widget.saeuronLibrary = null;
	if (!source) return;
	offeredConcepts(node).then((offer) => {
		if (widget.saeuronKey !== key) return;
		widget.saeuronLibrary = offer.names ? { sae: offer.sae, names: offer.names } : null;
		redraw(widget);
	});
}

/** Have every picker of a graph check its SAE again (after an SAE, a learned name or a link changed). */
function refreshPickers(graph) {
	for (const node of graph?.nodes ?? []) {
		if (!PICKER_NODES.has(node.comfyClass)) continue;
		const widget = node.widgets?.find((w) => w.name === "concepts");
		if (widget) {
			refreshLibrary(node, widget);
			redraw(widget);
		}
	}
}

/** Call `after` once `node[method]` has run (keeping what the node or other extensions put there). */
function chain(object, method, after) {
	const before = object[method];
	object[method] = function () {
		const result = before?.apply(this, arguments);
		after.apply(this, arguments);
		return result;
	};
}

function installPicker(node, widget) {
	// The widget keeps the frontend's own string type (serialisation, input socket); only its
	// drawing and its click are ours.
	widget.draw = function (ctx, node, width, y, height) {
		refreshLibrary(node, this);
		const margin = 15;
		const names = parseConcepts(this.value);
		const known = this.saeuronLibrary?.names;
		const unknown = known ? names.filter((n) => !known.includes(n)) : [];
		ctx.save();
		ctx.fillStyle = LiteGraph.WIDGET_BGCOLOR;
		ctx.strokeStyle = unknown.length ? "#f55" : LiteGraph.WIDGET_OUTLINE_COLOR;
		ctx.beginPath();
		ctx.roundRect(margin, y, width - margin * 2, height, [height * 0.5]);
		ctx.fill();
		ctx.stroke();
		ctx.beginPath();
		ctx.rect(margin, y, width - margin * 2, height);
		ctx.clip();
		ctx.textAlign = "left";
		ctx.fillStyle = LiteGraph.WIDGET_SECONDARY_TEXT_COLOR;
		ctx.fillText(this.label || this.name, margin * 2, y + height * 0.7);
		ctx.textAlign = "right";
		ctx.fillStyle = unknown.length ? "#f77" : LiteGraph.WIDGET_TEXT_COLOR;
		const shown = names.length ? names.join(", ") : "click to choose";
		ctx.fillText(`${shown.length > 34 ? shown.slice(0, 33) + "…" : shown}  ▾`, width - margin * 2, y + height * 0.7);
		ctx.restore();
	};
	// The canvas offers a widget its pointer-down first (frontends 1.27 to 1.58); claiming it here
	// keeps the frontend's own text prompt closed. The menu opens on the click (pointer up, no drag),
	// as the frontend's combo menus do.
	widget.onPointerDown = function (pointer, node) {
		pointer.onClick = (upEvent) => openMenu(node, this, upEvent);
		return true;
	};
}

const extension = {
	name: "SAeUron.ConceptPicker",
	nodeCreated(node) {
		// What the pickers show depends on Load SAE's file, Learn Concept's name, Load Concepts' file and the
		// links between.
		const source = {
			SAeUronLoadSAE: "sae_name",
			SAeUronLearnConcept: "concept_name",
			SAeUronLoadConcepts: "concepts_name",
		}[node.comfyClass];
		const widget = node.widgets?.find((w) => w.name === (source ?? "concepts"));
		if (source && widget) chain(widget, "callback", () => refreshPickers(node.graph));
		if (source || PICKER_NODES.has(node.comfyClass)) chain(node, "onConnectionsChange", () => refreshPickers(node.graph));
		if (PICKER_NODES.has(node.comfyClass) && widget) installPicker(node, widget);
	},
};
// ComfyUI can serve this folder under two names (pyproject's `web` and WEB_DIRECTORY); the
// frontend refuses a second extension of the same name, so register once.
if (!app.extensions.some((e) => e.name === extension.name)) app.registerExtension(extension);
