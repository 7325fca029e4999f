"""The concept library stored in an SAE file: one :class:`ConceptData` per concept, its tensors
saved beside the SAE's as ``concepts.<key>.<field>`` and its metadata in the ``concepts`` JSON field.

Everything is keyed by the diffusion *timestep value*, bucketed (``bucket_width`` timesteps per bucket).
Every entry is validated when it is added and when a file is read (:func:`check_concept`)."""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, SAEFormatError
from .model import TopKSAE

MAX_NAME_LENGTH = 200


def bucket_of(timesteps: Tensor, bucket_width: float, n_buckets: int) -> Tensor:
    """Bucket index of each timestep value, clamped to ``[0, n_buckets)``."""
    return (timesteps.float() / bucket_width).floor().long().clamp_(0, n_buckets - 1)


@dataclass
class ConceptData:
    """One concept's per-bucket candidate features (sorted by score), of which ``n_selected`` are used."""

    name: str
    bucket_width: float
    max_timestep: int
    feature_ids: Tensor   # [n_buckets, M] int64
    scores: Tensor        # [n_buckets, M]
    mu: Tensor            # [n_buckets, M] mean activation on the concept
    threshold: Tensor     # [n_buckets, M] firing threshold
    n_selected: Tensor    # [n_buckets] int64
    observed: Tensor      # [n_buckets] bool: bucket seen while scoring
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_buckets(self) -> int:
        return self.feature_ids.shape[0]

    def selected_mask(self) -> Tensor:
        """``[n_buckets, M]`` bool: which candidates are selected."""
        return torch.arange(self.feature_ids.shape[1])[None] < self.n_selected[:, None]

    def selected_at(self, timestep: float) -> tuple[Tensor, Tensor]:
        """``(feature ids, firing thresholds)`` selected for one timestep value."""
        b = int(bucket_of(torch.tensor([float(timestep)]), self.bucket_width, self.n_buckets))
        n = int(self.n_selected[b])
        return self.feature_ids[b, :n], self.threshold[b, :n]

    def features_at(self, timestep: float) -> list[int]:
        """Selected feature ids for one timestep value."""
        return self.selected_at(timestep)[0].tolist()


_FIELDS = ("feature_ids", "scores", "mu", "threshold", "n_selected", "observed")
_FLOAT_FIELDS = ("scores", "mu", "threshold")


def _key(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "concept"
    return f"{slug}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def check_concept_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("a concept needs a non-empty name")
    if len(name) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in name):
        raise ConfigError(f"concept names must be at most {MAX_NAME_LENGTH} printable characters")
    return name.strip()


def add_concept(sae: TopKSAE, data: ConceptData) -> None:
    """Add or replace ``data.name`` in the SAE's library (validated, :func:`check_concept`); others are untouched."""
    name = check_concept_name(data.name)
    check_concept(sae, data)
    if name in sae.concepts:
        remove_concept(sae, name)
    key = _key(name)
    for f in _FIELDS:
        value = getattr(data, f)
        sae.extra_tensors[f"concepts.{key}.{f}"] = value.to(torch.uint8) if f == "observed" else value.contiguous()
    sae.concepts[name] = {"key": key, "bucket_width": data.bucket_width, "max_timestep": data.max_timestep,
                          "info": data.info}


def with_concept(sae: TopKSAE, data: ConceptData) -> TopKSAE:
    """A copy of ``sae`` (sharing its weights) with ``data`` added; ``sae`` itself is unchanged."""
    new = copy.copy(sae)
    new.concepts = copy.deepcopy(sae.concepts)
    new.extra_tensors = dict(sae.extra_tensors)
    add_concept(new, data)
    return new


def remove_concept(sae: TopKSAE, name: str) -> None:
    """Remove one concept (unknown names raise with the list of known ones)."""
    entry = _entry(sae, name)
    for f in _FIELDS:
        sae.extra_tensors.pop(f"concepts.{entry['key']}.{f}", None)
    del sae.concepts[name]


