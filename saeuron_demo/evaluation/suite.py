"""The full mini-UnlearnCanvas evaluation (``saeuron eval``): every method on every concept alone, on
several at once, and with another sampler, as one JSON-ready report."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from saeuron_core.errors import ConfigError

from .evaluator import SAEs, Evaluator
from .checkpoint import Checkpoint, NoCheckpoint, sae_fingerprint
from .generation import RunOutput
from .report import settings_json
from .scoring import summary_by_kind
from .settings import METHODS, SAE_METHODS, EvalSettings


def _concepts(ev: Evaluator, concepts: Optional[Sequence[str]], sae_methods: Sequence[str]) -> list[str]:
    """The concepts to evaluate (default: the whole grid), each of the grid and, for SAE methods, of a library."""
    grid = ev.grid
    chosen = list(concepts) if concepts else grid.object_names + grid.style_names
    for c in chosen:
        grid.kind_of(c)
    lacking = [c for c in chosen if c in ev.missing]
    if sae_methods and lacking:
        raise ConfigError(f"no SAE's concept library has {', '.join(map(repr, lacking))}; learn them first "
                          f"(saeuron learn-concept) or evaluate other concepts")
    return chosen


class _Clean:
    """A run with nothing erased, generated the first time a part needs it; on a resumed run it must read as the
    checkpoint's (generation is deterministic: another reading means another model, SAE or library build)."""

    def __init__(self, ev: Evaluator, ckpt: Checkpoint, key: str, **run_options: Any) -> None:
        self.ev, self.ckpt, self.key, self.options = ev, ckpt, key, run_options
        self._run: Optional[RunOutput] = None

    def __call__(self) -> RunOutput:
        if self._run is None:
            self._run = self.ev.run("none", **self.options)
            kept = self.ckpt.parts.get(self.key)
            if kept is not None and kept["value"]["accuracy"] != self.ev.accuracy(self._run):
                raise ConfigError(f"this run's clean images read {self.ev.accuracy(self._run)}, the checkpoint's "
                                  f"{kept['value']['accuracy']}: it was made with another model, classifier or "
                                  f"torch build; give another --checkpoint file")
        return self._run


def _rows(ev: Evaluator, ckpt: Checkpoint, prefix: str, method: str, concepts: Sequence[str], clean: _Clean,
          **options: Any) -> list[dict[str, Any]]:
    """Each concept's row of ``method``, one checkpointed part each (``<prefix><method>/<concept>``)."""
    return [ckpt.part(f"{prefix}{method}/{c}", lambda c=c: ev.per_concept(method, [c], clean(), **options)[0])
            for c in concepts]


def _clean_part(ev: Evaluator, settings: EvalSettings, concepts: Sequence[str], clean: _Clean,
                ckpt: Checkpoint, misread_dir: Optional[str]) -> dict[str, Any]:
    """The report's head: settings, SAEs, grid and the clean run's accuracy and misreadings."""

    def measure() -> dict[str, Any]:
        if misread_dir:
            ev.save_misread_sheet(clean(), os.path.join(misread_dir, "none.png"))
        return {"accuracy": ev.accuracy(clean()), "misread": ev.clean_misreads(clean())}

    head = ckpt.part("clean", measure)
    saes = [{"hook_point": hp, "concepts": [c for c in concepts if i in ev.owners.get(c, [])],
             "ablate_strength": ev.ablate_strength(i)} for i, hp in enumerate(ev.hook_points)]
    return {"settings": settings_json(settings), "saes": saes,
            "grid": {"objects": ev.grid.object_names, "styles": ev.grid.style_names},
            "clean_accuracy": head["accuracy"], "clean_misread": head["misread"], "per_concept": {}, "summary": {}}


