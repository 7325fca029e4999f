"""Concept scoring (SAeUron's importance score) and the SAE file's concept library.

For a concept c and timestep bucket t, feature i gets the score
``p_c(i) - p_o(i)`` where ``p_c`` is the mean activation of every feature over all tokens of
generations whose prompts contain c, normalised to sum to 1 over features, and ``p_o`` the same
for prompts without c. Per feature and bucket we also keep ``mu`` (mean activation on c, zeros
included) and a firing threshold (the mean activation over all prompts, with and without c).

SAeUron's score favours strong features: one that is 5x as large as the others but fires almost as
often without c as with it wins over a weaker feature that fires only with c. Such a feature, used
as a detector, fires on concept-free images too, and erasing it damages them. So a feature is only
selected when its *specificity* ``(m_c - m_o) / (m_c + m_o)`` (unnormalised means, in [-1, 1]) is at
least ``min_specificity``; 0 keeps SAeUron's selection. Pooling all negative prompts hides a feature
that c shares with one sibling concept (circle and ring, solid and gradient): erasing c through it
damages the sibling. With ``peak_specificity`` a feature must also be that specific against the one
negative prompt where it is most active.

Everything is keyed by the diffusion *timestep value*, bucketed (``bucket_width`` timesteps per
bucket), not by the index of the sampling step: a concept learned with 50 DDIM steps applies with
20 Euler steps or in ComfyUI's samplers. Buckets never observed take the nearest observed bucket.
Statistics are streamed: memory is ``O(n_latents x buckets)`` whatever the number of tokens.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import ConfigError, SAEFormatError
from .sae import TopKSAE

MAX_CANDIDATES = 64
MAX_NAME_LENGTH = 200
DEFAULT_MIN_SPECIFICITY = 0.5


def bucket_of(timesteps: Tensor, bucket_width: float, n_buckets: int) -> Tensor:
    """Bucket index of each timestep value, clamped to ``[0, n_buckets)``."""
    return (timesteps.float() / bucket_width).floor().long().clamp_(0, n_buckets - 1)


class ConceptStats:
    """Streaming sums of SAE activations per timestep bucket for groups of prompts.

    Group 0 holds the prompts with the concept and group 1 those without; :meth:`result` scores
    such a two-group table. With more groups (one per prompt, say) one generation pass serves many
    concepts: :meth:`merge` sums groups into the two-group table of each concept.
    """

    def __init__(self, n_latents: int, *, bucket_width: float = 20.0, max_timestep: int = 1000,
                 n_groups: int = 2) -> None:
        if bucket_width <= 0 or max_timestep <= 0:
            raise ConfigError("bucket_width and max_timestep must be positive")
        self.n_latents = n_latents
        self.bucket_width = float(bucket_width)
        self.max_timestep = int(max_timestep)
        self.n_buckets = math.ceil(max_timestep / bucket_width)
        self.sums = torch.zeros(n_groups, self.n_buckets, n_latents, dtype=torch.float64)
        self.tokens = torch.zeros(n_groups, self.n_buckets, dtype=torch.float64)
        # Per bucket and feature, the largest mean activation of any single negative group (set by merge).
        self.negative_peak: Optional[Tensor] = None

    def add(self, positive: bool, timesteps: Tensor, values: Tensor, indices: Tensor) -> None:
        """Accumulate codes ``values/indices [rows, tokens, k]`` of rows with these ``timesteps [rows]``."""
        self.add_to(0 if positive else 1, timesteps, values, indices)

    def add_to(self, group: int, timesteps: Tensor, values: Tensor, indices: Tensor) -> None:
        """Like :meth:`add`, every row going to ``group``."""
        self.add_groups(torch.full((values.shape[0],), group, dtype=torch.long), timesteps, values, indices)

    def add_groups(self, groups: Tensor, timesteps: Tensor, values: Tensor, indices: Tensor) -> None:
        """Like :meth:`add`, each row going to its own group ``groups [rows]``."""
        rows = values.shape[0]
        cell = groups.cpu() * self.n_buckets + bucket_of(timesteps.cpu(), self.bucket_width, self.n_buckets)
        per_row = torch.zeros(rows, self.n_latents, dtype=torch.float64)
        per_row.scatter_add_(1, indices.reshape(rows, -1).cpu(), values.reshape(rows, -1).detach().cpu().double())
        self.sums.view(-1, self.n_latents).index_add_(0, cell, per_row)
        self.tokens.view(-1).index_add_(0, cell, torch.full((rows,), float(values.shape[1]), dtype=torch.float64))

    def merge(self, positive: Sequence[int], negative: Sequence[int], *, peak: bool = False) -> "ConceptStats":
        """The two-group (with / without the concept) table summed from these groups.

        With ``peak`` it also keeps, per bucket and feature, the largest mean activation of any one
        negative group (``negative_peak``, for ``result(peak_specificity=...)``).
        """
        out = ConceptStats(self.n_latents, bucket_width=self.bucket_width, max_timestep=self.max_timestep)
        for g, ids in enumerate((positive, negative)):
            idx = torch.as_tensor(list(ids), dtype=torch.long)
            out.sums[g] = self.sums.index_select(0, idx).sum(0)
            out.tokens[g] = self.tokens.index_select(0, idx).sum(0)
        if peak:
            # A running max: one [buckets, latents] table at a time, whatever the number of negative prompts.
            out.negative_peak = torch.zeros(self.n_buckets, self.n_latents, dtype=torch.float64)
            for g in negative:
                torch.maximum(out.negative_peak, self.sums[g] / self.tokens[g].clamp_min(1)[:, None],
                              out=out.negative_peak)
        return out

    def result(self, name: str, *, top_n: Optional[int] = None, quantile: Optional[float] = None,
               min_specificity: float = DEFAULT_MIN_SPECIFICITY, candidates: int = MAX_CANDIDATES,
               info: Optional[dict[str, Any]] = None, peak_specificity: Optional[float] = None) -> "ConceptData":
        """Scores, selection, ``mu`` and thresholds per bucket (unobserved buckets copy the nearest).

        Candidates are the features with the highest score among those at least ``min_specificity``
        specific (and ``peak_specificity`` specific against the negative group where they are most
        active, when given), followed by the others (kept for inspection, never selected).
        """
        top_n = check_selection(top_n, quantile, candidates, min_specificity, peak_specificity)
        observed = (self.tokens[0] > 0) & (self.tokens[1] > 0)
        if not observed.any():
            raise ConfigError(f"concept {name!r}: no timestep saw both positive and negative prompts")
        m = min(candidates, self.n_latents)
        mean = self.sums / self.tokens.clamp_min(1)[..., None]
        p_c = mean[0] / (mean[0].sum(-1, keepdim=True) + 1e-8)
        p_o = mean[1] / (mean[1].sum(-1, keepdim=True) + 1e-8)
        score = p_c - p_o
        specific = (mean[0] - mean[1]) >= min_specificity * (mean[0] + mean[1])
        usable = specific & (score > 0)  # a feature must also be more active with c
        if peak_specificity is not None:
            # Without per-group peaks (a two-group table) the pooled negative mean is the only one.
            peak = self.negative_peak if self.negative_peak is not None else mean[1]
            usable &= (mean[0] - peak) >= peak_specificity * (mean[0] + peak)
        pooled = self.sums.sum(0) / self.tokens.sum(0).clamp_min(1)[:, None]
        # Usable features rank first (score lies in [-1, 1], so +4 lifts them above all others).
        ids = (score + 4.0 * usable).topk(m, dim=-1).indices
        top_scores = score.gather(1, ids)
        n_usable = usable.gather(1, ids).sum(-1)
        if quantile is not None:
            cut = torch.quantile(score.float(), quantile, dim=-1, keepdim=True).double()
            n_sel = (top_scores > cut).cumprod(-1).sum(-1)
        else:
            n_sel = torch.full((self.n_buckets,), top_n, dtype=torch.long)
        n_sel = torch.minimum(n_sel, n_usable)
        if not n_sel[observed].any():
            raise ConfigError(
                f"concept {name!r}: no SAE feature is more active with the concept than without it"
                + (f" and at least {min_specificity} specific; lower min_specificity" if min_specificity else "")
                + (f" (and at least {peak_specificity} against every negative prompt: lower peak_specificity)"
                   if peak_specificity is not None else "")
                + ", or give more (or more distinct) positive and negative prompts"
            )
        # Nearest observed bucket for every bucket.
        obs_idx = observed.nonzero().squeeze(1)
        nearest = obs_idx[(torch.arange(self.n_buckets)[:, None] - obs_idx[None]).abs().argmin(1)]
        return ConceptData(
            name=name, bucket_width=self.bucket_width, max_timestep=self.max_timestep,
            feature_ids=ids[nearest], scores=top_scores[nearest].float(),
            mu=mean[0].gather(1, ids)[nearest].float(), threshold=pooled.gather(1, ids)[nearest].float(),
            n_selected=n_sel[nearest], observed=observed,
            info={**(info or {}), "selection": {"top_n": top_n, "quantile": quantile,
                                                 "min_specificity": min_specificity,
                                                 **({} if peak_specificity is None else
                                                    {"peak_specificity": peak_specificity})}},
        )


def check_selection(top_n: Optional[int], quantile: Optional[float], candidates: int = MAX_CANDIDATES,
                    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
                    peak_specificity: Optional[float] = None) -> Optional[int]:
    """Validate the feature selection; returns ``top_n`` (3 when neither is given)."""
    if not isinstance(min_specificity, (int, float)) or not 0.0 <= min_specificity < 1.0:
        raise ConfigError(f"min_specificity must be in [0, 1), e.g. 0.5, got {min_specificity!r}")
    if peak_specificity is not None and (not isinstance(peak_specificity, (int, float))
                                         or not 0.0 <= peak_specificity < 1.0):
        raise ConfigError(f"peak_specificity must be in [0, 1) (or not given), e.g. 0.0, got {peak_specificity!r}")
    if top_n is not None and quantile is not None:
        raise ConfigError("select features with exactly one of top_n or quantile")
    if top_n is None and quantile is None:
        top_n = 3
    if top_n is not None and not 1 <= top_n <= candidates:
        raise ConfigError(f"top_n must be between 1 and {candidates}, got {top_n}")
    if quantile is not None and not 0.0 < quantile < 1.0:
        raise ConfigError(f"quantile must be in (0, 1), e.g. 0.9999, got {quantile}")
    return top_n


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


# -- the concept library inside an SAE ---------------------------------------------------------

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


def check_concept(sae: TopKSAE, data: ConceptData) -> None:
    """Validate a concept against itself and ``sae``; raises :class:`ConfigError` naming the concept and field.

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
    if int(ids.min()) < 0 or int(ids.max()) >= sae.n_latents:
        value = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise bad("feature_ids", f"names feature {value} but the SAE's features are 0..{sae.n_latents - 1}")
    if not data.observed.any():
        raise bad("observed", "no bucket was observed while scoring: the entry was learned from nothing")
    if int(data.n_selected.min()) < 0 or int(data.n_selected.max()) > m:
        raise bad("n_selected", f"must count 0..{m} selected candidates per bucket, got "
                                f"{int(data.n_selected.min())}..{int(data.n_selected.max())}")
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


