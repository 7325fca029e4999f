"""Load Concepts and Save Concepts inside the real ComfyUI host (in-process, CPU): concept files in
``models/sae_concepts`` on the shipped demo model and style SAE, and the concept picker's route naming them."""

import copy
import os

import comfy_host
import pytest
import torch
from comfy_host import combo_choices

from saeuron_core.errors import ConfigError, SAEFormatError
from saeuron_core.sae.concept_files import sae_identity, save_concepts
from saeuron_core.sae.files import load_sae, save_sae
from saeuron_core.sae.library import concept_names, remove_concept

STYLES_NAME = "saeuron-demo-styles.safetensors"
SUB = "concepts_test"  # our own sub-folder of the shared sae_concepts folder
WITHOUT = "concepts-test-without.safetensors"  # the style SAE without stripes and solid, in the sae folder


def node(name):
    return comfy_host.node_class(name)


def run(name, *args, **kwargs):
    return node(name).execute(*args, **kwargs).args


def without(sae, *names):
    """A copy of ``sae`` (its weights shared) whose library lacks ``names``."""
    new = copy.copy(sae)
    new.concepts, new.extra_tensors = copy.deepcopy(sae.concepts), dict(sae.extra_tensors)
    for name in names:
        remove_concept(new, name)
    return new


@pytest.fixture(scope="module")
def setup(comfy):
    """The shipped style SAE through Load SAE, that SAE without stripes and solid (in the sae folder too), and
    stripes and solid saved by Save Concepts into ``models/sae_concepts/<SUB>/``."""
    styles = run("SAeUronLoadSAE", STYLES_NAME)[0]
    models = comfy_host._STATE["models"]
    save_sae(without(styles, "stripes", "solid"), models / "sae" / WITHOUT)
    save = node("SAeUronSaveConcepts")
    for name in ("stripes", "solid"):
        out = save.execute(styles, name, f"{SUB}/{name}", False)
        assert out.ui["text"] == [f"saved {SUB}/{name}.safetensors ({name})"]
    return {"styles": styles, "models": models, "folder": models / "sae_concepts" / SUB}


def sample(model, clip, vae, prompt="a star in stripes style"):
    import nodes as comfy_nodes

    pos = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = run("SAeUronEmptyLatent", vae, 32, 32, 1)[0]
    with torch.inference_mode():
        return comfy_nodes.common_ksampler(model, 1, 4, 3.0, "ddim", "normal", pos, neg, latent)[0]["samples"]


def test_save_concepts_writes_into_models_sae_concepts(setup):
    assert sorted(p.name for p in setup["folder"].iterdir()) == ["solid.safetensors", "stripes.safetensors"]
    assert {f"{SUB}/stripes.safetensors", f"{SUB}/solid.safetensors"} <= set(
        combo_choices(node("SAeUronLoadConcepts").INPUT_TYPES()["required"]["concepts_name"]))
    save = node("SAeUronSaveConcepts")
    with pytest.raises(ConfigError, match="already exists in the sae_concepts folder"):
        save.execute(setup["styles"], "stripes", f"{SUB}/stripes.safetensors", False)
    save.execute(setup["styles"], "stripes, noise", f"{SUB}/stripes.safetensors", True)
    try:
        assert concept_names(run("SAeUronLoadConcepts", setup["styles"], f"{SUB}/stripes.safetensors", True)[0]) \
            == concept_names(setup["styles"])
    finally:
        save.execute(setup["styles"], "stripes", f"{SUB}/stripes", True)
    for escape in ("../x", "../sae/x.safetensors", "/etc/x.safetensors"):
        with pytest.raises(ConfigError, match="must stay inside the sae_concepts model folder"):
            save.execute(setup["styles"], "stripes", escape, False)
        message = save.validate_inputs(concepts="stripes", filename=escape)
        assert isinstance(message, str) and "must stay inside the sae_concepts model folder" in message
    assert not (setup["models"] / "x.safetensors").exists() and not (setup["models"] / "sae" / "x.safetensors").exists()
    assert "choose at least one concept" in save.validate_inputs(concepts=" , ", filename="x")
    assert save.validate_inputs(concepts="stripes", filename="x") is True
    with pytest.raises(ConfigError, match="unknown concept 'horse'"):
        save.execute(setup["styles"], "horse", f"{SUB}/horse", False)
    assert not (setup["folder"] / "horse.safetensors").exists()


