"""Concept scoring: SAeUron's importance score, feature selection and streamed per-timestep statistics.

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

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sae.library import ConceptData, bucket_of
from .selection import DEFAULT_MIN_SPECIFICITY, MAX_CANDIDATES, Selection, check_selection

__all__ = ["ConceptStats", "DEFAULT_MIN_SPECIFICITY", "MAX_CANDIDATES", "Selection", "check_selection"]


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

    def result(self, name: str, selection: Optional[Selection] = None, *, candidates: int = MAX_CANDIDATES,
               info: Optional[dict[str, Any]] = None, **options: Any) -> "ConceptData":
        """Scores, selection, ``mu`` and thresholds per bucket (unobserved buckets copy the nearest).

        ``selection`` (a :class:`Selection`) and/or its fields by name (``top_n``, ``quantile``,
        ``min_specificity``, ``peak_specificity``; the buckets are this table's own). Candidates are the
        features with the highest score among those at least ``min_specificity`` specific (and
        ``peak_specificity`` specific against the negative group where they are most active, when given),
        followed by the others (kept for inspection, never selected).
        """
        selection = Selection.build(selection, **options)
        summary = selection.summary(candidates)
        top_n, quantile = summary["top_n"], selection.quantile
        min_specificity, peak_specificity = selection.min_specificity, selection.peak_specificity
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
            info={**(info or {}), "selection": summary},
        )