def _entry(sae: TopKSAE, name: str) -> dict[str, Any]:
    if name not in sae.concepts:
        known = ", ".join(repr(n) for n in sorted(sae.concepts)) or "none (learn one with 'saeuron learn-concept')"
        raise ConfigError(f"unknown concept {name!r}; this SAE knows: {known}")
    return sae.concepts[name]


def _finite(value: Any) -> Optional[float]:
    """A JSON value as a finite float; ``None`` for anything else (bools, strings, NaN, huge integers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


_ENTRY_CHECKS = {
    "key": (lambda v: isinstance(v, str) and bool(v), "the non-empty name of its tensors"),
    "bucket_width": (lambda v: _finite(v) is not None, "a finite number of timesteps"),
    "max_timestep": (lambda v: _finite(v) is not None and float(v).is_integer(), "a whole number"),
    "info": (lambda v: isinstance(v, dict), "a JSON object"),
}


def _read_entry(name: str, entry: Any, tensors: dict[str, Tensor]) -> ConceptData:
    """A library entry and its tensors as :class:`ConceptData`: known fields, JSON types and tensor dtypes
    checked; float tensors are cast to float32, ids and counts to int64 (values: :func:`check_concept`)."""
    def bad(f: str, problem: str) -> SAEFormatError:
        return SAEFormatError(f"concept {name!r}, field {f!r}: {problem}")

    if not isinstance(entry, dict):
        raise SAEFormatError(f"concept {name!r}: library entry must be a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_ENTRY_CHECKS))
    if unknown:
        raise SAEFormatError(f"concept {name!r}: unknown field(s) {unknown} in its library entry "
                             f"(an entry holds {', '.join(_ENTRY_CHECKS)})")
    for f, (ok, want) in _ENTRY_CHECKS.items():
        if f not in entry and f != "info":
            raise bad(f, "is missing")
        if f in entry and not ok(entry[f]):
            raise bad(f, f"must be {want}, got {entry[f]!r}")
    read: dict[str, Tensor] = {}
    for f in _FIELDS:
        t = tensors.get(f"concepts.{entry['key']}.{f}")
        if t is None:
            raise bad(f, f"tensor 'concepts.{entry['key']}.{f}' is missing from the file")
        integral = not (t.is_floating_point() or t.is_complex() or (t.dtype == torch.bool and f != "observed"))
        if t.is_floating_point() != (f in _FLOAT_FIELDS) or (f not in _FLOAT_FIELDS and not integral):
            want = "a float" if f in _FLOAT_FIELDS else "a bool or 0/1 integer" if f == "observed" else "an integer"
            raise bad(f, f"tensor has dtype {str(t.dtype).replace('torch.', '')}; expected {want} tensor")
        if f == "observed" and not ((t == 0) | (t == 1)).all():
            raise bad(f, "holds values other than 0 and 1")
        read[f] = t.float() if f in _FLOAT_FIELDS else t.bool() if f == "observed" else t.long()
    return ConceptData(name=name, bucket_width=float(entry["bucket_width"]), max_timestep=int(entry["max_timestep"]),
                       info=dict(entry.get("info", {})), **read)


def check_concept(sae: Optional[TopKSAE], data: ConceptData) -> None:
    """Validate a concept against itself and ``sae`` (``None``: only what needs no SAE); raises :class:`ConfigError`
    naming the concept and field.

    Positive bucket width and ``max_timestep`` spanned by the buckets; ``[buckets, candidates]`` tensors of one
    shape; finite ``scores``, ``mu`` and ``threshold``, the latter two >= 0 (mean activations); feature ids of
    this SAE whose encoder and decoder rows are not all zero (else the feature can neither fire nor be erased);
    some bucket observed; 0 <= ``n_selected`` <= candidates.
    """
    def bad(f: str, problem: str) -> ConfigError:
        return ConfigError(f"concept {data.name!r}, field {f!r}: {problem}")

    if not math.isfinite(data.bucket_width) or data.bucket_width <= 0:
        raise bad("bucket_width", f"must be a positive number of timesteps, got {data.bucket_width}")
    if data.max_timestep <= 0:
        raise bad("max_timestep", f"must be positive, got {data.max_timestep}")
    ids = data.feature_ids
    if ids.dim() != 2 or not ids.numel():
        raise bad("feature_ids", f"must be [buckets, candidates], got shape {list(ids.shape)}")
    nb, m = ids.shape
    try:
        spans = math.ceil(data.max_timestep / data.bucket_width)  # as ConceptStats counts its buckets
    except OverflowError:
        spans = -1
    if spans != nb:
        raise bad("bucket_width", f"{nb} buckets of {data.bucket_width:g} timesteps do not span max_timestep "
                                  f"{data.max_timestep}")
    for f in ("scores", "mu", "threshold", "n_selected", "observed"):
        t, shape = getattr(data, f), (nb, m) if f in _FLOAT_FIELDS else (nb,)
        if tuple(t.shape) != shape:
            raise bad(f, f"has shape {list(t.shape)}, expected {list(shape)} to match feature_ids")
    for f in _FLOAT_FIELDS:
        t = getattr(data, f).float()
        wrong = ~torch.isfinite(t) if f == "scores" else ~(t >= 0) | ~torch.isfinite(t)
        if wrong.any():
            b = int(wrong.nonzero()[0, 0])
            meant = "finite" if f == "scores" else "finite and >= 0 (a mean activation)"
            raise bad(f, f"must be {meant}, got {float(t[wrong][0])} (bucket {b})")
    if sae is None and int(ids.min()) < 0:
        raise bad("feature_ids", f"names feature {int(ids.min())}; feature ids are never negative")
    if sae is not None and (int(ids.min()) < 0 or int(ids.max()) >= sae.n_latents):
        value = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise bad("feature_ids", f"names feature {value} but the SAE's features are 0..{sae.n_latents - 1}")
    if not data.observed.any():
        raise bad("observed", "no bucket was observed while scoring: the entry was learned from nothing")
    if int(data.n_selected.min()) < 0 or int(data.n_selected.max()) > m:
        raise bad("n_selected", f"must count 0..{m} selected candidates per bucket, got "
                                f"{int(data.n_selected.min())}..{int(data.n_selected.max())}")
    if sae is None:
        return
    chosen = ids[data.selected_mask()].unique().to(sae.device)
    for weight, what in ((sae.encoder.weight, "encoder"), (sae.W_dec, "decoder")):
        dead = chosen[(weight.detach()[chosen] == 0).all(1)]
        if len(dead):
            raise bad("feature_ids", f"selects feature {int(dead[0])}, whose {what} row is all zero in this SAE")


def get_concept(sae: TopKSAE, name: str) -> ConceptData:
    """Read one concept back from the SAE's library, every field validated (raises :class:`SAEFormatError`)."""
    data = _read_entry(name, _entry(sae, name), sae.extra_tensors)
    try:
        check_concept(sae, data)
    except ConfigError as exc:
        raise SAEFormatError(str(exc)) from None
    return data


def check_library(sae: TopKSAE) -> None:
    """Validate the whole library: names, every entry (:func:`get_concept`), one key per entry, and every
    ``concepts.*`` tensor belonging to an entry. Raises :class:`SAEFormatError`."""
    owners: dict[str, str] = {}
    for name in sae.concepts:
        try:
            check_concept_name(name)
        except ConfigError as exc:
            raise SAEFormatError(f"concept library holds a bad name ({exc})") from None
        get_concept(sae, name)
        key = sae.concepts[name]["key"]
        if key in owners:
            raise SAEFormatError(f"concepts {owners[key]!r} and {name!r} share the key {key!r}: one entry's "
                                 f"tensors would be the other's")
        owners[key] = name
    known = {f"concepts.{key}.{f}" for key in owners for f in _FIELDS}
    stray = sorted(t for t in sae.extra_tensors if t.startswith("concepts.") and t not in known)
    if stray:
        raise SAEFormatError(f"tensor {stray[0]!r} belongs to no concept in the library (concept tensors are "
                             f"'concepts.<key>.<field>' with the fields {', '.join(_FIELDS)})")


def concept_names(sae: TopKSAE) -> list[str]:
    return sorted(sae.concepts)
