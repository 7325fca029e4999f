"""Load Concepts and Save Concepts nodes: concept files in the ``sae_concepts`` model folder, loaded onto the SAE
they were learned on as LoRA files are loaded onto their checkpoint."""

from __future__ import annotations

import os
from typing import Any

from comfy_api.latest import io

from saeuron_core.errors import ConfigError
from saeuron_core.sae.concept_files import save_concepts, with_concepts

from .common import (CATEGORY, SAE, check_choice, free_to_write, list_model_files, parse_concepts, resolve_listed,
                     save_target, validation)
from .demo_files import shipped_concept_file, shipped_concept_names

CONCEPTS_FOLDER = "sae_concepts"


def list_concept_files() -> list[str]:
    """``.safetensors`` files under the sae_concepts folders, as names relative to their folder, and the pack's
    shipped demo concept files."""
    return list_model_files(CONCEPTS_FOLDER, shipped_concept_names())


def resolve_concept_file(name: str) -> str:
    """Absolute path of a listed concept file (the user's own before the pack's demo files); names that leave the
    sae_concepts folders are refused."""
    return resolve_listed(name, CONCEPTS_FOLDER, shipped_concept_file(name), "concept file", label="concept file",
                          exists=os.path.isfile)


class LoadConcepts(io.ComfyNode):
    """Adds a concept file's concepts to a copy of the SAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronLoadConcepts",
            display_name="Load Concepts (SAE)",
            category=CATEGORY,
            description=("Adds the concepts of a concept file from models/sae_concepts to a copy of the SAE they "
                         "were learned on (the input SAE is unchanged). A file made for another SAE is refused. "
                         "Chain several to load several files."),
            inputs=[
                SAE.Input("sae", tooltip="The SAE the concepts were learned on (from Load SAE or another Load "
                                         "Concepts)."),
                io.Combo.Input("concepts_name", options=list_concept_files(),
                               tooltip="Concept file in models/sae_concepts (or a folder set for 'sae_concepts' in "
                                       "extra_model_paths.yaml)."),
                io.Boolean.Input("replace", default=False,
                                 tooltip="Replace concepts the SAE already has of the same name. Off: a file with "
                                         "such a name is refused."),
            ],
            outputs=[SAE.Output(display_name="sae", tooltip="A copy of the SAE with the file's concepts added.")],
        )

    @classmethod
    def validate_inputs(cls, concepts_name: str = "") -> bool | str:
        return validation(check_choice, "concepts_name", concepts_name, list_concept_files())

    @classmethod
    def execute(cls, sae: Any, concepts_name: str, replace: bool = False) -> io.NodeOutput:
        return io.NodeOutput(with_concepts(sae, resolve_concept_file(concepts_name), replace=replace)[0])


def _target_path(filename: str) -> tuple[str, str]:
    """``(name, absolute path)`` inside the first sae_concepts folder; names that leave it are refused."""
    return save_target(filename, CONCEPTS_FOLDER, "give the concept file a name, e.g. my_concepts.safetensors")


def _check_save(concepts: str, filename: str) -> None:
    _target_path(filename)
    if not parse_concepts(concepts):
        raise ConfigError("choose at least one concept to save (names from the SAE's library, comma separated)")


class SaveConcepts(io.ComfyNode):
    """Writes some of an SAE's concepts as one concept file into the first ``sae_concepts`` folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronSaveConcepts",
            display_name="Save Concepts (SAE)",
            category=CATEGORY,
            description=("Saves the chosen concepts of the SAE (e.g. learned in this graph) as one small concept file "
                         "in models/sae_concepts, to share them or load them later with Load Concepts onto the same "
                         "SAE. An existing file is only replaced when 'overwrite' is on."),
            inputs=[
                SAE.Input("sae", tooltip="The SAE holding the concepts."),
                io.String.Input("concepts", default="", multiline=False,
                                tooltip="Concept names from the SAE's library, separated by commas. In the page, "
                                        "click to pick them."),
                io.String.Input("filename", default="my_concepts.safetensors",
                                tooltip="File name inside models/sae_concepts (sub-folders allowed, no '..')."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace the file if it already exists."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, concepts: str = "", filename: str = "") -> bool | str:
        return validation(_check_save, concepts, filename)

    @classmethod
    def execute(cls, sae: Any, concepts: str, filename: str, overwrite: bool) -> io.NodeOutput:
        name, path = _target_path(filename)
        names = parse_concepts(concepts)
        free_to_write(name, path, CONCEPTS_FOLDER, overwrite)
        save_concepts(sae, names, path)
        return io.NodeOutput(ui={"text": [f"saved {name} ({', '.join(dict.fromkeys(names))})"]})
