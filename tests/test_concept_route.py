"""The concept picker's server route (``GET /saeuron/concepts``): its logic, called without a browser.

``concepts_reply`` runs inside the real ComfyUI host (in-process), whose ``sae`` model folder is a
temp dir; the HTTP side is exercised in tests/test_browser.py.
"""

import json
import os

import pytest
import torch
from conftest import HOOK
from safetensors.torch import save_file

import saeuron_core.sae.files as formats
from saeuron_core.concepts.learning import learn_concept
from saeuron_core.errors import SAEFormatError
from saeuron_core.sae.files import concept_names_in_file, save_sae
from saeuron_core.sae.model import SAEConfig, TopKSAE

SUB = "route_test"  # our own sub-folder of the shared sae folder


@pytest.fixture(scope="module")
def sae_with_concepts(tiny_pipe):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, n_latents=64, k=4, hook_point=HOOK))
    learn_concept(tiny_pipe, sae, "stripes", ["a star in stripes style"], ["a star in solid style"], steps=4,
                  guidance_scale=5.0, min_specificity=0.0, progress=False)
    learn_concept(tiny_pipe, sae, "star", ["a star"], ["a circle"], steps=4, guidance_scale=5.0, min_specificity=0.0,
                  progress=False)
    return sae


@pytest.fixture(scope="module")
def folder(comfy, sae_with_concepts):
    import comfy_host

    root = comfy_host._STATE["models"] / "sae" / SUB
    root.mkdir()
    save_sae(sae_with_concepts, root / "two.safetensors")
    save_sae(TopKSAE(SAEConfig(d_in=32, n_latents=64, k=4, hook_point=HOOK)), root / "empty.safetensors")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    save_file({"x": torch.zeros(2)}, str(root / "plain.safetensors"))
    sparsify = root / "imported"
    sparsify.mkdir()
    save_file({k: v.contiguous() for k, v in sae_with_concepts.tensors().items()}, str(sparsify / "sae.safetensors"))
    (sparsify / "cfg.json").write_text(json.dumps({"d_in": 32, "num_latents": 64, "k": 4}))
    outside = comfy_host._STATE["models"] / "outside.safetensors"  # a real SAE, but not in the sae folder
    save_sae(sae_with_concepts, outside)
    (root / "link.safetensors").symlink_to(outside)
    return root


def reply(query):
    routes = __import__("comfy_host").pack_module("nodes.routes")
    return routes.concepts_reply(query)


# -- concept names from the file header -------------------------------------------------------------

def test_names_come_from_the_header_only(tmp_path, sae_with_concepts, monkeypatch):
    path = save_sae(sae_with_concepts, tmp_path / "sae.safetensors")
    monkeypatch.setattr(formats, "load_safetensors", lambda *a, **k: pytest.fail("tensors were loaded"))
    names = concept_names_in_file(path)
    assert names == sorted(sae_with_concepts.concepts) and "stripes" in names


def test_library_errors(tmp_path, sae_with_concepts):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SAEFormatError, match="without saeuron metadata"):
        concept_names_in_file(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata={"saeuron_format": "1", "concepts": "[1"})
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        concept_names_in_file(tmp_path / "bad.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "list.safetensors"), metadata={"saeuron_format": "1", "concepts": "[]"})
    with pytest.raises(SAEFormatError, match="must be a JSON object"):
        concept_names_in_file(tmp_path / "list.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "name.safetensors"),
              metadata={"saeuron_format": "1", "concepts": json.dumps({"a\x01b": {}})})
    with pytest.raises(SAEFormatError, match="bad name"):
        concept_names_in_file(tmp_path / "name.safetensors")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    with pytest.raises(SAEFormatError, match="never loaded"):
        concept_names_in_file(tmp_path / "model.pt")


# -- nodes/routes.py ----------------------------------------------------------------------

def test_listed_files_give_their_concept_names(folder, sae_with_concepts):
    assert reply({"sae": f"{SUB}/two.safetensors"}) == (
        200, {"sae": f"{SUB}/two.safetensors", "concepts": sorted(sae_with_concepts.concepts)})
    assert reply({"sae": f"{SUB}/empty.safetensors"}) == (200, {"sae": f"{SUB}/empty.safetensors", "concepts": []})
    assert reply({"sae": f"{SUB}/imported"}) == (200, {"sae": f"{SUB}/imported", "concepts": []})


@pytest.mark.parametrize("query, message", [
    ({}, "give the SAE as ?sae="),
    ({"sae": "  "}, "give the SAE as ?sae="),
    ({"sae": "a\nb.safetensors"}, "control characters"),
    ({"sae": "x" * 2000}, "too long"),
])
def test_bad_queries_are_refused_with_400(folder, query, message):
    status, body = reply(query)
    assert status == 400 and message in body["error"] and set(body) == {"error"}


@pytest.mark.parametrize("name", [
    "../outside.safetensors", f"{SUB}/../../outside.safetensors", "/etc/passwd", "outside.safetensors",
    f"{SUB}/nope.safetensors", f"{SUB}/imported/sae.safetensors", f"{SUB}/imported/cfg.json", "~/x.safetensors",
])
def test_names_not_listed_by_load_sae_are_404(folder, name):
    status, body = reply({"sae": name})
    assert (status, body) == (404, {"error": f"SAE {name!r} is not in the sae model folders"})


def test_a_linked_file_inside_the_folder_is_read(folder, sae_with_concepts):
    """A file linked into the sae folder from elsewhere (another disk) is the user's model: it is read."""
    status, body = reply({"sae": f"{SUB}/link.safetensors"})
    assert status == 200 and body["concepts"] == sorted(sae_with_concepts.concepts)


def test_unreadable_files_are_422_without_server_paths(folder):
    for name, message in ((f"{SUB}/corrupt.safetensors", "not valid JSON"),
                          (f"{SUB}/plain.safetensors", "without saeuron metadata")):
        status, body = reply({"sae": name})
        assert status == 422 and message in body["error"], body
        assert str(folder) not in body["error"] and os.sep + "tmp" not in body["error"]


def test_register_routes_is_a_no_op_without_a_server(comfy):
    assert __import__("comfy_host").pack_module("nodes.routes").register_routes() is False
