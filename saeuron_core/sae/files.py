"""SAE files: the native single-file format and read-only importers.

Native: one ``.safetensors`` file with ``encoder.weight [n, d]``, ``encoder.bias [n]``,
``W_dec [n, d]``, ``b_dec [d]`` (plus optional extra tensors, e.g. concept data) and JSON
metadata strings: ``saeuron_format`` (version), ``config`` (:class:`SAEConfig`),
``training`` (summary) and ``concepts`` (the concept library).

Imported (read-only): EleutherAI sparsify / SAeUron folders (``cfg.json`` + ``sae.safetensors``),
SAELens folders (``cfg.json`` + ``sae_weights.safetensors``) and SDLens / sdxl-unbox folders (``config.json`` +
``state_dict.pth``, see :mod:`.imported`). Nothing is ever unpickled, except that one ``state_dict.pth``
through torch's weights-only unpickler (tensors only; any other object is refused without running it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, SAEFormatError
from ..safetensors_io import atomic_save_safetensors, load_safetensors, read_safetensors_header, refuse_pickle
from .imported import (FOLDER_FORMATS, checked_hook, load_saelens, load_sdlens, load_sparsify, sae_folder_format,
                       sdlens_folder)
from .library import check_concept_name, check_library
from .model import SAEConfig, TopKSAE
from .tensors import CORE_TENSORS, build_sae, check_tensors

FORMAT_VERSION = "1"
_CFG_FORMATS = ("sparsify", "saelens")  # the folder formats with a cfg.json
_CFG = FOLDER_FORMATS["sparsify"][0]
_CFG_WEIGHTS = tuple(FOLDER_FORMATS[fmt][1] for fmt in _CFG_FORMATS)


def _json_field(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise SAEFormatError(f"{path}: metadata field {key!r} is not valid JSON; the file is corrupt") from None


# -- native format -----------------------------------------------------------------------

def content_digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over tensor names, dtypes, shapes, bytes and the metadata strings (``sha256`` excluded)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(metadata):
        if key != "sha256":
            h.update(f"{key}={metadata[key]}|".encode())
    return h.hexdigest()


def save_sae(sae: TopKSAE, path: str | os.PathLike) -> Path:
    """Write ``sae`` (weights, config, training summary, concepts, extra tensors) as one native file."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SAEFormatError(f"{path}: native SAE files must end in .safetensors")
    clash = set(sae.extra_tensors) & set(CORE_TENSORS)
    if clash:
        raise ConfigError(f"extra tensor names {sorted(clash)} clash with the SAE's own tensors")
    tensors = {**sae.tensors(), **sae.extra_tensors}
    metadata = {
        "saeuron_format": FORMAT_VERSION,
        "config": json.dumps(sae.config.to_dict(), sort_keys=True),
        "training": json.dumps(sae.training_summary, sort_keys=True),
        "concepts": json.dumps(sae.concepts, sort_keys=True),
    }
    metadata["sha256"] = content_digest(tensors, metadata)
    atomic_save_safetensors(tensors, path, metadata)
    return path


def _load_native(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str],
                 device: str | torch.device, dtype: torch.dtype | None) -> TopKSAE:
    version = metadata.get("saeuron_format")
    if version != FORMAT_VERSION:
        raise SAEFormatError(f"{path}: native format version {version!r} is not supported (expected {FORMAT_VERSION!r})")
    if "sha256" in metadata and metadata["sha256"] != content_digest(tensors, metadata):
        raise SAEFormatError(f"{path}: contents do not match the file's checksum; the file is corrupt "
                             f"(damaged or partly copied). Get a fresh copy")
    try:
        config = SAEConfig.from_dict(_json_field(path, metadata, "config", None))
    except ConfigError as exc:
        raise SAEFormatError(f"{path}: bad config metadata: {exc}") from None
    check_tensors(path, tensors, CORE_TENSORS)
    sae = build_sae(path, config, tensors, device, dtype)
    sae.training_summary = _json_field(path, metadata, "training", {})
    sae.concepts = _json_field(path, metadata, "concepts", {})
    if not isinstance(sae.training_summary, dict) or not isinstance(sae.concepts, dict):
        raise SAEFormatError(f"{path}: 'training' and 'concepts' metadata must be JSON objects")
    sae.extra_tensors = {k: v for k, v in tensors.items() if k not in CORE_TENSORS}
    try:
        check_library(sae)
    except SAEFormatError as exc:
        raise SAEFormatError(f"{path}: {exc}") from None
    sae.source_format = "native"
    return sae


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """Return ``(format, resolved_path)``; format is ``native``, ``sparsify``, ``saelens`` or ``sdlens``."""
    path = Path(path)
    if path.name == "state_dict.pth" and path.is_file() and sdlens_folder(path.parent):
        return "sdlens", path.parent  # read through the weights-only unpickler only
    refuse_pickle(path)
    if not path.exists():
        raise SAEFormatError(f"{path}: no such file or folder; expected a .safetensors SAE file or an SAE folder")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise SAEFormatError(f"{path}: expected a .safetensors file (or a sparsify/SAELens folder)")
        if path.name in _CFG_WEIGHTS and sae_folder_format(path.parent) in _CFG_FORMATS:
            return detect_format(path.parent)
        return "native", path
    fmt = sae_folder_format(path)
    if fmt in _CFG_FORMATS:
        return fmt, path
    if (path / _CFG).is_file():
        raise SAEFormatError(f"{path}: has cfg.json but neither sae.safetensors (sparsify) nor sae_weights.safetensors (SAELens)")
    sdlens = sdlens_folder(path)
    if sdlens:
        return "sdlens", sdlens
    candidates = sorted(p for p in path.iterdir() if p.is_dir() and ((p / _CFG).is_file() or sdlens_folder(p)))
    if len(candidates) == 1:
        return detect_format(candidates[0])
    if candidates:
        names = ", ".join(p.name for p in candidates)
        raise SAEFormatError(f"{path}: holds several SAEs ({names}); pass the folder of the one to load")
    raise SAEFormatError(
        f"{path}: not an SAE folder; expected cfg.json with sae.safetensors (sparsify/SAeUron) "
        f"or sae_weights.safetensors (SAELens), or config.json with state_dict.pth (SDLens/sdxl-unbox)"
    )