# -- learning a concept ------------------------------------------------------------------------

class ConceptRecorder:
    """Block-call function that feeds :class:`ConceptStats` from the conditional rows of each call.

    Set ``group`` (the group of the prompt about to be generated, e.g. 0 with the concept and 1
    without) before each generation, whatever the number of conditional rows it makes. Used by the
    ComfyUI Learn Concept node, whose sampler may batch or split the rows of one prompt.
    """

    def __init__(self, sae: TopKSAE, stats: ConceptStats) -> None:
        self.sae, self.stats, self.group = sae, stats, 0

    def __call__(self, call: Any) -> None:
        if call.timesteps is None:
            raise ConfigError("scoring needs the timestep of each call: hook the UNet, not a lone block")
        rows = call.tokens[call.is_cond]
        if rows.shape[0]:
            with torch.no_grad():
                code = self.sae.encode(rows)
            self.stats.add_to(self.group, call.timesteps[call.is_cond], code.values, code.indices)
        return None


def learn_concept(pipe: Any, sae: TopKSAE, name: str, positive: Sequence[str], negative: Sequence[str], *,
                  hook_point: Optional[str] = None, steps: int = 50, guidance_scale: float = 7.5,
                  scheduler: Optional[str] = None, seeds: Sequence[int] = (0,), batch_size: int = 4,
                  top_n: Optional[int] = None, quantile: Optional[float] = None,
                  min_specificity: float = DEFAULT_MIN_SPECIFICITY, bucket_width: float = 20.0,
                  height: Optional[int] = None, width: Optional[int] = None, progress: bool = True,
                  peak_specificity: Optional[float] = None) -> ConceptData:
    """Generate ``positive`` and ``negative`` prompts, score the SAE's features and add the concept to ``sae``.

    Activations are read from the conditional half only (as SAeUron does).
    """
    return learn_concepts(pipe, sae, {name: (positive, negative)}, hook_point=hook_point, steps=steps,
                          guidance_scale=guidance_scale, scheduler=scheduler, seeds=seeds, batch_size=batch_size,
                          top_n=top_n, quantile=quantile, min_specificity=min_specificity,
                          bucket_width=bucket_width, height=height, width=width, progress=progress,
                          peak_specificity=peak_specificity)[0]


