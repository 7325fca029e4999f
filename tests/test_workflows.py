"""Every workflow in example_workflows/ (API twins in docs/api-workflows/): checked against the server's /object_info and run through /prompt."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saeuron_core.formats import load_sae, save_sae
from saeuron_core.sae import SAEConfig, TopKSAE
from saeuron_core.scoring import concept_names, learn_concept
from saeuron_core.workflow_format import combo_choices, is_widget, ui_to_api

from conftest import HOOK

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "example_workflows").glob("*.json"))
API_DIR = ROOT / "docs" / "api-workflows"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server whose models folder holds the workflows' model and SAE: the shipped demo ones."""
    import comfy_host

    srv = comfy_host.ComfyServer(tmp_path_factory.mktemp("workflows"))
    comfy_host.install_demo(srv.models)
    with srv:
        srv.object_info = srv.get("/object_info")
        yield srv


def test_there_are_workflows_in_both_formats():
    names = {p.stem for p in UI_FILES}
    assert names == {"erase_style", "erase_object", "erase_object_and_style", "compare_ablate_replace", "learn_concept",
                     "inspect_features"}
    assert all((API_DIR / f"{n}.api.json").is_file() for n in names)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_object_info(server, path):
    ui = json.loads(path.read_text())
    info = server.object_info
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        assert node["type"] in info, f"{path.name}: unknown node type {node['type']}"
    api = ui_to_api(ui, info)
    assert api == json.loads((API_DIR / f"{path.stem}.api.json").read_text())
    for node_id, node in api.items():
        spec = info[node["class_type"]]["input"]
        for name, s in spec.get("required", {}).items():
            assert name in node["inputs"], f"{path.name}: node {node_id} ({node['class_type']}) misses {name}"
            value = node["inputs"][name]
            choices = combo_choices(s)
            if isinstance(value, list) and choices is None:
                src = nodes[int(value[0])]
                out_type = info[src["type"]]["output"][value[1]]
                assert out_type == s[0], f"{path.name}: node {node_id}.{name} expects {s[0]}, linked {out_type}"
            elif choices is not None:
                assert value in choices, f"{path.name}: node {node_id}.{name} = {value!r} is not one of {choices}"
            elif is_widget(s) and s[0] in ("INT", "FLOAT") and len(s) > 1:
                assert s[1].get("min", -float("inf")) <= value <= s[1].get("max", float("inf"))
    for link in ui["links"]:
        link_id, src, slot, dst, dst_slot, kind = link
        assert nodes[src]["outputs"][slot]["type"] == kind and link_id in nodes[src]["outputs"][slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_runs_through_prompt(server, path):
    api = json.loads((API_DIR / f"{path.stem}.api.json").read_text())
    entry = server.run(api, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    import comfy_host

    for node_id, (count, side) in comfy_host.expected_images(api).items():
        saved = entry["outputs"][node_id]["images"]
        assert len(saved) == count
        for img in saved:
            with Image.open(server.root / "output" / img["subfolder"] / img["filename"]) as im:
                assert im.size == (side, side) and im.getextrema() != ((0, 0), (0, 0), (0, 0))
    if path.stem.startswith("erase"):  # the erased branch (SaveImage 23) differs from the plain one (13)
        def pixels(node_id):
            out = []
            for img in entry["outputs"][node_id]["images"]:
                with Image.open(server.root / "output" / img["subfolder"] / img["filename"]) as im:
                    out.append(torch.from_numpy(np.array(im)).float())
            return torch.stack(out)
        assert (pixels("23") - pixels("13")).abs().mean() > 5.0
    if path.stem == "learn_concept":
        learned = load_sae(server.models / "sae" / "saeuron-demo-learned.safetensors")
        assert concept_names(learned) == sorted(concept_names(load_sae(server.models / "sae" / "saeuron-demo.safetensors"))
                                                + ["round things"])
    if path.stem == "inspect_features":
        texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
        assert texts and len(texts[0].splitlines()) == api["6"]["inputs"]["steps"]


@pytest.mark.parametrize("workflow, node, change, message", [
    ("erase_style", "6", {"method": "replace", "strength": 5.0}, "between 0 and 1"),
    ("erase_style", "6", {"start_percent": 0.8, "end_percent": 0.2}, "0 <= start <= end <= 1"),
    ("erase_style", "6", {"concepts": " , "}, "choose at least one concept"),
    ("learn_concept", "6", {"negative_prompts": "\n \n"}, "at least one positive and one negative prompt"),
    ("learn_concept", "7", {"filename": "../../outside"}, "must stay inside the sae model folder"),
])
def test_bad_widget_values_are_refused_before_running(server, workflow, node, change, message):
    api = json.loads((API_DIR / f"{workflow}.api.json").read_text())
    api[node]["inputs"].update(change)
    status, reply = server.post("/prompt", {"prompt": api})
    # ComfyUI refuses the graph (400) or, when other outputs are still valid, queues only those (200);
    # either way the node's error carries the message.
    assert status in (200, 400) and message in json.dumps(reply["node_errors"][node]), reply


def test_unknown_concept_and_unfit_sae_fail_with_the_message(server):
    api = json.loads((API_DIR / "erase_style.api.json").read_text())
    api["6"]["inputs"]["concepts"] = "horse"
    entry = server.run(api)
    error = [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert error["node_id"] == "6" and "unknown concept 'horse'; this SAE knows: 'checkerboard', 'gradient'" \
        in error["exception_message"]


def test_graphs_are_isolated_in_one_server(server):
    """Erased and plain graphs sharing one model, in any order: each output equals that graph run alone."""
    erase = json.loads((API_DIR / "erase_style.api.json").read_text())
    plain = {k: v for k, v in erase.items() if k in {"1", "2", "3", "4", "5", "10", "11", "12", "13"}}
    other = json.loads((API_DIR / "erase_object.api.json").read_text())

    def pixels(graph, prefix):
        graph = json.loads(json.dumps(graph))
        for node in graph.values():
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"iso/{prefix}_{node['inputs']['filename_prefix'].split('/')[-1]}"
        entry = server.run(graph)
        assert entry["status"]["status_str"] == "success"
        out = {}
        for node_id, o in sorted(entry["outputs"].items()):
            for img in o.get("images", []):
                with Image.open(server.root / "output" / img["subfolder"] / img["filename"]) as im:
                    out.setdefault(node_id, []).append(im.tobytes())
        return out

    alone = {"plain": pixels(plain, "a1"), "erase": pixels(erase, "a2"), "other": pixels(other, "a3")}
    for i, order in enumerate((["erase", "plain", "other", "plain"], ["other", "erase", "plain", "erase"])):
        for j, name in enumerate(order):
            graph = {"plain": plain, "erase": erase, "other": other}[name]
            assert pixels(graph, f"o{i}{j}") == alone[name], f"{name} changed when run after {order[:j]}"
    assert alone["erase"]["13"] == alone["plain"]["13"]  # the "before" branch of the erase graph is the plain graph


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


LOAD_PROMPTS = int(__import__("os").environ.get("SAEURON_LOAD_PROMPTS", "200"))
RSS_GROWTH_BOUND_MB = 64


def test_many_queued_prompts_with_erasers_keep_memory_bounded(server, capsys):
    """Queue LOAD_PROMPTS erase graphs at once (varying seeds so nothing is cached); memory stays bounded."""
    import time

    api = json.loads((API_DIR / "compare_ablate_replace.api.json").read_text())
    graph = {k: v for k, v in api.items() if k in {"1", "2", "3", "4", "5", "6", "7", "20", "21", "22", "23", "30",
                                                   "31", "32", "33"}}
    graph["5"]["inputs"]["batch_size"] = 1
    for node in graph.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
        if node["class_type"] == "SaveImage":
            node["class_type"], node["inputs"] = "PreviewImage", {"images": node["inputs"]["images"]}

    def queue(seed):
        g = json.loads(json.dumps(graph))
        for node in g.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["seed"] = seed
        status, reply = server.post("/prompt", {"prompt": g})
        assert status == 200, reply
        return reply["prompt_id"]

    server.run(json.loads(json.dumps(graph)), timeout=120)  # warm up: models loaded, caches filled
    for seed in range(1, 10):
        queue(seed)
    while server.get("/queue")["queue_running"] or server.get("/queue")["queue_pending"]:
        time.sleep(0.5)
    before = _rss_mb(server.proc.pid)
    start = time.time()
    ids = [queue(1000 + i) for i in range(LOAD_PROMPTS)]
    while server.get("/queue")["queue_running"] or server.get("/queue")["queue_pending"]:
        assert time.time() - start < 1200, "the queue did not drain"
        time.sleep(1.0)
    after = _rss_mb(server.proc.pid)
    history = server.get("/history")
    done = [i for i in ids if history.get(i, {}).get("status", {}).get("status_str") == "success"]
    with capsys.disabled():
        print(f"\n{LOAD_PROMPTS} queued erase graphs: {len(done)} succeeded in {time.time() - start:.0f} s; "
              f"server RSS {before:.0f} MB -> {after:.0f} MB ({after - before:+.0f} MB)")
    assert len(done) == LOAD_PROMPTS
    assert after - before < RSS_GROWTH_BOUND_MB
