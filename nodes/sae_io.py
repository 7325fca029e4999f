"""Load SAE and Save SAE nodes."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from saeuron_core.sae.files import load_sae, save_sae

from .common import (CATEGORY, SAE, SAE_FOLDER, check_choice, free_to_write, list_saes, resolve_sae, save_target,
                     validation)


class LoadSAE(io.ComfyNode):
    """Loads an SAE from ComfyUI's ``models/sae`` folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronLoadSAE",
            display_name="Load SAE",
            category=CATEGORY,
            description=("Loads a sparse autoencoder (SAE) trained on one UNet block, with its concept library. "
                         "Native .safetensors files and sparsify/SAeUron or SAELens folders from models/sae are "
                         "listed."),
            inputs=[io.Combo.Input("sae_name", options=list_saes(),
                                   tooltip="SAE file or folder in models/sae (or a folder set for 'sae' in "
                                           "extra_model_paths.yaml)."),
                    io.String.Input("hook_point", default="", optional=True,
                                    tooltip="Only for an imported folder that does not say its block (e.g. the FLUX "
                                            "SAE: transformer_blocks.18). Empty: the block the SAE says.")],
            outputs=[SAE.Output(display_name="sae", tooltip="The SAE with its concept library.")],
        )

    @classmethod
    def validate_inputs(cls, sae_name: str = "") -> bool | str:
        return validation(check_choice, "sae_name", sae_name, list_saes())

    @classmethod
    def execute(cls, sae_name: str, hook_point: str = "") -> io.NodeOutput:
        return io.NodeOutput(load_sae(resolve_sae(sae_name), hook_point=hook_point.strip() or None))


def _target_path(filename: str) -> tuple[str, str]:
    """``(name, absolute path)`` inside the first sae folder; names that leave it are refused."""
    return save_target(filename, SAE_FOLDER, "give the SAE a file name, e.g. my_sae.safetensors")


class SaveSAE(io.ComfyNode):
    """Writes an SAE (with its concepts) into the first ``sae`` model folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronSaveSAE",
            display_name="Save SAE",
            category=CATEGORY,
            description=("Saves the SAE, including concepts learned in this graph, as one .safetensors file in "
                         "models/sae. An existing file is only replaced when 'overwrite' is on."),
            inputs=[
                SAE.Input("sae", tooltip="The SAE to save."),
                io.String.Input("filename", default="my_sae.safetensors",
                                tooltip="File name inside models/sae (sub-folders allowed, no '..')."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace the file if it already exists."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename: str = "") -> bool | str:
        return validation(_target_path, filename)

    @classmethod
    def execute(cls, sae: Any, filename: str, overwrite: bool) -> io.NodeOutput:
        name, path = _target_path(filename)
        free_to_write(name, path, SAE_FOLDER, overwrite)
        save_sae(sae, path)
        return io.NodeOutput(ui={"text": [f"saved {name}"]})
