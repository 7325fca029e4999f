"""Concept files: learned concepts shared apart from their SAE, as LoRA files are shared apart from a checkpoint.

A concept file is one small ``.safetensors`` file holding some entries of an SAE's concept library: their tensors
under the library's own names (``concepts.<key>.<field>``, same dtypes) and JSON metadata strings:
``saeuron_concepts`` (format version), ``sae_identity`` (:func:`sae_identity` of the SAE the concepts were learned
on), ``sae`` (a short description of that SAE: model family, block, shape, training; never a path), ``concepts``
(the library entries), ``summary`` (one readable line of facts per concept) and ``sha256`` (the checksum of all the
rest, :func:`~saeuron_core.sae.files.content_digest`). A file loads only onto the SAE it names, and is read as
untrusted input: checksum, format, every entry (the SAE library's own checks) and no tensor beyond the entries'.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterable, Optional

import torch

from ..errors import ConfigError, SAEFormatError
from ..safetensors_io import atomic_save_safetensors, load_safetensors, read_safetensors_header
from .files import content_digest
from .library import _FIELDS, ConceptData, _read_entry, add_concept, check_concept, check_concept_name, get_concept
from .model import TopKSAE

FORMAT_KEY = "saeuron_concepts"
FORMAT_VERSION = "1"
_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_TEXT = 500  # longest summary or description string read back from a file


def sae_identity(sae: TopKSAE) -> str:
    """SHA-256 of the SAE's own weights (float32, names and shapes included) and config: not of its file or its
    library, so learning or removing concepts leaves it as it is."""
    h = hashlib.sha256()
    for name, t in sorted(sae.tensors().items()):
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(sae.config.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def _training(summary: Any) -> dict[str, Any]:
    """The few training facts a description keeps: steps, tokens, final FVU, the model's name."""
    if not isinstance(summary, dict):
        return {}
    out = {k: summary[k] for k in ("steps", "tokens") if isinstance(summary.get(k), int)}
    final = summary.get("final")
    if isinstance(final, dict) and isinstance(final.get("fvu"), float):
        out["fvu"] = round(final["fvu"], 4)
    source = summary.get("source")
    if isinstance(source, dict) and isinstance(source.get("model"), str) and source["model"]:
        out["model"] = PurePath(source["model"]).name  # a name, never a path
    return out


def sae_description(sae: TopKSAE, source: Optional[str] = None) -> dict[str, Any]:
    """Where an SAE came from, as a concept file records it: model family, block, shape, training summary and,
    when given, its file's name (``source``: the last part of a path only)."""
    cfg = sae.config
    out: dict[str, Any] = {"model_family": cfg.model_family, "hook_point": cfg.hook_point, "d_in": cfg.d_in,
                           "n_latents": cfg.n_latents, "k": cfg.k}
    if source:
        out["file"] = PurePath(str(source)).name
    training = _training(sae.training_summary)
    if training:
        out["training"] = training
    return out


def _text(value: Any) -> str:
    """A value read from a file as printable text (control characters dropped)."""
    return "".join(c for c in str(value) if ord(c) >= 32)[:_MAX_TEXT]


def describe_sae_source(desc: Any) -> str:
    """One line for an SAE description (:func:`sae_description`), e.g. ``sae-styles.safetensors: saeuron-demo SAE at
    up_blocks.1.attentions.2, 64 -> 1024 features, k 8, 3000 training steps``."""
    if not isinstance(desc, dict):
        return "an SAE the file does not describe"
    family = _text(desc.get("model_family") or "") or "an"
    text = f"{family} SAE at {_text(desc.get('hook_point') or '(block unknown)')}"
    if all(isinstance(desc.get(k), int) for k in ("d_in", "n_latents", "k")):
        text += f", {desc['d_in']} -> {desc['n_latents']} features, k {desc['k']}"
    training = desc.get("training")
    if isinstance(training, dict) and isinstance(training.get("steps"), int):
        text += f", {training['steps']} training steps"
        if isinstance(training.get("model"), str):
            text += f" on {_text(training['model'])!r}"
    return f"{_text(desc['file'])}: {text}" if isinstance(desc.get("file"), str) else text


def _seeds(seeds: list) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds[:6]))}{', ...' if len(seeds) > 6 else ''}"


