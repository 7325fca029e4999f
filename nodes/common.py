"""Glue shared by the nodes: the ``sae`` model folder, concept lists, and patching a MODEL clone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from comfy_api.latest import io

from saeuron_core.assignments import parse_assignments
from saeuron_core.errors import ConfigError
from saeuron_core.sae.files import sae_folder_format
from saeuron_core.sae.model import TopKSAE

from .comfy_layout import ComfyBlockPatch, ComfyTarget, comfy_dit_target, comfy_target
from .demo_files import shipped_sae, shipped_sae_names
from .sae_model import attach_sae

CATEGORY = "SAeUron"
SAE_FOLDER = "sae"
SAE = io.Custom("SAE")  # the SAE socket type: a TopKSAE with its concept library


def register_sae_folder() -> None:
    """Register ``models/sae`` with ComfyUI (paths from ``extra_model_paths.yaml`` are kept)."""
    register_model_folder(SAE_FOLDER)


def register_model_folder(folder: str) -> None:
    """Register ``models/<folder>`` for ``.safetensors`` files with ComfyUI (paths from ``extra_model_paths.yaml``
    are kept)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, folder)
    paths, exts = folder_paths.folder_names_and_paths.get(folder, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[folder] = (paths, set(exts) | {".safetensors"})


def model_folder_dirs(folder: str) -> list[str]:
    """The existing folders registered as ``folder`` (:func:`register_model_folder`)."""
    import folder_paths

    register_model_folder(folder)
    return [p for p in folder_paths.get_folder_paths(folder) if os.path.isdir(p)]


def save_folder(folder: str) -> str:
    """Where a Save node writes into ``folder``: the first existing one, else the first configured one (a fresh
    ComfyUI has no ``models/<folder>`` until something is saved there)."""
    import folder_paths

    return (model_folder_dirs(folder) or folder_paths.get_folder_paths(folder))[0]


def list_model_files(folder: str, shipped: Iterable[str],
                     is_model_folder: Callable[[str], Any] = lambda here: False) -> list[str]:
    """``.safetensors`` files under the folders registered as ``folder``, and sub-folders ``is_model_folder`` takes
    for one model, as names relative to their folder; with the pack's ``shipped`` names."""
    found: set[str] = set()
    for root in model_folder_dirs(folder):
        for here, dirs, files in os.walk(root, followlinks=True):
            rel = os.path.relpath(here, root)
            if is_model_folder(here):
                found.add(rel.replace(os.sep, "/"))
                dirs[:] = []
                continue
            for name in files:
                if name.endswith(".safetensors") and not name.startswith("."):
                    found.add(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    return sorted(found | set(shipped))


def resolve_listed(name: str, folder: str, shipped: Optional[Path], what: str, *, label: str,
                   exists: Callable[[str], bool] = os.path.exists) -> str:
    """Absolute path of a name listed by :func:`list_model_files` (the user's own before the pack's ``shipped``
    file); names that leave the folders are refused (``label`` names the input in that message)."""
    dirs = model_folder_dirs(folder)
    for root in dirs:
        path = path_in_folder(root, name, label, folder)
        if exists(path):
            return path
    if shipped is not None:
        return str(shipped)
    raise ConfigError(f"{what} {name!r} not found in the {folder} model folders ({', '.join(dirs) or 'none'})")


def save_target(filename: str, folder: str, unnamed: str) -> tuple[str, str]:
    """``(name, absolute path)`` of a Save node's ``.safetensors`` file inside the first ``folder``; an empty name
    is refused with ``unnamed``, names that leave the folder are refused."""
    name = str(filename).strip()
    if not name or name == ".safetensors":
        raise ConfigError(unnamed)
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    try:
        return name, path_in_folder(save_folder(folder), name, "filename", folder)
    except ConfigError:
        raise ConfigError(f"filename {filename!r} must stay inside the {folder} model folder") from None


def free_to_write(name: str, path: str, folder: str, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``; make the file's folder."""
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{name} already exists in the {folder} folder; turn on 'overwrite' or choose another name")
    os.makedirs(os.path.dirname(path), exist_ok=True)


def list_saes() -> list[str]:
    """Native ``.safetensors`` files and imported SAE folders (sparsify, SAELens, SDLens/sdxl-unbox: see
    ``sae_folder_format``) under the sae folders, and the pack's demo SAEs."""
    return list_model_files(SAE_FOLDER, shipped_sae_names(), sae_folder_format)


def path_in_folder(root: str, name: str, what: str, folder: str) -> str:
    """``root/name`` when the *name* stays inside ``root``; ``..`` or an absolute name is refused.

    Judged on the name, not on where links lead: a model folder or file linked from another disk (how many
    ComfyUI users keep their models) is inside the folder it is linked from.
    """
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, str(name)))
    if os.path.isabs(str(name)) or os.path.commonpath([path, root]) != root or path == root:
        raise ConfigError(f"{what} {name!r} points outside the {folder} model folder")
    return path


def resolve_sae(name: str) -> str:
    """Absolute path of a listed SAE (the user's own before the pack's demo SAEs); names that leave the sae folders
    are refused."""
    return resolve_listed(name, SAE_FOLDER, shipped_sae(name), "SAE", label="SAE name")


def validation(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``True`` or the error message, as ComfyUI's ``VALIDATE_INPUTS`` expects."""
    try:
        check(*args, **kwargs)
    except ConfigError as exc:
        return str(exc)
    return True


def check_choice(name: str, value: Any, choices: list) -> None:
    """Refuse a combo value that is not offered (ComfyUI 0.3.x does not check V3 combos itself)."""
    if value not in choices:
        shown = ", ".join(map(repr, choices[:20])) + (", ..." if len(choices) > 20 else "") or "none"
        raise ConfigError(f"{name} {value!r} is not one of the choices ({shown})")


def check_sampling_choices(sampler_name: str, scheduler: str) -> None:
    import comfy.samplers

    check_choice("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS)
    check_choice("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)


def parse_concepts(text: str) -> list[str]:
    """Concept names from a widget: separated by commas or new lines."""
    return [part.strip() for line in str(text).splitlines() for part in line.split(",") if part.strip()]


def parse_pairs(text: str) -> dict[str, str]:
    """``"solid=solid (detector), gradient=g2"`` -> ``{"solid": "solid (detector)", "gradient": "g2"}``."""
    return parse_assignments(parse_concepts(text), "detect_with", "'concept=entry' pairs separated by commas")


def dit_layout(diffusion_model: Any) -> Optional[tuple[str, int, int, int]]:
    """``(arch, double blocks, single blocks, width)`` of a ComfyUI FLUX or MMDiT (SD3) model, else ``None``."""
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks"):
        return "flux", len(diffusion_model.double_blocks), len(diffusion_model.single_blocks), \
            int(diffusion_model.hidden_size)
    if hasattr(diffusion_model, "joint_blocks"):
        return "mmdit", len(diffusion_model.joint_blocks), 0, int(diffusion_model.x_embedder.proj.out_channels)
    return None


def block_target(model: Any, sae: TopKSAE, hook_point: Optional[str] = None, check_width: bool = True) -> ComfyTarget:
    """Where the SAE's block (or ``hook_point``) is in this MODEL; refuses SAEs that do not fit it (``check_width``
    off: any block, for edits that do not run the SAE there)."""
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("this SAE does not say which block it was trained on (no hook point in its config)")
    dit = dit_layout(getattr(model.model, "diffusion_model", None))
    if dit is not None:
        return comfy_dit_target(hook_point, *dit, d_in=sae.d_in if check_width else None)
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not isinstance(unet_config, dict):
        raise ConfigError("this MODEL is neither a UNet that ComfyUI describes with a unet_config nor a FLUX or "
                          "SD3 transformer")
    return comfy_target(hook_point, unet_config, sae.d_in if check_width else None,
                        residual=sae.config.residual and check_width)


def _flux_sampling(sampling: Any) -> bool:
    import comfy.model_sampling

    # ComfyUI builds the model's sampling class at load time, mixing this one in.
    return isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)


def timestep_of(model: Any) -> Callable:
    """The model's sigma -> timestep map, on the 0..1000 scale the core keys concepts by (FLUX's own is 0..1)."""
    sampling = model.model.model_sampling
    if _flux_sampling(sampling):
        return lambda sigma: sampling.timestep(sigma) * 1000.0
    return sampling.timestep


def max_timestep(model: Any) -> int:
    """The end of the timestep scale concepts are learned on: the model's training steps (1000 for flow models)."""
    sampling = model.model.model_sampling
    if _flux_sampling(sampling) or not hasattr(sampling, "sigmas"):
        return 1000
    return int(sampling.sigmas.shape[0])


def patch_block(model: Any, sae: TopKSAE, fn: Callable, target: Optional[ComfyTarget] = None,
                residual: Optional[bool] = None) -> Any:
    """A clone of ``model`` whose SAE hook point (or ``target``) runs ``fn`` on every call, with the SAE attached as
    a model ComfyUI loads along (the input MODEL is unchanged); ``residual`` defaults to the SAE's."""
    from .wrapper import wrap_block

    target = target or block_target(model, sae)
    residual = sae.config.residual if residual is None else residual
    patch = ComfyBlockPatch(fn, timestep_of(model), target, residual=residual)
    clone = model.clone()
    attach_sae(clone, sae)
    if target.kind == "output_patch":
        clone.set_model_output_block_patch(patch)
    elif target.kind == "dit_patch":
        kind, index = target.block
        replaced = clone.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
        patch.previous = replaced.get((kind, index))  # chained erasers on one block: ours runs around theirs
        clone.set_model_patch_replace(patch.replace_block, "dit", kind, index)
        if kind == "single_block":
            clone.set_model_post_input_patch(patch.post_input)
    else:
        # This clone's own object patch, else the model's original module. Never the module now on the shared
        # model: ComfyUI leaves a sampled clone's object patches applied there until it unpatches lazily, so that
        # module may belong to another clone.
        current = clone.get_model_object(target.module_path)
        clone.add_object_patch(target.module_path, wrap_block(current, patch))
    return clone
