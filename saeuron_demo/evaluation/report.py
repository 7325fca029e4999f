"""A report as JSON (``saeuron eval --json``): saving, loading, and updating it with re-measured
concepts (``--update``) under the settings it was measured with."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import fields
from typing import Any, Collection, Mapping, Sequence

from saeuron_core.erasure.options import EraseOptions
from saeuron_core.errors import ConfigError

from ..asset_files import read_json
from .scoring import summary_by_kind
from .settings import REPLACE_OPTIONS, EvalSettings

#: :data:`REPLACE_OPTIONS` that a report names ``replace_<option>`` (alone, ``strength`` would read as ablation's and
#: ``source`` as the prompt's); the others keep their :class:`EraseOptions` names
PREFIXED = ("strength", "source")
#: a report's ``settings`` keys, in the order reports hold them (a setting added later follows them)
SETTINGS_ORDER = ("seeds", "steps", "guidance", "scheduler", "ablate_strength", "ablate_strength_at",
                  "ablate_strength_of", "replace_strength", "threshold_scale", "min_coverage", "min_coverage_of",
                  "detect_with", "dilation", "replace_source", "neighbors", "replace_also_at", "start", "end",
                  "batch_size")


def report_name(option: str) -> str:
    """The report's name of the replace option ``option`` (an :class:`EraseOptions` field)."""
    return f"replace_{option}" if option in PREFIXED else option


# Settings that hold one value per concept: an update may change them for the concepts it re-measures.
PER_CONCEPT_SETTINGS = ("ablate_strength_of", "min_coverage_of", "detect_with")
# Settings that only detect-and-replace reads: a report may take new ones when every replace row is re-measured.
REPLACE_SETTINGS = (*map(report_name, REPLACE_OPTIONS), "replace_also_at")


def load_report(path: str) -> dict[str, Any]:
    """Read a report written by :func:`save_report` (clear errors for a missing or foreign file)."""
    if not os.path.exists(path):
        raise ConfigError(f"no evaluation report at {path}")
    report = read_json(path)
    if not isinstance(report, dict) or not {"settings", "grid", "clean_accuracy", "per_concept", "summary"} <= set(report):
        raise ConfigError(f"{path} is not an evaluation report from 'saeuron eval --json'")
    return report


def save_report(report: dict[str, Any], path: str) -> None:
    """Write the report as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


def settings_json(settings: EvalSettings) -> dict[str, Any]:
    """``settings`` as a report holds them: flat, the replace options by :func:`report_name`, in
    :data:`SETTINGS_ORDER`, with JSON types (lists, not tuples)."""
    flat = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "replace"}
    flat.update({report_name(option): getattr(settings.replace, option) for option in REPLACE_OPTIONS})
    order = [k for k in SETTINGS_ORDER if k in flat] + [k for k in flat if k not in SETTINGS_ORDER]
    return json.loads(json.dumps({k: flat[k] for k in order}))


def settings_from_json(saved: Mapping[str, Any]) -> EvalSettings:
    """The :class:`EvalSettings` of a report's ``settings`` (:func:`settings_json` read back; a setting the report
    lacks takes its default)."""
    options = {report_name(option): option for option in REPLACE_OPTIONS}
    replace = EraseOptions(method="replace", **{options[k]: v for k, v in saved.items() if k in options})
    return EvalSettings(**{k: copy.deepcopy(v) for k, v in saved.items() if k not in options}, replace=replace)


def _check_same(key: str, old: Any, new: Any) -> None:
    if old != new:
        raise ConfigError(f"cannot update the report: its {key.replace('_', ' ')} differ from this run's "
                          f"({old} against {new}); run the whole evaluation instead")


def _refuse_set_runs(has_set_runs: bool) -> None:
    if has_set_runs:
        raise ConfigError("cannot update a report with several-at-once or generalisation runs (only per-concept rows "
                          "merge): add --multi '' --generalization ''")


def _without(settings: dict[str, Any], concepts: Collection[str]) -> dict[str, Any]:
    """``settings`` with the per-concept entries of ``concepts`` left out."""
    out = dict(settings)
    for key in PER_CONCEPT_SETTINGS:
        out[key] = {c: v for c, v in (out.get(key) or {}).items() if c not in concepts}
    return out


def _changed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-concept settings that differ between two reports' settings: ``{key: {concept: new value}}``."""
    out = {}
    for key in PER_CONCEPT_SETTINGS:
        a, b = old.get(key) or {}, new.get(key) or {}
        diff = {c: b.get(c) for c in sorted(set(a) | set(b)) if a.get(c) != b.get(c)}
        if diff:
            out[key] = diff
    return out


