"""Every workflow in example_workflows/ (API twins in docs/api-workflows/): checked against the server's /object_info and run through /prompt."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_host import PACK_NAME
from PIL import Image

from saeuron_core.sae.files import load_sae
from saeuron_core.sae.library import concept_names, get_concept
from comfy_host import combo_choices, is_widget, ui_to_api

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "example_workflows").glob("*.json"))
API_DIR = ROOT / "docs" / "api-workflows"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fresh ComfyUI with only the pack installed: nothing copied or configured, so the workflows run on the
    demo model and SAEs the pack offers itself."""
    import comfy_host

    srv = comfy_host.ComfyServer(tmp_path_factory.mktemp("workflows"), pack_only=True)
    assert not (srv.models / "sae").exists()
    with srv:
        srv.object_info = srv.get("/object_info")
        yield srv


def test_there_are_workflows_in_both_formats():
    names = {p.stem for p in UI_FILES}
    assert names == {"erase_style", "erase_object", "erase_object_and_style", "compare_ablate_replace", "learn_concept",
                     "inspect_features", "erase_in_region", "erase_shared_concept"}
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


THUMBNAIL_HEIGHT = 256


def write_thumbnail(name: str, pictures: list[Image.Image]) -> Path:
    """``example_workflows/<name>.jpg``, the picture the Templates dialog shows: ``pictures`` side by side."""
    tiles = [p.convert("RGB").resize((THUMBNAIL_HEIGHT * p.width // p.height, THUMBNAIL_HEIGHT), Image.NEAREST)
             for p in pictures]
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), THUMBNAIL_HEIGHT), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 8
    path = ROOT / "example_workflows" / f"{name}.jpg"
    sheet.save(path, quality=90)
    return path


