"""Glue shared by the nodes: the ``sae`` model folder, concept lists, and patching a MODEL clone.

ComfyUI modules are imported inside functions so that the pack's root ``__init__`` stays cheap
and importable outside ComfyUI.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from saeuron_core.comfy_layout import ComfyBlockPatch, ComfyTarget, comfy_target
from saeuron_core.errors import ConfigError
from saeuron_core.options import parse_assignments
from saeuron_core.sae import TopKSAE

CATEGORY = "SAeUron"
SAE_FOLDER = "sae"


def register_sae_folder() -> None:
    """Register ``models/sae`` with ComfyUI (paths from ``extra_model_paths.yaml`` are kept)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, SAE_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(SAE_FOLDER, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[SAE_FOLDER] = (paths, set(exts) | {".safetensors"})


def sae_dirs() -> list[str]:
    import folder_paths

    register_sae_folder()
    return [p for p in folder_paths.get_folder_paths(SAE_FOLDER) if os.path.isdir(p)]


def list_saes() -> list[str]:
    """Native ``.safetensors`` files and sparsify/SAELens folders (holding ``cfg.json``) under the sae folders."""
    found: set[str] = set()
    for root in sae_dirs():
        for here, dirs, files in os.walk(root, followlinks=True):
            rel = os.path.relpath(here, root)
            if "cfg.json" in files and ("sae.safetensors" in files or "sae_weights.safetensors" in files):
                found.add(rel.replace(os.sep, "/"))
                dirs[:] = []
                continue
            for name in files:
                if name.endswith(".safetensors") and not name.startswith("."):
                    found.add(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    return sorted(found)


def resolve_sae(name: str) -> str:
    """Absolute path of a listed SAE; names that leave the sae folders are refused."""
    for root in sae_dirs():
        path = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([path, os.path.realpath(root)]) != os.path.realpath(root):
            raise ConfigError(f"SAE name {name!r} points outside the sae model folder")
        if os.path.exists(path):
            return path
    raise ConfigError(f"SAE {name!r} not found in the sae model folders ({', '.join(sae_dirs()) or 'none'})")


def validation(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``True`` or the error message, as ComfyUI's ``VALIDATE_INPUTS`` expects."""
    try:
        check(*args, **kwargs)
    except ConfigError as exc:
        return str(exc)
    return True


def parse_concepts(text: str) -> list[str]:
    """Concept names from a widget: separated by commas or new lines."""
    return [part.strip() for line in str(text).splitlines() for part in line.split(",") if part.strip()]


def parse_pairs(text: str) -> dict[str, str]:
    """``"solid=solid (detector), gradient=g2"`` -> ``{"solid": "solid (detector)", "gradient": "g2"}``."""
    return parse_assignments(parse_concepts(text), "detect_with", "'concept=entry' pairs separated by commas")


def block_target(model: Any, sae: TopKSAE, hook_point: Optional[str] = None) -> ComfyTarget:
    """Where the SAE's block is in this MODEL; refuses SAEs that do not fit it."""
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("this SAE does not say which block it was trained on (no hook point in its config)")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not isinstance(unet_config, dict):
        raise ConfigError("this MODEL is not a UNet model that ComfyUI describes with a unet_config")
    return comfy_target(hook_point, unet_config, sae.d_in)


def patch_block(model: Any, sae: TopKSAE, fn: Callable, target: Optional[ComfyTarget] = None) -> Any:
    """A clone of ``model`` whose SAE hook point runs ``fn`` on every call (the input MODEL is unchanged)."""
    import comfy.utils

    from .wrapper import SAEWrappedTransformer

    target = target or block_target(model, sae)
    base = model.model
    patch = ComfyBlockPatch(fn, base.model_sampling.timestep, target)
    clone = model.clone()
    if target.kind == "output_patch":
        clone.set_model_output_block_patch(patch)
    else:
        current = clone.object_patches.get(target.module_path) or comfy.utils.get_attr(base, target.module_path)
        clone.add_object_patch(target.module_path, SAEWrappedTransformer(current, patch))
    return clone
