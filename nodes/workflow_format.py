"""ComfyUI workflow files: API-format graphs to the UI format people drag into ComfyUI, and back.

Both directions need each node's input specification (``/object_info`` or ``INPUT_TYPES()``):
widget inputs (combos, INT, FLOAT, STRING, BOOLEAN) go to ``widgets_values`` in declaration order,
other inputs become links. The UI adds a "control after generate" value after a ``seed`` widget.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}


def is_widget(spec: Any) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def combo_choices(spec: Any) -> list | None:
    """The choices of a combo input: ``[choices, {...}]`` (V1 nodes) or ``["COMBO", {"options": ...}]`` (V3)."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return list(spec[1].get("options", [])) if len(spec) > 1 else []
    return None


def _inputs(info: dict[str, Any]) -> list[tuple[str, Any]]:
    section = info["input"]
    return [*section.get("required", {}).items(), *section.get("optional", {}).items()]


NODE_WIDTH = 320
_IMAGE_NODES = ("SaveImage", "PreviewImage")


def _node_height(node: dict[str, Any], info: dict[str, Any]) -> int:
    """Rough height of a node on ComfyUI's canvas: a row per slot and widget, room for image previews."""
    rows = max(len(info["output"]), sum(isinstance(v, list) for v in node["inputs"].values()))
    widgets = sum(not isinstance(v, list) for v in node["inputs"].values())
    multiline = sum(isinstance(v, str) and "\n" in v for v in node["inputs"].values())
    preview = 300 if node["class_type"] in _IMAGE_NODES or "IMAGE" in info["output"] else 0
    return 40 + 22 * (rows + widgets) + 60 * multiline + preview


def auto_layout(api: dict[str, dict[str, Any]], object_info: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Left-to-right layout without overlaps: a column per graph depth, nodes stacked in each column."""
    depth: dict[str, int] = {}

    def visit(node_id: str, seen: tuple[str, ...] = ()) -> int:
        if node_id not in depth:
            parents = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list) and v[0] not in seen]
            depth[node_id] = 1 + max((visit(p, seen + (node_id,)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    heights = {nid: _node_height(node, object_info[node["class_type"]]) for nid, node in api.items()}
    column_y: dict[int, int] = {}
    pos = {}
    for node_id in api:
        d = depth[node_id]
        y = column_y.get(d, 40)
        pos[node_id] = (40 + (NODE_WIDTH + 60) * d, y)
        column_y[d] = y + heights[node_id] + 50
    return pos


def api_to_ui(api: dict[str, dict[str, Any]], object_info: dict[str, Any],
              positions: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """A UI-format workflow (version 0.4) for an API-format graph."""
    nodes, links = [], []
    outputs: dict[tuple[int, int], list[int]] = {}
    layout = positions or auto_layout(api, object_info)
    for order, (node_id, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        ui_inputs, widgets = [], []
        for name, spec in _inputs(info):
            value = node["inputs"].get(name)
            if is_widget(spec) and not isinstance(value, list):
                if name in node["inputs"]:
                    widgets.append(value)
                    if name in SEED_NAMES and spec[0] == "INT":
                        widgets.append("fixed")
                continue
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = int(value[0]), int(value[1])
                kind = object_info[api[value[0]]["class_type"]]["output"][slot]
                links.append([link_id, src, slot, int(node_id), len(ui_inputs), kind])
                outputs.setdefault((src, slot), []).append(link_id)
                ui_inputs.append({"name": name, "type": spec[0] if not isinstance(spec[0], list) else "COMBO",
                                  "link": link_id})
        x, y = layout.get(node_id, (40 + 360 * (order % 4), 40 + 300 * (order // 4)))
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [x, y],
                      "size": [NODE_WIDTH, _node_height(node, info)],
                      "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs, "outputs": [],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    for entry in nodes:
        info = object_info[entry["type"]]
        names = info.get("output_name") or info["output"]
        entry["outputs"] = [{"name": names[i], "type": kind, "links": outputs.get((entry["id"], i), []),
                             "slot_index": i} for i, kind in enumerate(info["output"])]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format graph of a UI-format workflow (what the page sends to ``/prompt``)."""
    link_src = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api: dict[str, dict[str, Any]] = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for name, spec in _inputs(info):
            if name in linked:
                src, slot = link_src[linked[name]]
                inputs[name] = [src, slot]
            elif is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if name in SEED_NAMES and spec[0] == "INT" and values:
                    values.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