def concept_summary(sae: TopKSAE, data: ConceptData) -> dict[str, str]:
    """``{"kind", "learned", "model_family"}`` of one concept, read from its ``info`` (kind only when it says one)."""
    info = data.info
    learned = []
    pos, neg = info.get("positive"), info.get("negative")
    if isinstance(pos, list) and isinstance(neg, list):
        learned.append(f"{len(pos)} positive and {len(neg)} negative prompts")
    if isinstance(info.get("steps"), int):
        learned.append(f"{info['steps']} steps")
    seeds = info.get("seeds")
    if isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds):
        learned.append(_seeds(seeds))
    if isinstance(info.get("guidance_scale"), (int, float)):
        learned.append(f"guidance {info['guidance_scale']:g}")
    out = {"learned": ", ".join(learned) or "not recorded",
           "model_family": _text(info.get("model_family") or sae.config.model_family or "unknown")}
    if isinstance(info.get("kind"), str) and _text(info["kind"]).strip():
        out["kind"] = _text(info["kind"]).strip()
    return out


def save_concepts(sae: TopKSAE, names: Iterable[str], path: str | os.PathLike, *,
                  source: Optional[str] = None) -> Path:
    """Write the named library entries of ``sae`` as one concept file (atomically); ``source`` names the SAE's file
    (its last part is recorded). Unknown or broken entries are refused before anything is written."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: concept files must end in .safetensors")
    chosen = list(dict.fromkeys(check_concept_name(n) for n in names))
    if not chosen:
        known = ", ".join(repr(n) for n in sorted(sae.concepts)) or "none"
        raise ConfigError(f"name at least one concept to save; this SAE knows: {known}")
    tensors, library, summary = {}, {}, {}
    for name in chosen:
        data = get_concept(sae, name)  # unknown names and broken entries fail here
        entry = sae.concepts[name]
        for f in _FIELDS:
            tensors[f"concepts.{entry['key']}.{f}"] = sae.extra_tensors[f"concepts.{entry['key']}.{f}"]
        library[name] = copy.deepcopy(entry)
        summary[name] = concept_summary(sae, data)
    metadata = {FORMAT_KEY: FORMAT_VERSION, "sae_identity": sae_identity(sae),
                "sae": json.dumps(sae_description(sae, source), sort_keys=True),
                "concepts": json.dumps(library, sort_keys=True), "summary": json.dumps(summary, sort_keys=True)}
    metadata["sha256"] = content_digest(tensors, metadata)
    atomic_save_safetensors(tensors, path, metadata)
    return path


@dataclass
class ConceptFile:
    """A concept file read and validated in all that does not need its SAE."""

    path: Path
    identity: str
    sae: dict[str, Any]
    entries: dict[str, ConceptData]
    summary: dict[str, dict[str, str]]


def _format_metadata(path: Path) -> dict[str, str]:
    """The header's metadata once its format marker and version are checked (no tensor is read)."""
    metadata = read_safetensors_header(path).get("__metadata__", {})
    version = metadata.get(FORMAT_KEY)
    if version is None:
        if "saeuron_format" in metadata:
            raise SAEFormatError(f"{path}: an SAE file, not a concept file; load it as an SAE, or write its concepts "
                                 f"to a concept file with 'saeuron concepts export'")
        raise SAEFormatError(f"{path}: not a concept file (no '{FORMAT_KEY}' metadata); concept files are written by "
                             f"'saeuron concepts export' or the Save Concepts node")
    if version != FORMAT_VERSION:
        raise SAEFormatError(f"{path}: concept file format version {_text(version)!r} is not supported "
                             f"(expected {FORMAT_VERSION!r})")
    return metadata


def _json_object(path: Path, metadata: dict[str, str], key: str) -> dict:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise SAEFormatError(f"{path}: metadata field {key!r} is missing; the file is not a complete concept "
                             f"file") from None
    except json.JSONDecodeError:
        raise SAEFormatError(f"{path}: metadata field {key!r} is not valid JSON; the file is corrupt") from None
    if not isinstance(value, dict):
        raise SAEFormatError(f"{path}: metadata field {key!r} must be a JSON object")
    return value


def _names(path: Path, library: dict) -> list[str]:
    for name in library:
        try:
            if check_concept_name(name) != name:
                raise ConfigError("a name does not begin or end with a space")
        except ConfigError as exc:
            raise SAEFormatError(f"{path}: the file holds a bad concept name ({exc})") from None
    return sorted(library)


def _check_summary(path: Path, summary: dict, names: list[str]) -> None:
    for name, facts in summary.items():
        if name not in names:
            raise SAEFormatError(f"{path}: the summary describes {_text(name)!r}, which the file does not hold")
        if not isinstance(facts, dict) or not all(isinstance(k, str) and isinstance(v, str) and v == _text(v)
                                                  for k, v in facts.items()):
            raise SAEFormatError(f"{path}: the summary of {name!r} must map names to short printable strings")


