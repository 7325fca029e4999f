"""The two interventions, applied at the hooked block to every call of the UNet.

* **ablate** (SAeUron): encode the block output; where a selected feature of an erased concept
  fires above its threshold, its activation ``a`` becomes ``gamma * mu * a`` with
  ``gamma = -strength``; decode and add back the SAE's reconstruction error. Implemented as
  ``x + decode_without_bias(a_new - a)``, which is the same thing and leaves every token whose
  features did not change bit-for-bit equal to the input.
* **replace** (look but don't touch): the selected features only *detect* concept tokens; those
  tokens' hidden states are replaced by in-distribution ones that do not contain the concept.
  By default the detection mask is grown by one patch (``dilation``) and the replacement is the
  unconditional CFG row's token at the same position (``source="uncond"``; without an unconditional
  half, tokens sampled from undetected positions of the same map, ``"sample"``; ``"nearest"`` takes
  the mean of the ``neighbors`` nearest undetected ones). On the demo model an object's features fire
  on most of the map, not only on the object, so patches of the same map still carry it; and the
  object is drawn again by a later block from the prompt, so :meth:`ConceptEraser.follower` replays
  the detection at later blocks (``erase(..., also_at=[...])``). Undetected tokens are left
  bit-for-bit unchanged.

Both act only inside a denoising window (``start``..``end`` as a fraction of the denoising, 0 =
first step), on the chosen CFG rows, and look features up by timestep *value*.

With ``min_coverage`` a concept is only touched in the images where its features fire on at least
that share of the feature map (per call, read on the image's conditional row and applied to both
CFG rows of that image). A concept's features also fire on a few tokens of images that lack it;
erasing there is what costs the other concepts, and the gate leaves those images alone.
``detect_with`` lets another library entry read the coverage: strong features that a sibling concept
shares erase well but fire on the sibling's images too; an entry learned with ``peak_specificity``
fires only where the concept is, so it can decide where the strong ones act (look with one, touch
with the other).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..hosts.hooks import BlockCall, BlockHook, CfgLayout, HookFn, check_sae_fits, denoiser, pipeline_cfg_layout
from ..sae.library import ConceptData, bucket_of, get_concept
from ..sae.model import TopKSAE
from ..seeds import derived_seed
from .options import ConceptsArg, EraseOptions, Method, check_strength, normalize_concepts
from .regions import Mount, RegionEdit


def _selected_cells(c: ConceptData) -> tuple[Tensor, Tensor, Tensor]:
    """``(selected mask [buckets, M], bucket index, feature id)`` of each selected candidate of ``c``."""
    sel = c.selected_mask()
    return sel, torch.arange(c.n_buckets)[:, None].expand_as(c.feature_ids)[sel], c.feature_ids[sel]


@dataclass
class MaskRecord:
    """Where the concept was detected at one call: ``mask [rows, H, W]`` (or ``[rows, N]``)."""

    call_index: int
    timesteps: Tensor
    rows: Tensor
    mask: Tensor


class ConceptEraser:
    """Block-hook function that erases concepts (``method`` ablate or replace) from an SAE's library."""

    def __init__(self, sae: TopKSAE, concepts: ConceptsArg, method: Optional[Method] = None, *,
                 options: Optional[EraseOptions] = None, **changes: Any) -> None:
        """``options`` (an :class:`EraseOptions`) with ``method`` and any of its fields given by name changed."""
        self.options = o = EraseOptions.build(options, method=method, **changes)
        self.sae, self.method, self.start, self.end, self.cfg = sae, o.method, o.start, o.end, o.cfg
        self.threshold_scale, self.dilation, self.source, self.seed = o.threshold_scale, o.dilation, o.source, o.seed
        self.neighbors = int(o.neighbors)
        self.strengths = normalize_concepts(concepts, o.strength)
        for name, value in self.strengths.items():
            check_strength(o.method, name, value)
        self.concepts: list[ConceptData] = [get_concept(sae, name) for name in self.strengths]
        self.min_coverage = self._coverage_per_concept(o.min_coverage)
        entries = self._detectors(o.detect_with or {})
        for c in self.concepts + list(entries.values()):
            if not c.n_selected.any():
                raise ConfigError(f"concept {c.name!r} selects no feature at any timestep, so erasing with it would "
                                  f"change nothing; relearn it (e.g. with a lower min_specificity)")
        self.detect_with = {name: d.name for name, d in entries.items()}
        # the entry whose features read each gated concept's coverage (None: not gated)
        self.detectors: list[Optional[ConceptData]] = [entries.get(c.name, c) if float(self.min_coverage[j]) > 0
                                                       else None for j, c in enumerate(self.concepts)]
        self.record_masks = o.record_masks
        self.masks: list[MaskRecord] = []
        self._last_mask: Optional[tuple[Tensor, Tensor, Tensor, Optional[tuple[int, int]]]] = None
        self._build_tables()

    def _coverage_per_concept(self, min_coverage: Union[float, Mapping[str, float]]) -> Tensor:
        """``[n_concepts]`` gate of each erased concept (a mapping names some; the others get 0).

        The values were checked when the :class:`EraseOptions` were built; here only the names are.
        """
        if isinstance(min_coverage, Mapping):
            self._refuse_stray("min_coverage", min_coverage)
            values = {str(k): float(v) for k, v in min_coverage.items()}
        else:
            values = {name: float(min_coverage) for name in self.strengths}
        return torch.tensor([values.get(name, 0.0) for name in self.strengths], dtype=torch.float32)

    def _refuse_stray(self, option: str, names: Mapping[str, Any]) -> None:
        stray = sorted(set(map(str, names)) - set(self.strengths))
        if stray:
            raise ConfigError(f"{option} is set for {', '.join(map(repr, stray))}, which this eraser does not "
                              f"erase (it erases {', '.join(map(repr, self.strengths))})")

    def _detectors(self, detect_with: Mapping[str, str]) -> dict[str, ConceptData]:
        """``{concept: detector entry}`` checked: the concept is erased here and the entry is in the library."""
        self._refuse_stray("detect_with", detect_with)
        # an unknown entry fails here, with the known ones listed
        return {str(k): get_concept(self.sae, str(v)) for k, v in detect_with.items()}

    # -- lookup tables: one dense row of n_latents per timestep bucket, for all concepts at once ----
    def _build_tables(self) -> None:
        n = self.sae.n_latents
        everything = self.concepts + [d for d in self.detectors if d is not None]
        if not everything:
            self.n_buckets, self.bucket_width, self.max_timestep = 1, 1000.0, 1000
        else:
            grids = {(c.bucket_width, c.max_timestep, c.n_buckets) for c in everything}
            if len(grids) > 1:
                raise ConfigError("these concepts were learned with different timestep buckets; relearn them with "
                                  "the same bucket width")
            self.bucket_width, self.max_timestep, self.n_buckets = grids.pop()
        nb, nc = self.n_buckets, len(self.concepts)
        scale = torch.ones(nb, n)
        thr = torch.full((nb, n), math.inf)
        # Per concept, the features it edits and those that read its coverage for the gate.
        edits = torch.zeros(nc, nb, n, dtype=torch.bool)
        reads = torch.zeros(nc, nb, n, dtype=torch.bool)
        for j, c in enumerate(self.concepts):
            gamma = -self.strengths[c.name]
            if gamma == 0.0:
                continue  # strength 0: the concept changes nothing
            sel, b_idx, f_idx = _selected_cells(c)
            # A feature shared by several concepts takes the strongest push and the lowest threshold.
            scale[b_idx, f_idx] = torch.minimum(scale[b_idx, f_idx], gamma * c.mu[sel])
            thr[b_idx, f_idx] = torch.minimum(thr[b_idx, f_idx], c.threshold[sel] * self.threshold_scale)
            edits[j, b_idx, f_idx] = True
            detector = self.detectors[j]
            if detector is not None:  # gated: its detector's features read the coverage (scale 1: no edit)
                dsel, db, df = _selected_cells(detector)
                thr[db, df] = torch.minimum(thr[db, df], detector.threshold[dsel] * self.threshold_scale)
                reads[j, db, df] = True
        # Compact per-bucket slots: the union of the selected features, their push and threshold.
        chosen = thr < math.inf
        width = max(int(chosen.sum(1).max()) if nb else 0, 1)
        self.sel_ids = torch.zeros(nb, width, dtype=torch.long)
        self.sel_valid = torch.zeros(nb, width, dtype=torch.bool)
        self.sel_scale = torch.ones(nb, width)
        self.sel_thr = torch.full((nb, width), math.inf)
        self.sel_edits = torch.zeros(nb, width, max(nc, 1), dtype=torch.bool)
        self.sel_reads = torch.zeros(nb, width, max(nc, 1), dtype=torch.bool)
        for b in range(nb):
            ids = chosen[b].nonzero().squeeze(1)
            self.sel_ids[b, : len(ids)] = ids
            self.sel_valid[b, : len(ids)] = True
            self.sel_scale[b, : len(ids)] = scale[b, ids]
            self.sel_thr[b, : len(ids)] = thr[b, ids]
            self.sel_edits[b, : len(ids), :nc] = edits[:, b, ids].T
            self.sel_reads[b, : len(ids), :nc] = reads[:, b, ids].T
        self._device_tables: dict[Any, tuple[Tensor, ...]] = {}

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        key = (device, dtype)
        if key not in self._device_tables:
            self._device_tables[key] = (self.sel_ids.to(device), self.sel_valid.to(device),
                                        self.sel_scale.to(device, dtype), self.sel_thr.to(device, dtype),
                                        self.sel_edits.to(device), self.sel_reads.to(device),
                                        self.min_coverage.to(device))
        return self._device_tables[key]

    # -- which rows of this call are edited ---------------------------------------------------------
    def active_rows(self, call: BlockCall) -> Tensor:
        rows = torch.ones(call.tokens.shape[0], dtype=torch.bool)
        if self.cfg == "cond":
            rows &= call.is_cond
        elif self.cfg == "uncond":
            rows &= ~call.is_cond
        if call.timesteps is not None:
            progress = 1.0 - call.timesteps / self.max_timestep
            rows &= (progress >= self.start - 1e-6) & (progress <= self.end + 1e-6)
        if not self.concepts or not any(self.strengths.values()):
            rows[:] = False
        return rows

    def buckets(self, timesteps: Optional[Tensor], n_rows: int) -> Tensor:
        if timesteps is None:
            raise ConfigError("erasing needs the timestep of each call: hook the UNet, not a lone block")
        return bucket_of(timesteps, self.bucket_width, self.n_buckets)

    @property
    def gated(self) -> bool:
        """Whether some concept is only erased where it covers at least ``min_coverage`` of the map."""
        return bool((self.min_coverage > 0).any())

    def __call__(self, call: BlockCall) -> Optional[Tensor]:
        self._last_mask = None  # what followers replay: this call's detection only
        rows = self.active_rows(call)
        if not rows.any():
            return None
        # A gated eraser reads every row: an unconditional row is gated by its conditional partner.
        seen = torch.ones_like(rows) if self.gated else rows
        row_idx = seen.nonzero().squeeze(1)
        x = call.tokens[row_idx.to(call.tokens.device)]
        sae = self.sae.on_device(x.device)
        gate = (call.is_cond[seen], rows[seen]) if self.gated else None
        with torch.no_grad():
            mask, tok, fires, values, ids = self._detect(sae, x, self.buckets(call.timesteps[seen], x.shape[0]), gate)
            if self.method == "replace":
                new_x = self._replace(call, row_idx, x, mask)
            elif tok is None or not mask.any():
                return None
            else:
                new_x = self._ablate(sae, x, tok, fires, values, ids)
        out = call.tokens.clone()
        out[row_idx.to(out.device)] = new_x
        return out

    def _detect(self, sae: TopKSAE, x: Tensor, buckets: Tensor, gate: Optional[tuple[Tensor, Tensor]] = None
                ) -> tuple[Tensor, Any, Any, Any, Any]:
        """Where the selected features fire: ``(mask [r, t], token ids, fires [m, S], values, feature ids)``.

        Only the selected features' pre-activations are computed for every token; the full
        encode (needed to know whether a feature is in the token's top-k) runs only for tokens
        where one of them exceeds its threshold, so prompts without the concept cost little.
        ``gate`` (``is_cond [r]``, ``edit [r]``) applies ``min_coverage`` and leaves rows not to edit alone.
        """
        ids_t, valid_t, scale_t, thr_t, edits_t, reads_t, cover_t = self._tables(sae.device, sae.dtype)
        b = buckets.to(sae.device)
        ids, valid, thr = ids_t[b], valid_t[b], thr_t[b]                           # [r, S]
        xs = x.to(device=sae.device, dtype=sae.dtype)
        w = sae.encoder.weight[ids]                                                  # [r, S, C]
        pre = torch.baddbmm(sae.encoder.bias[ids][:, None, :], xs - sae.b_dec, w.transpose(1, 2))
        candidate = ((pre > thr[:, None, :]) & valid[:, None, :]).any(-1)           # [r, t]
        candidate &= torch.isfinite(xs).all(-1)  # inf/NaN tokens are left alone: no new NaNs from the SAE
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        if not candidate.any():
            return mask, None, None, None, None
        ri, ti = candidate.nonzero(as_tuple=True)
        full = sae.pre_acts(xs[ri, ti])                                              # [m, n_latents]
        kth = full.topk(sae.k, dim=-1, sorted=False).values.min(-1, keepdim=True).values
        values = full.gather(1, ids[ri])                                             # [m, S]
        fires = valid[ri] & (values > thr[ri]) & (values > 0) & (values >= kth)
        if gate is not None:
            fires = self._gate(fires, edits_t[b][ri], reads_t[b][ri], ri, x.shape, cover_t, *gate)
        mask[ri.to(x.device), ti.to(x.device)] = fires.any(-1).to(x.device)
        return mask, (ri, ti), fires, values * torch.where(fires, scale_t[b][ri] - 1, 0), ids[ri]

    @staticmethod
    def _gate(fires: Tensor, edits: Tensor, reads: Tensor, ri: Tensor, shape: torch.Size, min_coverage: Tensor,
              is_cond: Tensor, edit: Tensor) -> Tensor:
        """``fires`` kept only on the slots a concept edits where it is open, and only on rows to edit.

        A concept is open in a row when its detector's features (``reads``; its own unless
        ``detect_with`` names another entry) fire on at least ``min_coverage`` of the tokens of that
        image's conditional row (the k-th unconditional row is paired with the k-th conditional one, as
        in the batch; without a partner a row reads its own coverage). Ungated concepts are always open.
        """
        rows, n_tokens = shape[0], shape[1]
        shows = (fires[:, :, None] & reads).any(1).to(min_coverage.dtype)                 # [m, concepts]
        coverage = torch.zeros(rows, reads.shape[-1], dtype=min_coverage.dtype, device=fires.device)
        coverage.index_add_(0, ri, shows)
        coverage /= n_tokens
        is_cond, edit = is_cond.to(fires.device), edit.to(fires.device)
        cond_rows, uncond_rows = is_cond.nonzero().squeeze(1), (~is_cond).nonzero().squeeze(1)
        if len(cond_rows) == len(uncond_rows):
            coverage[uncond_rows] = coverage[cond_rows]
        gates = torch.zeros(reads.shape[-1], dtype=min_coverage.dtype, device=fires.device)
        gates[: len(min_coverage)] = min_coverage
        open_ = (coverage >= gates) & edit[:, None]                                          # [rows, concepts]
        return fires & (edits & open_[ri][:, None, :]).any(-1)

    def _ablate(self, sae: TopKSAE, x: Tensor, tok: tuple[Tensor, Tensor], fires: Tensor, change: Tensor,
                ids: Tensor) -> Tensor:
        """``x + sum_f (gamma * mu * a_f - a_f) W_dec[f]`` over firing features ``f``.

        That is ``recon_new + (x - recon)``: the reconstruction error is kept and tokens with no
        firing feature stay bit-for-bit equal.
        """
        ri, ti = tok
        delta = F.embedding_bag(ids, sae.W_dec, per_sample_weights=change.to(sae.dtype), mode="sum")
        ri, ti = ri.to(x.device), ti.to(x.device)
        new = (x[ri, ti].to(delta.dtype) + delta.to(x.device)).to(x.dtype)
        # Tokens whose result would overflow the model's dtype (or an fp16 SAE's) stay as they were.
        keep = (fires.any(-1).to(x.device) & torch.isfinite(new).all(-1))
        out = x.clone()
        out[ri[keep], ti[keep]] = new[keep]
        return out

    def _replace(self, call: BlockCall, row_idx: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(x.device)
        if self.dilation and call.spatial is not None:
            h, w = call.spatial
            grid = mask.reshape(-1, 1, h, w).float()
            mask = F.max_pool2d(grid, 2 * self.dilation + 1, stride=1, padding=self.dilation).reshape(mask.shape) > 0
            mask &= torch.isfinite(x).all(-1)  # inf/NaN tokens are left alone, grown mask or not
        if self.record_masks:
            shape = (mask.shape[0], *call.spatial) if call.spatial is not None else mask.shape
            self.masks.append(MaskRecord(call.call_index, call.timesteps[row_idx.cpu()].clone() if call.timesteps is not None
                                         else torch.zeros(0), row_idx.clone(), mask.reshape(shape).cpu()))
        if call.timesteps is not None:
            self._last_mask = (call.timesteps[row_idx.cpu()].clone(), row_idx.clone(), mask, call.spatial)
        return self._blend(call, row_idx, x, mask)

    def _blend(self, call: BlockCall, row_idx: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        replacement = self._replacement(call, row_idx, x, mask)
        s = max(self.strengths.values())
        blended = replacement if s == 1.0 else x + s * (replacement - x)
        return torch.where(mask[..., None], blended.to(x.dtype), x)

    def follower(self) -> "ReplaceFollower":
        """A hook function for a *later* block of the same denoiser: it replaces, at that block, the positions
        this eraser detected in the same call (the mask resized to that block's grid), from the same source.

        The concept is often drawn again after the detecting block (by later cross-attention reading the
        prompt, or through skip connections); replacing there too is "detect at one block, replace at every
        block where the concept enters". Needs ``method='replace'``.
        """
        if self.method != "replace":
            raise ConfigError("only method 'replace' can replay its detection at other blocks")
        return ReplaceFollower(self)

    def mounts(self, also_at: Sequence[str] = (), mask: Optional[Tensor] = None, mask_mode: str = "inside",
               hook_point: Optional[str] = None) -> list[Mount]:
        """What to hook where, in this order: this eraser at the SAE's block (or ``hook_point``) with the SAE's
        ``residual``, then a :meth:`follower` at each block of ``also_at``; with ``mask``, each as a
        :class:`RegionEdit` (only inside the painted region, or only outside it)."""
        def region(fn: HookFn) -> HookFn:
            return fn if mask is None else RegionEdit(fn, mask, mask_mode)  # type: ignore[arg-type]
        first = Mount(hook_point or self.sae.config.hook_point, region(self), bool(self.sae.config.residual))
        return [first] + [Mount(point, region(self.follower()), False) for point in also_at]

    def detection_mask(self, call: BlockCall) -> Tensor:
        """``[rows, tokens]`` bool: where the selected features fire in ``call`` (every row, no gate); edits nothing."""
        with torch.no_grad():
            sae = self.sae.on_device(call.tokens.device)
            return self._detect(sae, call.tokens, self.buckets(call.timesteps, call.tokens.shape[0]))[0]

    def _replacement(self, call: BlockCall, row_idx: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        out = x.clone()
        if self.source == "uncond":
            cond_rows, uncond_rows = call.is_cond.nonzero().squeeze(1), (~call.is_cond).nonzero().squeeze(1)
            if len(cond_rows) == len(uncond_rows) and len(uncond_rows):
                partner = {int(c): int(u) for c, u in zip(cond_rows, uncond_rows)}
                for j, row in enumerate(row_idx.tolist()):
                    if row in partner:
                        out[j] = call.tokens[partner[row]]
                return out
            # no unconditional half in this call (CFG off, or the halves run apart): patches of the same map
        coords = None
        if self.source == "nearest":
            if call.spatial is not None:
                h, w = call.spatial
                yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                coords = torch.stack([yy.flatten(), xx.flatten()], 1).float().to(x.device)
            else:
                coords = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)[:, None]
        for j in range(x.shape[0]):
            det = mask[j].nonzero().squeeze(1)
            keep = (~mask[j] & torch.isfinite(x[j]).all(-1)).nonzero().squeeze(1)  # no inf/NaN copied in
            if not len(det):
                continue
            if not len(keep):  # the concept is everywhere: fall back to the map's mean token
                out[j, det] = x[j].mean(0, keepdim=True).to(x.dtype)
                continue
            if coords is not None:
                dist = torch.cdist(coords[det], coords[keep])
                if self.neighbors == 1:
                    pick = keep[dist.argmin(1)]
                else:  # the mean of the K nearest undetected patches (ties broken by position)
                    near = dist.topk(min(self.neighbors, len(keep)), dim=1, largest=False).indices
                    out[j, det] = x[j][keep[near]].mean(1).to(x.dtype)
                    continue
            else:
                t = float(call.timesteps[row_idx[j]]) if call.timesteps is not None else call.call_index
                g = torch.Generator().manual_seed(derived_seed("replace", self.seed, t, int(row_idx[j])))
                pick = keep[torch.randint(len(keep), (len(det),), generator=g).to(keep.device)]
            out[j, det] = x[j, pick]
        return out


class ReplaceFollower:
    """Replays a replace eraser's detection of the current call at another block (see :meth:`ConceptEraser.follower`)."""

    def __init__(self, eraser: ConceptEraser) -> None:
        self.eraser = eraser

    def __call__(self, call: BlockCall) -> Optional[Tensor]:
        last = self.eraser._last_mask
        if last is None or call.timesteps is None:
            return None
        timesteps, row_idx, mask, spatial = last
        if int(row_idx.max()) >= call.tokens.shape[0] or not torch.equal(call.timesteps[row_idx.cpu()].cpu(),
                                                                          timesteps.cpu()):
            return None  # not the call the mask was detected in (this block runs before the detecting one)
        n = call.tokens.shape[1]
        if spatial is not None and call.spatial is not None:
            grid = mask.reshape(-1, 1, *spatial).float()
            mask = F.interpolate(grid, size=call.spatial, mode="nearest").reshape(mask.shape[0], n) > 0
        elif mask.shape[1] != n:
            mask = F.interpolate(mask.float()[:, None], size=n, mode="nearest")[:, 0] > 0
        if not mask.any():
            return None
        x = call.tokens[row_idx.to(call.tokens.device)]
        with torch.no_grad():
            new_x = self.eraser._blend(call, row_idx, x, mask.to(x.device))
        out = call.tokens.clone()
        out[row_idx.to(out.device)] = new_x
        return out


@contextlib.contextmanager
def erase(target: Any, sae: TopKSAE, concepts: ConceptsArg, method: Optional[Method] = None, *,
          hook_point: Optional[str] = None, cfg_layout: Optional[CfgLayout] = None, also_at: Sequence[str] = (),
          mask: Optional[Tensor] = None, mask_mode: str = "inside", options: Optional[EraseOptions] = None,
          **changes: Any) -> Iterator[ConceptEraser]:
    """Everything inside the block generates with ``concepts`` erased; on exit ``target`` is as before.

    ``target`` is a diffusers pipeline (CFG halves are read from it) or a bare denoiser, a UNet or a FLUX / SD3
    transformer (then ``cfg_layout`` says how its batches are laid out; default ``"uncond_cond"`` as diffusers
    does). An SAE whose config says ``residual`` reads the block's update and its edit is added onto the output.
    How it erases: ``options`` (an :class:`EraseOptions`) and/or its fields by name (``strength``, ``start``,
    ``end``, ``cfg``, ``threshold_scale``, ``dilation``, ``source``, ``neighbors``, ``seed``, ``record_masks``,
    ``min_coverage``, ``detect_with``). ``also_at``: later blocks where a replace eraser also replaces what it
    detected; ``mask`` (``[H, W]`` or ``[M, H, W]``, 0..1): erase only inside the painted region
    (``mask_mode="outside"``: only outside it); see :meth:`ConceptEraser.mounts`.
    """
    is_pipeline = not isinstance(target, torch.nn.Module)
    unet = denoiser(target) if is_pipeline else target
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("the SAE does not say where it hooks; pass hook_point (e.g. 'up_blocks.1.attentions.1')")
    check_sae_fits(unet, hook_point, sae)
    eraser = ConceptEraser(sae, concepts, method, options=options, **changes)
    mounts = eraser.mounts(also_at, mask, mask_mode, hook_point)
    layout = pipeline_cfg_layout(target) if is_pipeline else (cfg_layout or "uncond_cond")
    with contextlib.ExitStack() as stack:
        stack.enter_context(sae.kept_beside(unet))
        for point, fn, residual in mounts:
            stack.enter_context(BlockHook(unet, point, fn, cfg_layout=layout, residual=residual))
        yield eraser
