"""A report as Markdown (what ``saeuron eval`` prints and ``--markdown`` writes)."""

from __future__ import annotations

import math
from typing import Any, Optional


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


INTERVALS_NOTE = ("In brackets: 95% intervals over the images (Wilson's for the shares, a bootstrap for the mean "
                  "confidence). A target counts as met when the measured value reaches it; the interval shows how "
                  "firm that is.")


def _ci(m: dict[str, Any], key: str, digits: int = 1) -> str:
    """A percentage with its 95% interval where the row has one: ``95.3 (93.4–96.7)``."""
    bounds = (m.get("interval") or {}).get(key)
    if not bounds or any(b is None or math.isnan(b) for b in bounds):
        return _pct(m.get(key))
    return f"{_pct(m.get(key))} ({100 * bounds[0]:.{digits}f}–{100 * bounds[1]:.{digits}f})"


def _summary_table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = ["| method | kind | UA | IRA | CRA | retained conf. | act. shift |", "|---|---|---|---|---|---|---|"]
    for method, by_kind in summary.items():
        for kind, m in by_kind.items():
            lines.append(f"| {method} | {kind} | {_ci(m, 'UA')} | {_ci(m, 'IRA')} | {_ci(m, 'CRA')} | "
                         f"{_ci(m, 'retained_confidence')} | {m['activation_shift']:.2f} |")
    return lines


def _counts(counts: dict[str, int], top: int = 3) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:top])
    rest = sum(list(counts.values())[top:])
    return (shown + (f", {rest} other" if rest else "")) or "none"


