"""Writes the shareable workflows: UI format in example_workflows/ (ComfyUI offers them as the pack's templates)
and API format (``*.api.json``, for ``/prompt``) in docs/api-workflows/.

The graphs are defined here once; the UI files are generated from them with the nodes' own input
specifications, read from the real ComfyUI host (ComfyUI 0.3.64 in .hosts/, as in the tests).
Run from the repository root: .venv/bin/python -m scripts.make_workflows
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "saeuron-demo"                 # models/diffusers/<MODEL>
SAE = "saeuron-demo.safetensors"       # models/sae/<SAE>: every concept, at up_blocks.1.attentions.1
OBJECT_SAE = "saeuron-demo-objects.safetensors"  # objects, at down_blocks.2.attentions.1
OBJECT_MID_SAE = "saeuron-demo-objects-mid.safetensors"  # objects, at mid_block.attentions.0
STYLE_SAE = "saeuron-demo-styles.safetensors"    # styles, at up_blocks.1.attentions.2
STYLE, OBJECT = "stripes", "star"
SIZE = 32                              # the demo model's image size in pixels
BATCH = 4                              # images per run (seeds seed, seed+1, ...)
STEPS, CFG = 25, 3.0
STYLE_METHOD = "ablate"                # the better style method on the validation sweep (EVALUATION.md)


def ablate_strength(concept: str) -> float:
    """The ablation strength the validation sweep chose for a shipped concept (EVALUATION.md)."""
    from saeuron_demo import assets

    return assets.concept_strengths()[concept]


def base(prompt: str, sae: str = SAE) -> dict:
    return {
        "1": {"class_type": "SAeUronLoadDiffusersModel", "inputs": {"model_path": MODEL}},
        "2": {"class_type": "SAeUronLoadSAE", "inputs": {"sae_name": sae, "hook_point": ""}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "SAeUronEmptyLatent", "inputs": {"vae": ["1", 2], "width": SIZE, "height": SIZE,
                                                            "batch_size": BATCH}},
    }


def sample(graph: dict, first_id: int, model: list, prefix: str) -> None:
    """KSampler -> VAEDecode -> nearest-neighbour upscale (32 px images are small on screen) -> SaveImage."""
    k, d, u, s = (str(first_id + i) for i in range(4))
    graph[k] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    graph[d] = {"class_type": "VAEDecode", "inputs": {"samples": [k, 0], "vae": ["1", 2]}}
    graph[u] = {"class_type": "ImageScaleBy", "inputs": {"image": [d, 0], "upscale_method": "nearest-exact",
                                                         "scale_by": 4.0}}
    graph[s] = {"class_type": "SaveImage", "inputs": {"images": [u, 0], "filename_prefix": prefix}}


def eraser(concepts: str, method: str, strength: float, model: list | None = None, sae: list | None = None) -> dict:
    return {"class_type": "SAeUronConceptEraser", "inputs": {
        "model": model or ["1", 0], "sae": sae or ["2", 0], "concepts": concepts, "method": method,
        "strength": strength, "start_percent": 0.0, "end_percent": 1.0, "cfg_half": "both", "min_coverage": 0.0,
        "detect_with": "", "mask_mode": "inside", "replace_also_at": ""}}


def erase(name: str, prompt: str, concept: str, sae: str, method: str) -> dict:
    g = base(prompt, sae)
    g["6"] = eraser(concept, method, ablate_strength(concept) if method == "ablate" else 1.0)
    sample(g, 10, ["1", 0], f"saeuron/{name}_before")
    sample(g, 20, ["6", 0], f"saeuron/{name}_after")
    return g


def erase_object(name: str, style: bool) -> dict:
    """The object at both blocks where it enters (two SAEs, chained erasers), and the style too if ``style``.

    Each eraser patches a copy of the MODEL it gets, so chained erasers stack their edits."""
    g = base(f"a {OBJECT} in {STYLE} style", OBJECT_SAE)
    g["8"] = {"class_type": "SAeUronLoadSAE", "inputs": {"sae_name": OBJECT_MID_SAE, "hook_point": ""}}
    g["6"] = eraser(OBJECT, "ablate", ablate_strength(OBJECT))
    g["7"] = eraser(OBJECT, "ablate", ablate_strength(OBJECT), model=["6", 0], sae=["8", 0])
    last = "7"
    if style:
        g["9"] = {"class_type": "SAeUronLoadSAE", "inputs": {"sae_name": STYLE_SAE, "hook_point": ""}}
        g["30"] = eraser(STYLE, STYLE_METHOD, ablate_strength(STYLE) if STYLE_METHOD == "ablate" else 1.0,
                         model=["7", 0], sae=["9", 0])
        last = "30"
    sample(g, 10, ["1", 0], f"saeuron/{name}_before")
    sample(g, 20, [last, 0], f"saeuron/{name}_after")
    return g


def compare() -> dict:
    g = base(f"a {OBJECT} in {STYLE} style", STYLE_SAE)
    g["6"] = eraser(STYLE, "ablate", ablate_strength(STYLE))
    g["7"] = eraser(STYLE, "replace", 1.0)
    sample(g, 10, ["1", 0], "saeuron/compare_original")
    sample(g, 20, ["6", 0], "saeuron/compare_ablate")
    sample(g, 30, ["7", 0], "saeuron/compare_replace")
    return g


def erase_in_region() -> dict:
    """Paint where to erase: a mask of the left half (stock SolidMask + MaskComposite) on the style eraser, so
    the stripes go on the left and stay on the right."""
    g = erase("erase_in_region", f"a {OBJECT} in {STYLE} style", STYLE, STYLE_SAE, STYLE_METHOD)
    g["40"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    g["41"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE // 2, "height": SIZE}}
    g["42"] = {"class_type": "MaskComposite", "inputs": {"destination": ["40", 0], "source": ["41", 0], "x": 0, "y": 0,
                                                         "operation": "add"}}
    g["6"]["inputs"]["mask"] = ["42", 0]
    return g


def shared_concept() -> dict:
    """A shared concept file on the SAE it was learned on: Load Concepts puts the file's "outline" (64 features per
    step) in place of the SAE's own (3), and the eraser erases it."""
    g = erase("erase_shared_concept", f"a {OBJECT} in outline style", "outline", SAE, "ablate")
    g["30"] = {"class_type": "SAeUronLoadConcepts", "inputs": {
        "sae": ["2", 0], "concepts_name": "saeuron-demo-outline-64.safetensors", "replace": True}}
    g["6"]["inputs"]["sae"] = ["30", 0]
    return g