def _with_defaults(report: dict[str, Any]) -> dict[str, Any]:
    """The report's settings; those added after it was written count as their defaults."""
    return {**settings_json(EvalSettings()), **(report.get("settings") or {})}


def _check_settings(report: dict[str, Any], settings: dict[str, Any], concepts: Collection[str],
                    whole: Collection[str] = ()) -> None:
    """Refuse ``settings`` that differ from ``report``'s other than in ``concepts``' own entries (and, when every
    replace row is re-measured, ``"replace"`` in ``whole``, the replace method's own settings)."""
    ignored = REPLACE_SETTINGS if "replace" in whole else ()
    old = {k: v for k, v in _without(_with_defaults(report), concepts).items() if k not in ignored}
    new = {k: v for k, v in _without(settings, concepts).items() if k not in ignored}
    _check_same("settings", old, new)


def _whole_methods(report: dict[str, Any], methods: Collection[str], concepts: Collection[str]) -> list[str]:
    """The SAE ``methods`` whose every per-concept row of ``report`` is among the re-measured ``concepts``."""
    return [m for m in methods if m not in ("none", "negative_prompt") and m in report.get("per_concept", {})
            and {r["concept"] for r in report["per_concept"][m]} <= set(concepts)]


def check_updatable(report: dict[str, Any], settings: EvalSettings, *, set_runs: bool = False,
                    concepts: Sequence[str] = (), methods: Sequence[str] = (), multi: bool = False,
                    node_defaults: bool = True) -> None:
    """Fail before generating anything when an update of ``report`` would be refused (other settings,
    ``set_runs``: several-at-once or generalisation runs asked for, or the report's node-default rows left
    stale: ``node_defaults`` off).

    Only the re-measured ``concepts`` may have their own strength, gate or detector changed. When every row
    of a method is re-measured (``methods``), its several-at-once runs may be too (``multi``), and for
    ``replace`` its own settings (source, dilation, ...) may change.
    """
    whole = _whole_methods(report, methods, concepts)
    sae_methods = [m for m in methods if m not in ("none", "negative_prompt")]
    if multi and not (sae_methods and set(sae_methods) <= set(whole) and report.get("multi")):
        _refuse_set_runs(True)
    _refuse_set_runs(set_runs)
    _refuse_stale_defaults(report, methods, methods if node_defaults else ())
    _check_settings(report, settings_json(settings), concepts, whole)


def _check_mergeable(old: dict[str, Any], new: dict[str, Any], whole: Collection[str]) -> None:
    """Refuse merging ``new`` into ``old`` unless it reproduces ``old``'s clean run on the same blocks and its
    several-at-once runs replace whole methods' runs of the same sizes."""
    for key in ("grid", "clean_accuracy"):
        _check_same(key, old.get(key), new.get(key))
    if "clean_misread" in old and "clean_misread" in new:
        _check_same("clean_misread", old["clean_misread"], new["clean_misread"])
    blocks = [[(e["hook_point"], e["ablate_strength"]) for e in r.get("saes", [])] for r in (old, new)]
    if blocks[0] != blocks[1]:
        raise ConfigError(f"cannot update the report: its SAE blocks {blocks[0]} differ from this run's {blocks[1]}")
    _refuse_set_runs(bool(new.get("generalization")))
    for method in new.get("multi") or {}:
        sizes = [[r["n"] for r in runs.get(method, [])] for runs in (old.get("multi") or {}, new.get("multi") or {})]
        if method not in whole or sizes[0] != sizes[1]:
            _refuse_set_runs(True)
    missing = [m for m in new["per_concept"] if m not in old["per_concept"]]
    if missing:
        raise ConfigError(f"cannot update the report: it has no {', '.join(missing)} rows to update")