class PromptRecorder:
    """Block-call function that files the conditional rows of each call under the prompt that made them.

    Set ``groups`` (one group id per prompt of the next pipeline call, in order) before each call.
    """

    def __init__(self, sae: TopKSAE, stats: ConceptStats) -> None:
        self.sae, self.stats, self.groups = sae, stats, torch.zeros(0, dtype=torch.long)

    def __call__(self, call: Any) -> None:
        if call.timesteps is None:
            raise ConfigError("scoring needs the timestep of each call: hook the UNet, not a lone block")
        rows = call.tokens[call.is_cond]
        if rows.shape[0] != len(self.groups):
            raise ConfigError(f"expected {len(self.groups)} conditional rows per UNet call, got {rows.shape[0]}")
        with torch.no_grad():
            code = self.sae.encode(rows)
        self.stats.add_groups(self.groups, call.timesteps[call.is_cond], code.values, code.indices)
        return None


def learn_concepts(pipe: Any, sae: TopKSAE, concepts: dict[str, tuple[Sequence[str], Sequence[str]]], *,
                   hook_point: Optional[str] = None, steps: int = 50, guidance_scale: float = 7.5,
                   scheduler: Optional[str] = None, seeds: Sequence[int] = (0,), batch_size: int = 4,
                   top_n: Optional[int] = None, quantile: Optional[float] = None,
                   min_specificity: float = DEFAULT_MIN_SPECIFICITY, bucket_width: float = 20.0,
                   height: Optional[int] = None, width: Optional[int] = None,
                   progress: bool = True, peak_specificity: Optional[float] = None) -> list[ConceptData]:
    """Learn several concepts ``{name: (positive prompts, negative prompts)}`` from one generation pass.

    Every distinct prompt is generated once per seed, whatever the number of concepts using it;
    each concept is then scored from the statistics of its own prompts and added to ``sae``.
    """
    from .hooks import check_sae_fits, denoiser, pipeline_hook
    from .pipelines import generate, set_scheduler

    if not concepts:
        raise ConfigError("learn_concepts: no concepts given")
    cleaned: dict[str, tuple[list[str], list[str]]] = {}
    for name, (positive, negative) in concepts.items():
        name = check_concept_name(name)
        pos, neg = [p for p in positive if p.strip()], [p for p in negative if p.strip()]
        if not pos or not neg:
            raise ConfigError(f"concept {name!r}: needs at least one positive and one negative prompt")
        cleaned[name] = (pos, neg)
    if steps < 1 or batch_size < 1 or not seeds:
        raise ConfigError("learn_concept: steps and batch_size must be >= 1 and at least one seed is needed")
    check_selection(top_n, quantile, min_specificity=min_specificity, peak_specificity=peak_specificity)
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("the SAE does not say where it hooks; pass hook_point (e.g. 'up_blocks.1.attentions.1')")
    check_sae_fits(denoiser(pipe), hook_point, sae)
    prompts = list(dict.fromkeys(p for pos, neg in cleaned.values() for p in pos + neg))
    group = {p: i for i, p in enumerate(prompts)}
    old_scheduler = pipe.scheduler
    if scheduler:
        set_scheduler(pipe, scheduler)
    max_t = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
    stats = ConceptStats(sae.n_latents, bucket_width=bucket_width, max_timestep=max_t, n_groups=len(prompts))
    record = PromptRecorder(sae, stats)
    work = [(p, s) for s in seeds for p in prompts]
    label = next(iter(cleaned)) if len(cleaned) == 1 else f"{len(cleaned)} concepts"
    bar = tqdm(total=len(work), desc=f"learn {label}", unit="gen", disable=not progress)
    scheduler_name = type(pipe.scheduler).__name__
    try:
        with pipeline_hook(pipe, hook_point, record, residual=sae.config.residual), torch.no_grad():
            for begin in range(0, len(work), batch_size):
                chunk = work[begin:begin + batch_size]
                record.groups = torch.tensor([group[p] for p, _ in chunk], dtype=torch.long)
                generate(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps=steps,
                         guidance_scale=guidance_scale, height=height, width=width)
                bar.update(len(chunk))
    finally:
        bar.close()
        pipe.scheduler = old_scheduler
    learned = []
    for name, (pos, neg) in cleaned.items():
        merged = stats.merge([group[p] for p in pos], [group[p] for p in neg], peak=peak_specificity is not None)
        info = {"positive": pos, "negative": neg, "hook_point": hook_point, "steps": steps,
                "guidance_scale": guidance_scale, "scheduler": scheduler_name, "seeds": list(seeds),
                "tokens": {"positive": float(merged.tokens[0].sum()), "negative": float(merged.tokens[1].sum())}}
        learned.append(merged.result(name, top_n=top_n, quantile=quantile, min_specificity=min_specificity, info=info,
                                     peak_specificity=peak_specificity))
    for data in learned:
        add_concept(sae, data)
    return learned