def learn() -> dict:
    g = base("")
    del g["3"], g["4"]
    g["6"] = {"class_type": "SAeUronLearnConcept", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "sae": ["2", 0], "latent_image": ["5", 0], "concept_name": "round things",
        "positive_prompts": f"a circle in {STYLE} style\na ring in solid style\na circle in grid style",
        "negative_prompts": f"a square in {STYLE} style\na triangle in solid style\na cross in grid style",
        "seed": 0, "steps": 10, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", "top_n": 3,
        "min_specificity": 0.5, "peak_specificity": -1.0, "word": "", "kind": "style"}}
    g["7"] = {"class_type": "SAeUronSaveSAE", "inputs": {"sae": ["6", 0], "filename": "saeuron-demo-learned.safetensors",
                                                         "overwrite": True}}
    return g


def inspect() -> dict:
    g = base(f"a {OBJECT} in {STYLE} style")
    g["6"] = {"class_type": "SAeUronFeatureInspector", "inputs": {
        "model": ["1", 0], "sae": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
        "vae": ["1", 2], "concepts": STYLE, "seed": 0, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
        "scheduler": "normal", "top_features": 8}}
    g["7"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["6", 0], "upscale_method": "nearest-exact",
                                                       "scale_by": 8.0}}
    g["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "saeuron/inspect_overlay"}}
    return g


def sdxl() -> dict:
    """SDXL with a public SDXL-Turbo SAE (residual, down_blocks.2.attentions.1): erase a concept learned into it.
    For docs/workflows/: it needs the checkpoint and the SAE folder, which the tests do not have."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "SAeUronLoadSAE", "inputs": {
            "sae_name": "sdxl-turbo/unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001/final",
            "hook_point": ""}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat in a garden", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    }
    g["6"] = eraser("cat", "ablate", 5.0)
    sample(g, 10, ["1", 0], "saeuron/sdxl_before")
    sample(g, 20, ["6", 0], "saeuron/sdxl_after")
    for k in ("12", "22"):
        g[k]["inputs"]["scale_by"] = 0.5
    return g


def flux() -> dict:
    """FLUX.1 with the public FLUX SAE on transformer_blocks.18 (its folder does not name the block: Load SAE's
    hook_point does). Guidance-distilled: cfg 1 and FluxGuidance. For docs/workflows/."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "7": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                          "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "2": {"class_type": "SAeUronLoadSAE", "inputs": {"sae_name": "SAE_flux_18", "hook_point": "transformer_blocks.18"}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat in a garden", "clip": ["7", 0]}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["9", 0], "guidance": 3.5}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["7", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    }
    g["6"] = eraser("cat", "ablate", 5.0, model=["1", 0])
    sample(g, 10, ["1", 0], "saeuron/flux_before")
    sample(g, 20, ["6", 0], "saeuron/flux_after")
    for k in ("10", "20"):
        g[k]["inputs"].update(cfg=1.0, scheduler="simple")
    for k in ("11", "21"):
        g[k]["inputs"]["vae"] = ["8", 0]
    for k in ("12", "22"):
        g[k]["inputs"]["scale_by"] = 0.5
    return g


# Graphs for models the tests have no weights for: written to docs/workflows/, checked against /object_info.
DOC_WORKFLOWS = {"sdxl_erase_with_sdxl_turbo_sae": sdxl(), "flux_erase_with_flux_sae": flux()}

WORKFLOWS = {
    "erase_style": erase("erase_style", f"a {OBJECT} in {STYLE} style", STYLE, STYLE_SAE, STYLE_METHOD),
    "erase_object": erase_object("erase_object", style=False),
    "erase_object_and_style": erase_object("erase_object_and_style", style=True),
    "compare_ablate_replace": compare(),
    "erase_in_region": erase_in_region(),
    "erase_shared_concept": shared_concept(),
    "learn_concept": learn(),
    "inspect_features": inspect(),
}


@functools.lru_cache(maxsize=None)
def comfy_test_host():
    """``tests/comfy_host.py``: the real ComfyUI host the tests use, loaded by path once (``tests/`` is not a
    package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfy_host", ROOT / "tests" / "comfy_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def object_info() -> dict:
    """The ``/object_info`` entries (inputs, outputs) of ComfyUI's nodes and this pack's, from the real host."""
    comfy_test_host().start(Path(tempfile.mkdtemp()))
    import nodes  # ComfyUI's registry, the pack's nodes included

    info = {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
                   "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}
            for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}
    return json.loads(json.dumps(info))  # tuples become lists, as over HTTP


def main() -> None:
    info = object_info()
    api_to_ui = comfy_test_host().plain_pack_module("workflow_format").api_to_ui  # the pack's nodes/workflow_format.py
    ui_dir, api_dir = ROOT / "example_workflows", ROOT / "docs" / "api-workflows"
    ui_dir.mkdir(exist_ok=True)
    api_dir.mkdir(parents=True, exist_ok=True)
    for name, graph in WORKFLOWS.items():
        (api_dir / f"{name}.api.json").write_text(json.dumps(graph, indent=1) + "\n")
        (ui_dir / f"{name}.json").write_text(json.dumps(api_to_ui(graph, info), indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json and docs/api-workflows/{name}.api.json")
    docs_dir = ROOT / "docs" / "workflows"
    docs_dir.mkdir(parents=True, exist_ok=True)
    for name, graph in DOC_WORKFLOWS.items():
        (docs_dir / f"{name}.api.json").write_text(json.dumps(graph, indent=1) + "\n")
        (docs_dir / f"{name}.json").write_text(json.dumps(api_to_ui(graph, info), indent=1) + "\n")
        print(f"wrote docs/workflows/{name}.json and .api.json")


if __name__ == "__main__":
    main()
