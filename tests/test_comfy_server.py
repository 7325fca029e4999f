"""The pack in a real ComfyUI server process, driven through its HTTP API."""

import pytest
from planted import concept

from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import add_concept, concept_names
from saeuron_core.sae.model import SAEConfig, TopKSAE
from comfy_host import combo_choices

pytestmark = pytest.mark.slow

NODES = {"SAeUronLoadSAE", "SAeUronConceptEraser", "SAeUronLearnConcept", "SAeUronSaveSAE",
         "SAeUronFeatureInspector"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import comfy_host

    root = tmp_path_factory.mktemp("server")
    srv = comfy_host.ComfyServer(root)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, hook_point="up_blocks.1.attentions.1"))
    add_concept(sae, concept("cat", {range(50): [3]}))
    save_sae(sae, srv.models / "sae" / "planted.safetensors")
    with srv:
        yield srv


def test_object_info_lists_every_node_with_its_inputs(server):
    info = server.get("/object_info")
    assert NODES <= set(info)
    for name in NODES:
        entry = info[name]
        assert entry["category"] == "SAeUron" and entry["description"]
        for spec in entry["input"]["required"].values():
            assert spec[1].get("tooltip")
    import comfy_host

    demo = list(comfy_host.demo_files().DEMO_SAES)  # the pack's own, listed beside the user's
    assert combo_choices(info["SAeUronLoadSAE"]["input"]["required"]["sae_name"]) == sorted(["planted.safetensors",
                                                                                              *demo])
    assert info["SAeUronConceptEraser"]["output"] == ["MODEL"]


def test_a_graph_runs_through_prompt_and_writes_the_sae(server):
    graph = {
        "1": {"class_type": "SAeUronLoadSAE", "inputs": {"sae_name": "planted.safetensors"}},
        "2": {"class_type": "SAeUronSaveSAE", "inputs": {"sae": ["1", 0], "filename": "copy.safetensors",
                                                          "overwrite": False}},
    }
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert concept_names(load_sae(server.models / "sae" / "copy.safetensors")) == ["cat"]
    # The same graph again: the file exists and overwrite is off, so the node reports a clear error.
    graph["2"]["inputs"]["filename"] = "copy.safetensors "
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    messages = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert "already exists" in messages[0][1]["exception_message"]
    assert "Traceback" not in messages[0][1]["exception_message"]


def test_unknown_sae_name_is_refused_before_running(server):
    status, reply = server.post("/prompt", {"prompt": {
        "1": {"class_type": "SAeUronLoadSAE", "inputs": {"sae_name": "missing.safetensors"}},
        "2": {"class_type": "SAeUronSaveSAE", "inputs": {"sae": ["1", 0], "filename": "x", "overwrite": False}}}})
    assert status == 400
    assert "missing.safetensors" in str(reply["node_errors"]["1"])