def read_concept_file(path: str | os.PathLike) -> ConceptFile:
    """Read a concept file as untrusted input: format, checksum, every entry (as an SAE's library is read, but for
    the checks against the SAE), no stray tensors. Raises :class:`SAEFormatError` naming the file."""
    path = Path(path)
    _format_metadata(path)
    tensors, metadata = load_safetensors(path)
    if "sha256" not in metadata:
        raise SAEFormatError(f"{path}: the concept file has no checksum; it was damaged or not written by saeuron")
    if metadata["sha256"] != content_digest(tensors, metadata):
        raise SAEFormatError(f"{path}: contents do not match the file's checksum; the file is damaged or was edited "
                             f"after it was written. Get a fresh copy")
    identity = metadata.get("sae_identity", "")
    if not _HEX.fullmatch(identity):
        raise SAEFormatError(f"{path}: 'sae_identity' must be 64 hex digits (an SAE's SHA-256)")
    sae, library, summary = (_json_object(path, metadata, key) for key in ("sae", "concepts", "summary"))
    names = _names(path, library)
    if not names:
        raise SAEFormatError(f"{path}: the concept file holds no concepts")
    entries: dict[str, ConceptData] = {}
    owners: dict[str, str] = {}
    for name in names:
        try:
            entries[name] = _read_entry(name, library[name], tensors)
            check_concept(None, entries[name])  # all but the checks against its SAE (those come on loading)
        except (SAEFormatError, ConfigError) as exc:
            raise SAEFormatError(f"{path}: {exc}") from None
        key = library[name]["key"]
        if key in owners:
            raise SAEFormatError(f"{path}: concepts {owners[key]!r} and {name!r} share the key {key!r}")
        owners[key] = name
    known = {f"concepts.{key}.{f}" for key in owners for f in _FIELDS}
    stray = sorted(set(tensors) - known)
    if stray:
        raise SAEFormatError(f"{path}: tensor {_text(stray[0])!r} belongs to no concept in the file")
    _check_summary(path, summary, names)
    return ConceptFile(path=path, identity=identity, sae=sae, entries=entries, summary=summary)


def load_concepts(sae: TopKSAE, path: str | os.PathLike, *, replace: bool = False) -> list[str]:
    """Add a concept file's concepts to ``sae`` in place; returns their names.

    Refuses (nothing added) a damaged or invalid file (:class:`SAEFormatError`), a file learned on another SAE and
    names the SAE already has unless ``replace`` (:class:`ConfigError`).
    """
    file = read_concept_file(path)
    own = sae_identity(sae)
    if file.identity != own:
        raise ConfigError(f"{file.path}: these concepts were learned on another SAE (identity {file.identity[:12]}, "
                          f"{describe_sae_source(file.sae)}), not on this one (identity {own[:12]}, "
                          f"{describe_sae_source(sae_description(sae))}); a concept file loads only onto the SAE it "
                          f"was saved from")
    clash = sorted(set(file.entries) & set(sae.concepts))
    if clash and not replace:
        raise ConfigError(f"{file.path}: this SAE already has {', '.join(map(repr, clash))}; to replace "
                          f"{'it' if len(clash) == 1 else 'them'} with the file's, load with replace on "
                          f"('saeuron concepts import --replace', or the Load Concepts node's 'replace')")
    for data in file.entries.values():
        try:
            check_concept(sae, data)
        except ConfigError as exc:  # the SAE is the file's own: the entry is what is wrong
            raise SAEFormatError(f"{file.path}: {exc}") from None
    for data in file.entries.values():
        add_concept(sae, data)
    return sorted(file.entries)


def with_concepts(sae: TopKSAE, path: str | os.PathLike, *, replace: bool = False) -> tuple[TopKSAE, list[str]]:
    """``(copy of sae with a concept file's concepts, their names)``; the copy shares the weights and ``sae`` itself
    is unchanged (errors: :func:`load_concepts`)."""
    new = copy.copy(sae)
    new.concepts = copy.deepcopy(sae.concepts)
    new.extra_tensors = dict(sae.extra_tensors)
    return new, load_concepts(new, path, replace=replace)


def concept_file_names(path: str | os.PathLike) -> list[str]:
    """Sorted concept names of a concept file, from its header alone (format and names checked)."""
    path = Path(path)
    return _names(path, _json_object(path, _format_metadata(path), "concepts"))


def describe_concepts(path: str | os.PathLike) -> dict[str, Any]:
    """What a concept file holds, without its SAE: ``{"path", "sae_identity", "sae", "concepts": {name: summary}}``
    (the file is validated as :func:`read_concept_file` does)."""
    file = read_concept_file(path)
    return {"path": str(file.path), "sae_identity": file.identity, "sae": file.sae,
            "concepts": {name: file.summary.get(name, {}) for name in sorted(file.entries)}}