def test_load_concepts_gives_an_sae_that_erases_as_the_original(setup):
    """The style SAE without stripes, with the stripes file loaded: the Concept Eraser's picture is the original
    SAE's, pixel for pixel."""
    loaded = run("SAeUronLoadSAE", WITHOUT)[0]
    restored = run("SAeUronLoadConcepts", loaded, f"{SUB}/stripes.safetensors", False)[0]
    assert "stripes" not in loaded.concepts and "stripes" in restored.concepts  # the input SAE is unchanged
    assert restored.encoder.weight is loaded.encoder.weight  # a copy sharing the weights
    model, clip, vae = run("SAeUronLoadDiffusersModel", "saeuron-demo")
    erase = node("SAeUronConceptEraser")
    want = sample(erase.execute(model, setup["styles"], "stripes", "ablate", 1.0, 0.0, 1.0, "both").args[0], clip, vae)
    got = sample(erase.execute(model, restored, "stripes", "ablate", 1.0, 0.0, 1.0, "both").args[0], clip, vae)
    assert not torch.equal(want, sample(model, clip, vae))  # the eraser changed the picture
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="unknown concept 'stripes'"):
        erase.execute(model, loaded, "stripes", "ablate", 1.0, 0.0, 1.0, "both")


def test_load_concepts_chains_and_refuses_what_it_must(setup, tmp_path):
    loaded = run("SAeUronLoadSAE", WITHOUT)[0]
    load = node("SAeUronLoadConcepts")
    both = load.execute(load.execute(loaded, f"{SUB}/stripes.safetensors", False).args[0],
                        f"{SUB}/solid.safetensors", False).args[0]
    assert concept_names(both) == concept_names(setup["styles"])
    with pytest.raises(ConfigError, match="already has 'stripes'; to replace it with the file's, load with replace on"):
        load.execute(both, f"{SUB}/stripes.safetensors", False)
    assert concept_names(load.execute(both, f"{SUB}/stripes.safetensors", True).args[0]) == concept_names(both)
    other = run("SAeUronLoadSAE", "saeuron-demo.safetensors")[0]
    with pytest.raises(ConfigError) as refused:
        load.execute(other, f"{SUB}/stripes.safetensors", False)
    assert sae_identity(other)[:12] in str(refused.value) and sae_identity(loaded)[:12] in str(refused.value)
    assert "learned on another SAE" in str(refused.value)
    # A file damaged after it was listed.
    damaged = setup["folder"] / "damaged.safetensors"
    save_concepts(setup["styles"], ["noise"], damaged)
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0x10
    damaged.write_bytes(bytes(data))
    try:
        with pytest.raises(SAEFormatError, match="do not match the file's checksum"):
            load.execute(loaded, f"{SUB}/damaged.safetensors", False)
    finally:
        damaged.unlink()
    message = load.validate_inputs(concepts_name=f"{SUB}/nope.safetensors")
    assert isinstance(message, str) and "is not one of the choices" in message
    assert load.validate_inputs(concepts_name=f"{SUB}/solid.safetensors") is True
    with pytest.raises(ConfigError, match="outside the sae_concepts model folder"):
        load.execute(loaded, "../sae/" + WITHOUT, False)


def reply(query):
    return comfy_host.pack_module("nodes.routes").concepts_reply(query)


def test_the_picker_route_adds_the_names_of_concept_files(setup):
    base = concept_names(load_sae(setup["models"] / "sae" / WITHOUT))
    stripes, solid = f"{SUB}/stripes.safetensors", f"{SUB}/solid.safetensors"
    assert reply({"sae": WITHOUT}) == (200, {"sae": WITHOUT, "concepts": base})
    full = sorted([*base, "solid", "stripes"])
    for files in ([stripes, solid], f"{stripes},{solid}", [f"{stripes}, {solid}"]):
        assert reply({"sae": WITHOUT, "concepts": files}) == (
            200, {"sae": WITHOUT, "concepts": full, "files": {stripes: ["stripes"], solid: ["solid"]}})
    for name in ("../sae/" + WITHOUT, f"{SUB}/../../sae/{WITHOUT}", "/etc/passwd", f"{SUB}/nope.safetensors"):
        assert reply({"sae": WITHOUT, "concepts": [name]}) == (
            404, {"error": f"concept file {name!r} is not in the sae_concepts model folders"})
    status, body = reply({"sae": WITHOUT, "concepts": ["a\nb.safetensors"]})
    assert status == 400 and "control characters" in body["error"]
    corrupt = setup["folder"] / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    try:
        status, body = reply({"sae": WITHOUT, "concepts": [f"{SUB}/corrupt.safetensors"]})
        assert status == 422 and "not valid JSON" in body["error"] and str(setup["folder"]) not in body["error"]
        status, body = reply({"sae": WITHOUT, "concepts": [f"../sae/{WITHOUT}"]})
        assert status == 404
    finally:
        corrupt.unlink()
    # An SAE file in the sae_concepts folder is not a concept file.
    (setup["folder"] / "an-sae.safetensors").symlink_to(setup["models"] / "sae" / WITHOUT)
    try:
        status, body = reply({"sae": WITHOUT, "concepts": [f"{SUB}/an-sae.safetensors"]})
        assert status == 422 and "an SAE file, not a concept file" in body["error"]
    finally:
        os.unlink(setup["folder"] / "an-sae.safetensors")