def _misread_lines(report: dict[str, Any], per: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The in-domain misreadings behind each IRA (reports from before they were counted have none)."""
    clean = report.get("clean_misread")
    if not clean and not any("misread" in r for rows in per.values() for r in rows):
        return []
    lines = ["", "Misread images of the other concepts of the erased one's kind (what IRA lost; most frequent "
                 "first, true label as read label):", ""]
    if clean:
        lines.append("- clean run, whole grid: objects " + _counts(clean["object"]) + "; styles "
                     + _counts(clean["style"]))
    for method, rows in per.items():
        cells = [f"{r['concept']}: {_counts(r['misread'])}" for r in rows if "misread" in r]
        if cells:
            lines.append(f"- {method}: " + "; ".join(cells))
    return lines


def _settings_lines(report: dict[str, Any], per_sae: bool) -> list[str]:
    """What the report's settings were: generation, replace, window, gates, strengths."""
    s = report["settings"]
    # the common strength is only worth a mention when no per-SAE line below gives the ones used
    common = "" if per_sae else f"ablate strength {s['ablate_strength']}, "
    lines = [f"Seeds {s['seeds']}, {s['steps']} {s['scheduler']} steps, CFG {s['guidance']}, {common}replace strength "
             f"{s['replace_strength']} (source {s.get('replace_source')}, dilation {s.get('dilation')}, "
             f"threshold x{s.get('threshold_scale')}"
             + "".join(f", also replaced at {', '.join(v)} from {k}" for k, v in (s.get("replace_also_at") or {}).items())
             + "); clean accuracy object "
             f"{_pct(report['clean_accuracy']['object'])}% / style {_pct(report['clean_accuracy']['style'])}%.", ""]
    if (s.get("start", 0.0), s.get("end", 1.0)) != (0.0, 1.0):
        lines += [f"The SAE methods act from {s['start']:g} to {s['end']:g} of the denoising.", ""]
    if s.get("min_coverage") or s.get("min_coverage_of"):
        of, by = s.get("min_coverage_of", {}), s.get("detect_with", {})
        gates = ([f"{100 * s['min_coverage']:g}% for every other concept"] if s.get("min_coverage") else []) + [
            f"{c} {100 * of.get(c, s['min_coverage']):g}%" + (f" (read by {by[c]!r})" if c in by else "")
            for c in dict.fromkeys([*of, *by])]
        lines += ["The SAE methods touch a concept only in images where its features fire on at least this share of "
                  "the feature map (min_coverage): " + ", ".join(gates) + ".", ""]
    if s.get("ablate_strength_of"):
        lines += ["Ablation strength per concept (chosen on validation): " + ", ".join(
            f"{c} {v:g}" for c, v in s["ablate_strength_of"].items()) + ".", ""]
    if per_sae:
        lines += ["SAEs: " + "; ".join(f"{e['hook_point']} for {', '.join(e['concepts']) or 'nothing'} (ablate "
                                       f"strength {e['ablate_strength']:g})" for e in report["saes"]) + ".", ""]
    return lines


def _defaults_lines(report: dict[str, Any]) -> list[str]:
    """What a user gets: each SAE method with the Concept Eraser node's defaults, where the report has them."""
    defaults = report.get("defaults")
    if not defaults:
        return []
    s = defaults["settings"]
    return ["", f"With the Concept Eraser node's defaults (what a user gets without tuning: strength "
                f"{s['ablate_strength']:g} for every concept, replace strength {s['replace_strength']:g}, no gate, "
                f"the SAE's own block only):", ""] + _summary_table(defaults["summary"])


def _per_concept_lines(report: dict[str, Any]) -> list[str]:
    """The UA / IRA / CRA of each concept under each method but ``none``, and what IRA lost."""
    per = {m: rows for m, rows in report.get("per_concept", {}).items() if m != "none"}
    if not per:
        return []
    methods = list(per)
    lines = ["", "Per concept (UA / IRA / CRA):", "",
             "| concept | kind | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for i, row in enumerate(next(iter(per.values()))):
        cells = [" / ".join(_ci(per[m][i], key, 0) for key in ("UA", "IRA", "CRA")) for m in methods]
        lines.append(f"| {row['concept']} | {row['kind']} | " + " | ".join(cells) + " |")
    return lines + _misread_lines(report, per)


def _set_run_lines(report: dict[str, Any]) -> list[str]:
    """The several-at-once runs and the generalisation summary, where the report has them."""
    lines: list[str] = []
    if report.get("multi"):
        lines += ["", "Several concepts at once (half objects, half styles):", "",
                  "| method | n | concepts | UA | retain object | retain style |", "|---|---|---|---|---|---|"]
        for method, rows in report["multi"].items():
            for r in rows:
                lines.append(f"| {method} | {r['n']} | {', '.join(r['concepts'])} | {_ci(r, 'UA')} | "
                             f"{_ci(r, 'RA_object')} | {_ci(r, 'RA_style')} |")
    g = report.get("generalization")
    if g:
        lines += ["", f"Generalisation: {g['steps']} {g['scheduler']} steps (concepts learned with another sampler); "
                      f"clean accuracy object {_pct(g['clean_accuracy']['object'])}% / style "
                      f"{_pct(g['clean_accuracy']['style'])}%.", ""]
        lines += _summary_table(g["summary"])
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a report from :func:`~saeuron_demo.evaluation.evaluate`."""
    per_sae = len(report.get("saes", [])) > 1 or bool(report["settings"].get("ablate_strength_at"))
    lines = _settings_lines(report, per_sae) + _summary_table(report["summary"])
    if any("interval" in m for by_kind in report["summary"].values() for m in by_kind.values()):
        lines += ["", INTERVALS_NOTE]
    lines += _defaults_lines(report) + _per_concept_lines(report) + _set_run_lines(report)
    lines += ["", f"Evaluation time: {report['seconds']:.0f} s."]
    for u in report.get("updates", []):
        changed = "; ".join(f"{key.replace('_', ' ')} " + ", ".join(f"{c} {v}" for c, v in vals.items())
                            for key, vals in u.get("changed", {}).items())
        lines.append(f"Re-measured by an update: {', '.join(u['methods'])} rows of {', '.join(u['concepts'])} "
                     f"({u['seconds']:.0f} s)" + (f", with {changed}" if changed else "") + ".")
    return "\n".join(lines)
