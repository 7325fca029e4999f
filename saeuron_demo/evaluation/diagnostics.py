"""Why detect-and-replace erases so few objects on the demo model: per-block, per-step measurements.

Used by ``python -m scripts.sweep_demo_eval --diagnose-replace``. One generation of the whole 8 x 8 grid per
variant, each prompt with its *own* object erased (the 8 per-concept runs of an evaluation folded into one, restricted to the
erased concept's own images: UA, CRA and retained confidence, not IRA), with per block and per step:

* **mask coverage**: the share of the object's footprint (its pixels in the clean picture of the same prompt and
  seed, pooled onto the block's grid) that the detection mask covers, and the share of the background it flags;
* **presence**: the share of the map where the object's selected features fire *before* the edit (at the hooked
  blocks) and at ``up_blocks.1.attentions.1``, a block no object eraser touches (the first demo SAE's object
  entries): if the object is drawn again after its tokens were replaced, it shows here;
* **token shift**: per-channel ``|mean - mean_ref| / std_ref + |log(std / std_ref)|`` (the activation-shift
  measure) of the tokens written at the detected positions, against every token of the clean run's maps at the
  same block and step, and the same for the detected tokens before the edit; ``norm`` is their mean L2 norm over
  the clean maps' mean norm.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECT_BLOCKS = ("down_blocks.2.attentions.1", "mid_block.attentions.0")
WATCH_BLOCK = "up_blocks.1.attentions.1"


@dataclasses.dataclass
class Variant:
    name: str
    method: str = "replace"                  # none | ablate | replace | oracle
    options: dict = dataclasses.field(default_factory=dict)   # ConceptEraser options (replace)
    follow: dict = dataclasses.field(default_factory=dict)    # extra block -> block whose mask it replays
    oracle_blocks: tuple = ()                # oracle: every token of these blocks' cond rows -> the uncond row's


def footprints(images: Tensor) -> Tensor:
    """``[n, 32, 32]`` float share of object pixels: far from the border's median colour."""
    x = images.float() / 255.0
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    return ((x - bg).abs().sum(1) > 0.3).float()


def on_grid(fp: Tensor, h: int, w: int) -> Tensor:
    """Footprint pooled onto an ``h x w`` grid: a cell is the object's when >= 25% of its pixels are."""
    return F.adaptive_avg_pool2d(fp[:, None], (h, w))[:, 0] >= 0.25


class Acc:
    """Running sums per (block, step) of named quantities."""

    def __init__(self) -> None:
        self.sums: dict[tuple, list[float]] = {}

    def add(self, key: tuple, num: float, den: float) -> None:
        s = self.sums.setdefault(key, [0.0, 0.0])
        s[0] += num
        s[1] += den

    def get(self, key: tuple) -> float:
        s = self.sums.get(key)
        return s[0] / s[1] if s and s[1] else float("nan")


class Moments:
    def __init__(self) -> None:
        self.n, self.s, self.sq, self.norm = 0, None, None, 0.0

    def add(self, t: Tensor) -> None:
        t = t.detach().double().reshape(-1, t.shape[-1])
        if not len(t):
            return
        if self.s is None:
            self.s, self.sq = torch.zeros(t.shape[1], dtype=torch.float64), torch.zeros(t.shape[1], dtype=torch.float64)
        self.n += len(t)
        self.s += t.sum(0)
        self.sq += (t * t).sum(0)
        self.norm += float(t.norm(dim=1).sum())

    def stats(self) -> tuple[Tensor, Tensor, float]:
        m = self.s / self.n
        return m, (self.sq / self.n - m * m).clamp_min(1e-12).sqrt(), self.norm / self.n


def shift(a: "Moments", ref: "Moments") -> tuple[float, float]:
    if a.n == 0 or ref.n == 0:
        return float("nan"), float("nan")
    m, sd, nrm = a.stats()
    mr, sdr, nr = ref.stats()
    return float(((m - mr).abs() / sdr + (sd / sdr).log().abs()).mean()), nrm / nr


