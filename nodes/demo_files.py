"""The pack's shipped demo model, SAEs and concept files, offered under the names the example workflows use.

Nothing is copied into ComfyUI's model folders: the names are listed beside the user's own files and resolve to
``demo_assets/`` in the pack. A user's own file or folder of the same name always wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

DEMO_ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"
# name in the example workflows -> path inside demo_assets/
DEMO_SAES = {
    "saeuron-demo.safetensors": "sae.safetensors",                            # every concept, up_blocks.1.attentions.1
    "saeuron-demo-objects.safetensors": "sae-objects.safetensors",            # objects, down_blocks.2.attentions.1
    "saeuron-demo-objects-mid.safetensors": "sae-objects-mid.safetensors",    # objects, mid_block.attentions.0
    "saeuron-demo-styles.safetensors": "sae-styles.safetensors",              # styles, up_blocks.1.attentions.2
}
DEMO_PIPELINES = {"saeuron-demo": "model"}
# Concept files for the demo SAEs: "outline" learned on saeuron-demo.safetensors' weights with 64 features per step
DEMO_CONCEPTS = {"saeuron-demo-outline-64.safetensors": "concepts/outline-64.safetensors"}


def shipped_sae(name: str) -> Optional[Path]:
    """The shipped SAE file offered as ``name``, if there is one in this copy of the pack."""
    path = DEMO_ASSETS / DEMO_SAES[name] if name in DEMO_SAES else None
    return path if path is not None and path.is_file() else None


def shipped_pipeline(name: str) -> Optional[Path]:
    """The shipped diffusers folder offered as ``name``, if there is one in this copy of the pack."""
    path = DEMO_ASSETS / DEMO_PIPELINES[name] if name in DEMO_PIPELINES else None
    return path if path is not None and (path / "model_index.json").is_file() else None


def shipped_concept_file(name: str) -> Optional[Path]:
    """The shipped concept file offered as ``name``, if there is one in this copy of the pack."""
    path = DEMO_ASSETS / DEMO_CONCEPTS[name] if name in DEMO_CONCEPTS else None
    return path if path is not None and path.is_file() else None


def shipped_concept_names() -> list[str]:
    return [name for name in DEMO_CONCEPTS if shipped_concept_file(name) is not None]


def shipped_sae_names() -> list[str]:
    return [name for name in DEMO_SAES if shipped_sae(name) is not None]


def shipped_pipeline_names() -> list[str]:
    return [name for name in DEMO_PIPELINES if shipped_pipeline(name) is not None]