def _multi_runs(ev: Evaluator, ckpt: Checkpoint, methods: Sequence[str], concepts: Sequence[str],
                sizes: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Per method but ``none``, one run per set size ``n``: the first ``n // 2`` objects and ``n - n // 2``
    styles erased at once (sizes the concepts cannot fill are left out)."""
    objs = [c for c in concepts if c in ev.grid.object_names]
    stys = [c for c in concepts if c in ev.grid.style_names]
    out = {}
    for method in [m for m in methods if m != "none"]:
        rows = []
        for n in sizes:
            chosen = objs[:n // 2] + stys[:n - n // 2]
            if len(chosen) < n:
                continue
            rows.append(ckpt.part(f"multi/{method}/{n}", lambda m=method, chosen=chosen, n=n: {
                "n": n, "concepts": chosen, **ev.multi_metrics(ev.run(m, chosen), chosen)}))
        out[method] = rows
    return out


def _generalization(ev: Evaluator, ckpt: Checkpoint, sae_methods: Sequence[str], concepts: Sequence[str],
                    scheduler: str, steps: int) -> dict[str, Any]:
    """Clean accuracy and per-kind summary of each SAE method with another scheduler and step count."""
    prefix = f"generalization/{scheduler}:{steps}/"
    clean = _Clean(ev, ckpt, prefix + "clean", scheduler=scheduler, steps=steps)
    head = ckpt.part(prefix + "clean", lambda: {"accuracy": ev.accuracy(clean())})
    out: dict[str, Any] = {"scheduler": scheduler, "steps": steps, "clean_accuracy": head["accuracy"], "summary": {}}
    for method in sae_methods:
        rows = _rows(ev, ckpt, prefix, method, concepts, clean, scheduler=scheduler, steps=steps)
        out["summary"][method] = summary_by_kind(rows)
    return out


def _node_defaults(ev: Evaluator, ckpt: Checkpoint, sae_methods: Sequence[str], concepts: Sequence[str],
                   clean: _Clean) -> dict[str, Any]:
    """Each SAE method with the Concept Eraser node's defaults (what a user gets without tuning), on the same
    clean run."""
    user = Evaluator(ev.pipe, ev.saes, ev.classifier, ev.settings.node_defaults(), grid=ev.grid,
                     progress=ev.progress)
    out: dict[str, Any] = {"settings": settings_json(user.settings), "per_concept": {}, "summary": {}}
    for method in sae_methods:
        rows = _rows(user, ckpt, "defaults/", method, concepts, clean)
        out["per_concept"][method] = rows
        out["summary"][method] = summary_by_kind(rows)
    return out


def _plan(ev: Evaluator, settings: EvalSettings, **run: Any) -> dict[str, Any]:
    """What makes two runs' parts the same measurement: settings, what is run, and the SAEs with their libraries."""
    return {"settings": settings_json(settings), **run,
            "saes": {hp: sae_fingerprint(s) for hp, s in zip(ev.hook_points, ev.saes)}}


def evaluate(pipe: Any, sae: SAEs, classifier: Any, settings: EvalSettings, *,
             methods: Sequence[str] = METHODS, concepts: Optional[Sequence[str]] = None,
             multi: Sequence[int] = (2, 4, 8), generalization: Optional[tuple[str, int]] = ("euler_a", 30),
             node_defaults: bool = True, progress: Optional[Callable[[str], None]] = None,
             misread_dir: Optional[str] = None, checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Full mini-UnlearnCanvas evaluation; returns a JSON-ready report.

    ``node_defaults``: also run each SAE method with the Concept Eraser node's defaults (report ``defaults``).

    ``misread_dir``: write there a sheet of the misread images of the clean run (``none.png``) and of
    each concept's erasure (``<method>-<concept>.png``: still read as the concept, then the other
    images of its kind read wrong), each with a ``.json`` list of prompt, seed and readings.

    ``checkpoint``: keep each finished part (a concept's row, a set run, ...) in this file
    (:class:`.checkpoint.Checkpoint`), and take the parts it already holds from it, so an interrupted run
    resumes. The report's ``seconds`` are those the parts took to compute, over all sessions.
    """
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
    ev = Evaluator(pipe, sae, classifier, settings, progress=progress)
    sae_methods = [m for m in methods if m in SAE_METHODS]
    concepts = _concepts(ev, concepts, sae_methods)
    plan = _plan(ev, settings, methods=list(methods), concepts=concepts, multi=list(multi),
                 generalization=list(generalization) if generalization and sae_methods else None,
                 node_defaults=bool(node_defaults and sae_methods))
    ckpt = Checkpoint(checkpoint, plan) if checkpoint else NoCheckpoint()
    if ckpt.parts:
        ev.progress(f"resuming from {checkpoint}: {len(ckpt.parts)} parts done ({ckpt.seconds():.0f}s)")
    clean = _Clean(ev, ckpt, "clean")
    report = _clean_part(ev, settings, concepts, clean, ckpt, misread_dir)
    for method in methods:
        rows = _rows(ev, ckpt, "", method, concepts, clean,
                     misread_dir=misread_dir if method != "none" else None)
        report["per_concept"][method] = rows
        report["summary"][method] = summary_by_kind(rows)
    if node_defaults and sae_methods:
        report["defaults"] = _node_defaults(ev, ckpt, sae_methods, concepts, clean)
    if multi:
        report["multi"] = _multi_runs(ev, ckpt, methods, concepts, multi)
    if generalization and sae_methods:
        report["generalization"] = _generalization(ev, ckpt, sae_methods, concepts, *generalization)
    report["seconds"] = ckpt.seconds()
    return report