@dataclasses.dataclass
class _Work:
    """What every variant of a diagnosis shares: the pipeline, the SAEs, the (prompt, seed) pairs and the detectors."""
    pipe: Any
    saes: dict
    grid: Any
    work: list
    detectors: dict                          # block -> object -> ConceptEraser that only detects
    watch: dict                              # object -> detector at WATCH_BLOCK
    steps: int
    guidance: float

    @property
    def objects(self) -> list:
        return self.grid.object_names


def _erasers(v: Variant, w: _Work, strengths: dict) -> tuple[dict, dict]:
    """block -> object -> the variant's eraser of that object (ablate or replace; none for the other methods), and
    (block of ``v.follow``, object) -> the function that replays there what that object's replace eraser detected."""
    from saeuron_core.erasure.eraser import ConceptEraser

    erasers: dict[str, dict[str, ConceptEraser]] = {}
    followers: dict[tuple[str, str], Callable] = {}
    if v.method in ("replace", "ablate"):
        for hp, sae in w.saes.items():
            if v.method == "ablate":
                erasers[hp] = {c: ConceptEraser(sae, {c: strengths.get(c, 5.0)}, "ablate") for c in w.objects}
            else:
                erasers[hp] = {c: ConceptEraser(sae, [c], "replace", record_masks=True, **v.options)
                               for c in w.objects}
            also_at = [point for point, src in v.follow.items() if src == hp] if v.method == "replace" else []
            for c, e in erasers[hp].items():
                (_, own, _), *later = e.mounts(also_at, hook_point=hp)
                assert own is e  # no mask: the block's function is the eraser itself, called by _erase
                followers.update({(point, c): fn for point, fn, _ in later})
    return erasers, followers