def load_sae(path: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, hook_point: str | None = None) -> TopKSAE:
    """Load an SAE from a native file or a sparsify/SAELens/SDLens folder (formats are detected).

    ``hook_point`` names the block of an imported folder that does not say it (or overrides what it says); a
    native file carries its own.
    """
    fmt, resolved = detect_format(path)
    if fmt == "sdlens":
        return load_sdlens(resolved, device, dtype, hook_point)
    if fmt in ("sparsify", "saelens"):
        sae = (load_sparsify if fmt == "sparsify" else load_saelens)(resolved, device, dtype)
        if hook_point is not None:
            sae.config.hook_point = checked_hook(resolved, hook_point)
        return sae
    if hook_point is not None:
        raise ConfigError(f"{resolved}: a native SAE file carries its own hook point (saeuron info shows it); "
                          f"hook_point is only for imported folders")
    tensors, metadata = load_safetensors(resolved, device="cpu")
    if "saeuron_format" not in metadata:
        raise SAEFormatError(
            f"{resolved}: a safetensors file without saeuron metadata; expected a native SAE file "
            f"(made by 'saeuron train' or 'saeuron convert'). For sparsify/SAELens SAEs pass the folder "
            f"that holds cfg.json"
        )
    return _load_native(resolved, tensors, metadata, device, dtype)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, hook_point: str | None = None) -> Path:
    """Import any supported SAE and write it as a native file (``hook_point``: see :func:`load_sae`)."""
    return save_sae(load_sae(src, hook_point=hook_point), dst)


def describe(path: str | os.PathLike, *, hook_point: str | None = None) -> dict[str, Any]:
    """Summary used by ``saeuron info``: format, shapes, hook point, concepts."""
    sae = load_sae(path, hook_point=hook_point)
    return {
        "path": str(path),
        "format": sae.source_format,
        "d_in": sae.d_in,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "dtype": str(sae.dtype).replace("torch.", ""),
        "hook_point": sae.config.hook_point,
        "residual": sae.config.residual,
        "model_family": sae.config.model_family,
        "concepts": sorted(sae.concepts),
        "training": sae.training_summary,
    }


def concept_names_in_file(path: str | os.PathLike) -> list[str]:
    """Sorted concept names of a native SAE file; ``[]`` for imported sparsify/SAELens folders (no library).

    Raises :class:`SAEFormatError` for files that are not native SAEs or whose library metadata is corrupt.
    """
    fmt, resolved = detect_format(path)
    if fmt != "native":
        return []
    metadata = read_safetensors_header(resolved).get("__metadata__", {})
    if "saeuron_format" not in metadata:
        raise SAEFormatError(f"{resolved}: a safetensors file without saeuron metadata; not a native SAE file")
    try:
        library = json.loads(metadata.get("concepts", "{}"))
    except json.JSONDecodeError:
        raise SAEFormatError(f"{resolved}: metadata field 'concepts' is not valid JSON; the file is corrupt") from None
    if not isinstance(library, dict):
        raise SAEFormatError(f"{resolved}: 'concepts' metadata must be a JSON object")
    for name in library:
        try:
            check_concept_name(name)
        except ConfigError as exc:
            raise SAEFormatError(f"{resolved}: concept library holds a bad name ({exc})") from None
    return sorted(library)