def library_picture(sae, concept: str) -> Image.Image:
    """A learned concept as a square picture: a row per selected feature, a column per timestep bucket (early
    steps on the right), brighter for a higher score."""
    data = get_concept(sae, concept)
    mask = data.selected_mask() & data.observed[:, None]
    features = sorted({int(f) for f in data.feature_ids[mask]})
    grid = np.zeros((data.n_buckets, max(len(features), 1)), dtype=np.float32)
    for b, m in zip(*np.nonzero(mask.numpy())):
        grid[b, features.index(int(data.feature_ids[b, m]))] = max(float(data.scores[b, m]), 0.0)
    grid = (255 * grid / max(float(grid.max()), 1e-8)).astype(np.uint8)
    picture = Image.fromarray(np.stack([grid, grid // 2, 255 - grid], -1).transpose(1, 0, 2))
    return picture.resize((THUMBNAIL_HEIGHT, THUMBNAIL_HEIGHT), Image.NEAREST)


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
        if path.stem == "erase_in_region":  # the painted (left) half changes more than the other
            # The mask limits the block's edit to the left tokens; on the 32 px demo model later layers and steps
            # carry it across (measured: mean change 18.2 left, 15.5 right, of 255).
            change = (pixels("23") - pixels("13")).abs()
            half = change.shape[2] // 2
            assert change[:, :, :half].mean() > change[:, :, half:].mean()
    # The thumbnail: the first picture of each saved branch (before, after...), or the learned concept.
    pictures = [Image.open(server.root / "output" / out["images"][0]["subfolder"] / out["images"][0]["filename"])
                for _, out in sorted(entry["outputs"].items()) if out.get("images")]
    if path.stem == "learn_concept":
        learned = load_sae(server.models / "sae" / "saeuron-demo-learned.safetensors")
        assert concept_names(learned) == sorted(concept_names(load_sae(shipped("saeuron-demo.safetensors")))
                                                + ["round things"])
        pictures = [library_picture(learned, "round things")]
    assert write_thumbnail(path.stem, pictures).stat().st_size > 0
    if path.stem == "inspect_features":
        texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
        assert texts and len(texts[0].splitlines()) == api["6"]["inputs"]["steps"]


def shipped(name: str) -> Path:
    import comfy_host

    return comfy_host.demo_files().shipped_sae(name)


DOC_WORKFLOWS = sorted((ROOT / "docs" / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", [p for p in DOC_WORKFLOWS if not p.name.endswith(".api.json")], ids=lambda p: p.stem)
def test_sdxl_and_flux_workflows_fit_this_server(server, path):
    """The SDXL and FLUX workflows (no weights here to run them): every node, link and widget fits /object_info,
    except model file names, which are the user's."""
    ui = json.loads(path.read_text())
    info = server.object_info
    api = ui_to_api(ui, info)
    assert api == json.loads(path.with_name(f"{path.stem}.api.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node_id, node in api.items():
        spec = info[node["class_type"]]["input"]
        for name, s in spec.get("required", {}).items():
            assert name in node["inputs"], f"{path.name}: node {node_id} ({node['class_type']}) misses {name}"
        for name, value in node["inputs"].items():
            s = {**spec.get("required", {}), **spec.get("optional", {})}[name]
            choices = combo_choices(s)
            if isinstance(value, list) and choices is None:
                out_type = info[nodes[int(value[0])]["type"]]["output"][value[1]]
                assert out_type == s[0], f"{path.name}: node {node_id}.{name} expects {s[0]}, linked {out_type}"
            elif choices is not None and not name.endswith("_name") and not name.startswith("clip_name"):
                assert value in choices, f"{path.name}: node {node_id}.{name} = {value!r} is not one of {choices}"


def test_the_templates_dialog_offers_every_ui_workflow_with_its_thumbnail(server):
    """ComfyUI offers example_workflows/ as the pack's templates: only UI graphs, each with a thumbnail."""
    import urllib.request

    offered = server.get("/workflow_templates")
    assert sorted(offered[PACK_NAME]) == sorted(p.stem for p in UI_FILES)
    for path in UI_FILES:
        base = f"{server.url}/api/workflow_templates/{PACK_NAME}/{path.stem}"
        with urllib.request.urlopen(base + ".json", timeout=30) as r:
            assert json.loads(r.read()) == json.loads(path.read_text())
        with urllib.request.urlopen(base + ".jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            with Image.open(io.BytesIO(r.read())) as im:
                assert im.height == THUMBNAIL_HEIGHT


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


def all_ordered_pairs(names: list[str]) -> list[str]:
    """A run order in which every name follows every other name at least once (an Euler circuit of the
    complete directed graph: ``n * (n - 1) + 1`` runs)."""
    left = {a: [b for b in names if b != a] for a in names}
    stack, order = [names[0]], []
    while stack:
        if left[stack[-1]]:
            stack.append(left[stack[-1]].pop())
        else:
            order.append(stack.pop())
    return order[::-1]


def isolation_graphs() -> dict[str, dict]:
    """Every shipped workflow, a plain graph (no eraser), and ablate + replace on two clones of one MODEL at an
    output-patched block (the shipped ``compare_ablate_replace`` erases at an object-patched one)."""
    graphs = {p.stem: json.loads((API_DIR / f"{p.stem}.api.json").read_text()) for p in UI_FILES}
    erase = graphs["erase_style"]
    graphs["plain"] = {k: v for k, v in erase.items() if k in {"1", "2", "3", "4", "5", "10", "11", "12", "13"}}
    output_patched = json.loads(json.dumps(graphs["compare_ablate_replace"]))
    output_patched["2"]["inputs"]["sae_name"] = "saeuron-demo.safetensors"  # up_blocks.1.attentions.1
    graphs["compare_output_patched"] = output_patched
    return graphs


def run_for_outputs(server, graph: dict, tag: str) -> dict[str, list[bytes]]:
    """Run a graph with its files renamed by ``tag`` (so output nodes run again) and return what it made:
    decoded pixels per SaveImage node, tensors of a saved SAE."""
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"iso/{tag}_{node['inputs']['filename_prefix'].split('/')[-1]}"
        if node["class_type"] == "SAeUronSaveSAE":
            node["inputs"]["filename"] = f"iso/{tag}.safetensors"
    entry = server.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = {}
    for node_id, o in sorted(entry["outputs"].items()):
        for img in o.get("images", []):
            with Image.open(server.root / "output" / img["subfolder"] / img["filename"]) as im:
                out.setdefault(node_id, []).append(im.tobytes())
    for node_id, node in graph.items():
        if node["class_type"] == "SAeUronSaveSAE":
            saved = load_sae(server.models / "sae" / node["inputs"]["filename"])
            out[node_id] = [t.numpy().tobytes() for _, t in sorted(saved.tensors().items())]
    assert out, "the graph made nothing to compare"
    return out


def fresh(server) -> None:
    """Models unloaded and every cache dropped, as on a newly started server."""
    status, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    # The server applies /free after its next queue item: run a trivial graph so that it has.
    server.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})


def test_every_graph_gives_the_same_images_alone_and_after_any_other(server):
    """Each shipped workflow (and two eraser graphs sharing one MODEL at an output- and an object-patched
    block) run alone on a fresh server, then all of them back to back in an order where each one follows
    each other one, with models and caches kept: every run gives exactly the pictures it gave alone, and
    the unerased branch of every graph is the plain graph's picture (the loaded MODEL is never changed)."""
    graphs = isolation_graphs()
    alone = {}
    for name, graph in graphs.items():
        fresh(server)
        alone[name] = run_for_outputs(server, graph, f"alone_{name}")
    assert alone["compare_ablate_replace"]["23"] != alone["compare_ablate_replace"]["33"]  # ablate != replace
    assert alone["compare_output_patched"]["23"] != alone["compare_output_patched"]["33"]
    fresh(server)
    order = all_ordered_pairs([name for name in graphs if name != "plain"])  # plain: checked against alone runs
    for i, name in enumerate(order):
        got = run_for_outputs(server, graphs[name], f"run{i}_{name}")
        assert got == alone[name], f"{name} changed when run after {order[:i][-3:]} (run {i} of {len(order)})"
    for name, outputs in alone.items():
        if "13" in outputs and graphs[name]["3"] == graphs["plain"]["3"]:
            assert outputs["13"] == alone["plain"]["13"], f"the unerased branch of {name} differs from the plain graph"


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