class _VariantRun:
    """One variant's hooks and what they measure, per block and step."""

    def __init__(self, v: Variant, w: _Work, erasers: tuple[dict, dict], ref: dict) -> None:
        self.v, self.w, self.ref = v, w, ref
        self.erasers, self.followers = erasers
        self.cover, self.spill, self.present, self.step_of = Acc(), Acc(), Acc(), {}
        self.before: dict[str, Moments] = {}
        self.after: dict[str, Moments] = {}
        self.state: dict[str, Any] = {"rows": None}

    def hook(self, hp: str, follower_of: Optional[str] = None) -> Callable:
        return lambda call: self._call(hp, follower_of, call)

    def _call(self, hp: str, follower_of: Optional[str], call: Any) -> Optional[Tensor]:
        from saeuron_core.hosts.hooks import BlockCall

        t = float(call.timesteps[0])
        step = self.step_of.setdefault(t, len(self.step_of))
        tokens, cond = call.tokens, call.is_cond
        out = tokens.clone()
        if self.v.method == "none" and hp in self.w.saes:  # reference statistics of clean maps
            self.ref.setdefault((hp, step), Moments()).add(tokens[cond])
        if self.v.method == "oracle":
            if hp in self.v.oracle_blocks:
                ci, ui = cond.nonzero().squeeze(1), (~cond).nonzero().squeeze(1)
                out[ci] = tokens[ui]
                return out
            return None
        changed = False
        for c, name in enumerate(self.w.objects):
            rows = (self.state["obj"] == c).nonzero().squeeze(1)
            if not len(rows):
                continue
            sub = BlockCall(tokens[rows], call.spatial, call.timesteps[rows], cond[rows], call.call_index)
            self._presence(hp, step, name, sub, cond[rows])
            if follower_of is not None:  # replaces where the eraser of follower_of detected the object at this step
                follower = self.followers.get((hp, name))
                new = follower(sub) if follower is not None else None
            elif hp in self.erasers:
                new = self._erase(hp, step, name, sub, rows, cond[rows], call.spatial)
            else:
                new = None
            if new is not None:
                out[rows] = new
                changed = True
        return out if changed else None

    def _presence(self, hp: str, step: int, name: str, sub: Any, crow: Tensor) -> None:
        """The share of the map where the object's features fire before the edit (its own detector, no edit)."""
        if hp == WATCH_BLOCK:
            d = self.w.watch[name]
        elif hp in self.w.detectors:
            d = self.w.detectors[hp][name]
        else:
            return
        m = d.detection_mask(sub)
        self.present.add((hp, step), float(m[crow].float().sum()), float(m[crow].numel()))

    def _erase(self, hp: str, step: int, name: str, sub: Any, rows: Tensor, crow: Tensor,
               spatial: tuple) -> Optional[Tensor]:
        """The variant's eraser on the object's rows, with the mask's coverage and the token shift it makes."""
        e = self.erasers[hp][name]
        before_n = len(e.masks)
        new = e(sub)
        device = sub.tokens.device
        if self.v.method == "replace" and len(e.masks) > before_n:
            mk = e.masks[-1].mask.reshape(len(rows), -1)
            fp = self.state["fp"][rows.cpu() % self.state["half"]] if self.state["fp"] is not None else None
            if fp is not None:
                g = on_grid(fp, *spatial).reshape(len(rows), -1)
                mc, gc = mk[crow.cpu()], g[crow.cpu()]
                self.cover.add((hp, step), float((mc & gc).sum()), float(gc.sum()))
                self.spill.add((hp, step), float((mc & ~gc).sum()), float((~gc).sum()))
            msk = mk.to(device) & crow[:, None].to(device)
            self.before.setdefault(hp, Moments()).add(sub.tokens[msk])
            if new is not None:
                self.after.setdefault(hp, Moments()).add(new[msk])
        elif self.v.method == "ablate" and new is not None:
            diff = (new != sub.tokens).any(-1) & crow[:, None].to(device)
            self.before.setdefault(hp, Moments()).add(sub.tokens[diff])
            self.after.setdefault(hp, Moments()).add(new[diff])
        return new

    def generate(self, clean_fp: Optional[Tensor]) -> Tensor:
        """Every (prompt, seed) of the work list, 64 at a time, with the variant's hooks on; the images."""
        from saeuron_core.hosts.diffusers import generate
        from saeuron_core.hosts.hooks import pipeline_hook

        from ..dataset import from_model_range

        w, v = self.w, self.v
        images = []
        blocks = set(w.saes) | {WATCH_BLOCK} | set(v.follow) | set(v.oracle_blocks)
        with torch.no_grad():
            hooks = [pipeline_hook(w.pipe, hp, self.hook(hp, v.follow.get(hp))) for hp in sorted(blocks)]
            for hk in hooks:
                hk.__enter__()
            try:
                for begin in range(0, len(w.work), 64):
                    chunk = w.work[begin:begin + 64]
                    objs = torch.tensor([int(w.grid.objects[i]) for i, _ in chunk])
                    self.state["obj"] = torch.cat([objs, objs])  # uncond rows, then cond rows (diffusers)
                    self.state["half"] = len(chunk)
                    self.state["fp"] = clean_fp[begin:begin + len(chunk)] if clean_fp is not None else None
                    self.step_of.clear()
                    out = generate(w.pipe, [w.grid.prompts[i] for i, _ in chunk], [s for _, s in chunk],
                                   steps=w.steps, guidance_scale=w.guidance, output_type="latent")
                    images.append(from_model_range(out.images.float().cpu()))
            finally:
                for hk in reversed(hooks):
                    hk.__exit__(None, None, None)
        return torch.cat(images)

    def row(self, imgs: Tensor, classifier: Any, t0: float) -> dict:
        """The variant's result: UA, CRA and retained confidence, and the per block and step measurements."""
        from ..classifier import predict_proba

        w = self.w
        lo = torch.tensor([int(w.grid.objects[i]) for i, _ in w.work])
        ls = torch.tensor([int(w.grid.styles[i]) for i, _ in w.work])
        po, ps = predict_proba(classifier, imgs)
        row = {"variant": self.v.name, "UA": float((po.argmax(1) != lo).float().mean()),
               "CRA": float((ps.argmax(1) == ls).float().mean()),
               "retained": float(ps.gather(1, ls[:, None]).mean()), "seconds": time.perf_counter() - t0,
               "cover": {}, "spill": {}, "present": {}, "shift": {}}
        for (hp, step) in sorted(set(self.cover.sums) | set(self.present.sums)):
            row["cover"].setdefault(hp, {})[step] = self.cover.get((hp, step))
            row["spill"].setdefault(hp, {})[step] = self.spill.get((hp, step))
            row["present"].setdefault(hp, {})[step] = self.present.get((hp, step))
        for hp in w.saes:
            r = _pooled_reference(self.ref, hp)
            if hp in self.before:
                row["shift"][hp] = {"detected": shift(self.before[hp], r),
                                    "written": shift(self.after.get(hp, Moments()), r), "count": self.before[hp].n}
        return row


