"""Load SAE and Save SAE nodes."""

from __future__ import annotations

import os
from typing import Any

from saeuron_core.errors import ConfigError
from saeuron_core.formats import load_sae, save_sae
from saeuron_core.sae import TopKSAE

from .common import CATEGORY, list_saes, resolve_sae, sae_dirs, validation


class LoadSAE:
    """Loads an SAE from ComfyUI's ``models/sae`` folder."""

    DESCRIPTION = ("Loads a sparse autoencoder (SAE) trained on one UNet block, with its concept library. "
                   "Native .safetensors files and sparsify/SAeUron or SAELens folders from models/sae are listed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAE",)
    RETURN_NAMES = ("sae",)
    OUTPUT_TOOLTIPS = ("The SAE with its concept library.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"sae_name": (list_saes(), {
            "tooltip": "SAE file or folder in models/sae (or a folder set for 'sae' in extra_model_paths.yaml)."})}}

    def load(self, sae_name: str) -> tuple[TopKSAE]:
        return (load_sae(resolve_sae(sae_name)),)


def _target_path(filename: str) -> tuple[str, str]:
    """``(name, absolute path)`` inside the first sae folder; names that leave it are refused."""
    dirs = sae_dirs()
    if not dirs:
        raise ConfigError("no sae model folder exists; create ComfyUI/models/sae")
    name = str(filename).strip()
    if not name or name in (".safetensors",):
        raise ConfigError("give the SAE a file name, e.g. my_sae.safetensors")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.realpath(dirs[0])
    path = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([path, root]) != root:
        raise ConfigError(f"filename {filename!r} must stay inside the sae model folder")
    return name, path


class SaveSAE:
    """Writes an SAE (with its concepts) into the first ``sae`` model folder."""

    DESCRIPTION = ("Saves the SAE, including concepts learned in this graph, as one .safetensors file in "
                   "models/sae. An existing file is only replaced when 'overwrite' is on.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "sae": ("SAE", {"tooltip": "The SAE to save."}),
            "filename": ("STRING", {"default": "my_sae.safetensors",
                                    "tooltip": "File name inside models/sae (sub-folders allowed, no '..')."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace the file if it already exists."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename: str = "") -> Any:
        return validation(_target_path, filename)

    def save(self, sae: TopKSAE, filename: str, overwrite: bool) -> dict[str, Any]:
        name, path = _target_path(filename)
        if os.path.exists(path) and not overwrite:
            raise ConfigError(f"{name} already exists in the sae folder; turn on 'overwrite' or choose another name")
        save_sae(sae, path)
        return {"ui": {"text": [f"saved {name}"]}}