def _update_entry(old: dict[str, Any], new: dict[str, Any], concepts: list[str], whole: Collection[str]) -> dict[str, Any]:
    """The ``updates`` entry of a merge: what was re-measured, in how long, and the settings it changed."""
    entry: dict[str, Any] = {"concepts": concepts, "methods": list(new["per_concept"]), "seconds": new["seconds"]}
    changed = _changed(_with_defaults(old), new["settings"])
    if changed:
        entry["changed"] = changed
    replaced = {k: new["settings"].get(k) for k in REPLACE_SETTINGS
                if "replace" in whole and _with_defaults(old).get(k) != new["settings"].get(k)}
    if replaced:
        entry.setdefault("changed", {})["replace"] = replaced
    if new.get("multi"):
        entry["multi"] = list(new["multi"])
    return entry


def _refuse_stale_defaults(report: dict[str, Any], methods: Sequence[str], measured: Sequence[str]) -> None:
    """Refuse an update that re-measures ``methods`` but not their rows with the node's defaults (``measured``)."""
    stale = [m for m in (report.get("defaults") or {}).get("per_concept", {}) if m in methods and m not in measured]
    if stale:
        raise ConfigError(f"cannot update the report: its rows with the node's defaults ({', '.join(stale)}) would "
                          f"go stale; re-measure them too (leave out --no-defaults)")


def _merge_rows(out: dict[str, Any], new: dict[str, Any], order: Sequence[str]) -> None:
    """Put ``new``'s per-concept rows into ``out`` (in the grid's order) and recompute ``out``'s summaries."""
    for method, rows in new["per_concept"].items():
        merged = {r["concept"]: r for r in out["per_concept"].get(method, [])}
        merged.update({r["concept"]: r for r in rows})
        out["per_concept"][method] = sorted(merged.values(), key=lambda r: order.index(r["concept"]))
        out["summary"][method] = summary_by_kind(out["per_concept"][method])


def update_report(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the per-concept rows that ``new`` re-measured, and its summaries recomputed.

    For re-evaluating only the concepts whose library or own settings (strength, gate, detector)
    changed: ``new`` must come from the same settings otherwise, grid and SAE blocks, and reproduce
    ``old``'s clean accuracy (the same model and seeds; generation is deterministic), and must not
    hold generalisation runs, which cannot be merged row by row. A method whose every row ``new``
    re-measures is replaced whole: its several-at-once runs too (``new`` must then hold them, with the
    same set sizes), and for ``replace`` its own settings may differ. The merged report takes ``new``'s
    settings, and its ``updates`` entry records the per-concept ones changed.
    """
    remeasured = {r["concept"] for rows in new["per_concept"].values() for r in rows}
    whole = [m for m in _whole_methods(old, list(new["per_concept"]), remeasured)
             if {r["concept"] for r in old["per_concept"][m]} <= {r["concept"] for r in new["per_concept"][m]}]
    _check_settings(old, new.get("settings") or {}, remeasured, whole)
    _check_mergeable(old, new, whole)
    new_multi = new.get("multi") or {}
    order = old["grid"]["objects"] + old["grid"]["styles"]
    concepts = sorted(remeasured, key=order.index)
    # Rows measured over every concept at once would go stale without a word.
    in_sets = sorted({c for method, rows in (old.get("multi") or {}).items()
                      if method in new["per_concept"] and method not in new_multi
                      for r in rows for c in r["concepts"]} & set(concepts), key=order.index)
    if in_sets or (old.get("generalization") and concepts):
        raise ConfigError("cannot update the report: its " + (f"several-at-once runs erase {', '.join(in_sets)}"
                          if in_sets else "generalisation summary covers every concept")
                          + "; run the whole evaluation instead")
    _refuse_stale_defaults(old, list(new["per_concept"]), list((new.get("defaults") or {}).get("per_concept", {})))
    out = copy.deepcopy(old)
    out["settings"] = copy.deepcopy(new["settings"])
    _merge_rows(out, new, order)
    if old.get("defaults"):
        _merge_rows(out["defaults"], new["defaults"], order)
    for method, runs in new_multi.items():
        out["multi"][method] = copy.deepcopy(runs)
    out["updates"] = [*old.get("updates", []), _update_entry(old, new, concepts, whole)]
    return out