def _pooled_reference(ref: dict, hp: str) -> Moments:
    """The clean run's token moments at block ``hp``, over every step."""
    r = Moments()
    for (b, _), mo in ref.items():
        if b == hp and mo.n:
            r.n += mo.n
            r.norm += mo.norm
            r.s = mo.s.clone() if r.s is None else r.s + mo.s
            r.sq = mo.sq.clone() if r.sq is None else r.sq + mo.sq
    return r


def run_diagnosis(pipe: Any, classifier: Any, saes: dict, watch_sae: Any, variants: list, seeds: list,
                  strengths: dict, steps: int = 20, guidance: float = 3.0,
                  log: Callable[[str], None] = print) -> list[dict]:
    """One row per variant (see the module's description); the ``none`` variant, run first, is the reference."""
    from saeuron_core.erasure.eraser import ConceptEraser
    from saeuron_core.hosts.diffusers import set_scheduler

    from .grid import demo_grid

    grid = demo_grid()
    objects = grid.object_names
    set_scheduler(pipe, "ddim")
    w = _Work(pipe=pipe, saes=saes, grid=grid, work=[(i, s) for i in range(len(grid.prompts)) for s in seeds],
              detectors={hp: {c: ConceptEraser(sae, [c], "replace") for c in objects} for hp, sae in saes.items()},
              watch={c: ConceptEraser(watch_sae, [c], "replace") for c in objects}, steps=steps, guidance=guidance)
    results, clean_fp, ref = [], None, {}
    for v in variants:
        t0 = time.perf_counter()
        run = _VariantRun(v, w, _erasers(v, w, strengths), ref)
        imgs = run.generate(clean_fp)
        if v.method == "none":
            clean_fp = footprints(imgs)
        row = run.row(imgs, classifier, t0)
        log(f"{v.name}: UA {100 * row['UA']:.1f} CRA {100 * row['CRA']:.1f} retained {100 * row['retained']:.1f} "
            f"({row['seconds']:.0f} s)")
        results.append(row)
    return results


def format_diagnosis(results: list, groups=((0, 5), (5, 10), (10, 15), (15, 20))) -> str:
    lines = ["| variant | UA | CRA | retained conf. |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {100 * r['UA']:.1f} | {100 * r['CRA']:.1f} | {100 * r['retained']:.1f} |")

    def grp(d: dict, a: int, b: int) -> str:
        vals = [d[s] for s in range(a, b) if s in d and not math.isnan(d[s])]
        return f"{100 * sum(vals) / len(vals):.0f}" if vals else "-"

    head = " | ".join(f"steps {a + 1}-{b}" for a, b in groups)
    for key, what in (("cover", "share of the object's footprint the mask covers"),
                      ("spill", "share of the background the mask flags"),
                      ("present", "share of the map where the object's features fire before the edit")):
        lines += ["", f"{what} (%):", "", f"| variant | block | {head} |", "|---|---|" + "---|" * len(groups)]
        for r in results:
            for hp, d in r[key].items():
                if d and any(not math.isnan(x) for x in d.values()):
                    lines.append(f"| {r['variant']} | {hp} | " + " | ".join(grp(d, a, b) for a, b in groups) + " |")
    lines += ["", "token shift against clean maps (detected before the edit -> written; norm ratio):", "",
              "| variant | block | detected shift / norm | written shift / norm | tokens |", "|---|---|---|---|---|"]
    for r in results:
        for hp, s in r["shift"].items():
            lines.append(f"| {r['variant']} | {hp} | {s['detected'][0]:.2f} / {s['detected'][1]:.2f} | "
                         f"{s['written'][0]:.2f} / {s['written'][1]:.2f} | {s['count']} |")
    return "\n".join(lines)
