"""``saeuron eval``: mini-UnlearnCanvas, the UA/IRA/CRA of each erasure method on the demo model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from saeuron_core.errors import ConfigError
from saeuron_demo.assets import EVALUATION_SEEDS

from .common import add_gate_args, gate_args, load_model, parse_seeds
from .fields import Fields

if TYPE_CHECKING:
    from saeuron_demo.evaluation import EvalSettings
    from saeuron_core.erasure.options import EraseOptions

NAME = "eval"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its options."""
    ev = sub.add_parser(NAME, help="mini-UnlearnCanvas: UA/IRA/CRA of each erasure method on the demo model")
    ev.add_argument("--model", default=None, help="demo model folder (default: the shipped demo_assets/model)")
    ev.add_argument("--sae", action="append", default=None,
                    help="SAE with the concept library (default: the shipped demo SAEs); repeat it for SAEs on "
                         "other blocks: a concept is erased by every SAE whose library has it")
    ev.add_argument("--classifier", default=None, help="classifier folder (default: demo_assets/classifier)")
    ev.add_argument("--methods", default="none,negative_prompt,ablate,replace",
                    help="comma-separated: none, negative_prompt, ablate, replace")
    ev.add_argument("--concepts", default=None, help="comma-separated concepts (default: every object and style)")
    ev.add_argument("--seeds", type=parse_seeds, default=list(EVALUATION_SEEDS),
                    help="'0,1,2' or '0-9' (one image per prompt and seed; default: the evaluation seeds 1000-1007)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=3.0)
    ev.add_argument("--scheduler", default="ddim")
    ev.add_argument("--ablate-strength", type=float, default=None,
                    help="gamma = -strength, for every SAE (default: 10, or the strengths chosen for the shipped SAEs)")
    ev.add_argument("--ablate-strength-at", action="append", default=[], metavar="HOOK_POINT=STRENGTH",
                    help="ablation strength of the SAE on one block (repeatable)")
    ev.add_argument("--ablate-strengths", default=None, metavar="FILE",
                    help="JSON {concept: strength}: each concept's own ablation strength, over the block's (default: "
                         "the strengths chosen for the shipped concepts when the shipped SAEs are used; '' for none)")
    replace_fields().add_to(ev)
    ev.add_argument("--replace-also-at", action="append", default=None, metavar="HOOK_POINT=BLOCK[,BLOCK]",
                    help="replace: also replace what the SAE at HOOK_POINT detects at these later blocks "
                         "(repeatable; default: the shipped setting with the shipped SAEs; '' for none)")
    add_gate_args(ev)
    ev.add_argument("--gates", default=None, metavar="FILE",
                    help="JSON {concept: {\"min_coverage\": share, \"detect_with\": entry}} (default: the shipped "
                         "gates when the shipped SAEs are used; '' for none); --min-coverage-of and --detect-with "
                         "add to it")
    ev.add_argument("--window", default="0:1", help="START:END fractions of the denoising where the SAE methods act")
    ev.add_argument("--multi", default="2,4,8", help="sizes of concept sets erased at once ('' for none)")
    ev.add_argument("--generalization", default="euler_a:30",
                    help="SCHEDULER:STEPS to re-run the SAE methods with another sampler ('' for none)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--no-defaults", action="store_true",
                    help="leave out the runs of each SAE method with the Concept Eraser node's defaults")
    ev.add_argument("--quick", action="store_true",
                    help="smoke run: one seed, 8 steps, one object and one style, no multi/generalisation runs")
    ev.add_argument("--json", default=None, help="write the full report here")
    ev.add_argument("--update", default=None, metavar="REPORT",
                    help="re-measure only --concepts and merge their rows into this earlier --json report (same "
                         "settings; needs --multi '' --generalization ''); written back to it unless --json is given")
    ev.add_argument("--markdown", default=None, help="write the tables here")
    ev.add_argument("--checkpoint", default=None, metavar="FILE",
                    help="keep each finished part of the run in FILE (JSON lines); run the same command again after "
                         "a stop and it resumes, taking the finished parts from FILE (the full run takes hours on a CPU)")
    ev.add_argument("--misread-dir", default=None, metavar="DIR",
                    help="write sheets of the misread images here: the clean run's (none.png) and each erasure's "
                         "(<method>-<concept>.png: the concept still read, then its kind's other images read "
                         "wrong), each with a .json of prompts, seeds and readings")


def replace_fields() -> Fields[EraseOptions]:
    """The replace method's own :class:`EraseOptions` options, which the evaluation's ``replace`` holds
    (``--replace-strength``, ``--threshold-scale``, ``--dilation``, ``--replace-source``, ``--neighbors``)."""
    from saeuron_demo.evaluation import REPLACE_OPTIONS
    from saeuron_core.erasure.options import EraseOptions

    return Fields(EraseOptions, REPLACE_OPTIONS, flags={"strength": "--replace-strength", "source": "--replace-source"},
                  help={"strength": None, "source": "where replacement patches come from",
                        "neighbors": "--replace-source nearest: average this many nearest undetected patches"})


def replace_also_at_arg(items: Optional[list[str]], shipped: bool) -> dict[str, list[str]]:
    """``--replace-also-at`` values as ``{detecting hook point: [later blocks]}`` (the shipped setting by default)."""
    from saeuron_core.assignments import parse_assignments
    from saeuron_demo.evaluation import DEMO_REPLACE_ALSO_AT

    if items is None:
        return {k: list(v) for k, v in DEMO_REPLACE_ALSO_AT.items()} if shipped else {}
    pairs = parse_assignments([i for i in items if i.strip()], "--replace-also-at", "HOOK_POINT=BLOCK[,BLOCK]")
    return {k: [b.strip() for b in v.split(",") if b.strip()] for k, v in pairs.items()}


def run(a: argparse.Namespace) -> int:
    """Evaluate, print the tables and write the ``--json``/``--update`` report and ``--markdown`` tables."""
    from saeuron_demo import assets
    from saeuron_demo.classifier import load_classifier
    from saeuron_demo.evaluation import check_updatable, evaluate, format_report, load_report, save_report, update_report
    from saeuron_core.hosts.diffusers import set_scheduler
    from saeuron_core.sae.files import load_sae

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else None
    try:
        multi = [int(n) for n in a.multi.split(",") if n.strip()]
        start, end = (float(v) for v in a.window.split(":"))
        gen = None
        if a.generalization:
            sched, _, steps = a.generalization.partition(":")
            gen = (sched, int(steps or 30))
    except ValueError:
        raise ConfigError("--multi takes integers like '2,4,8'; --generalization SCHEDULER:STEPS like 'euler_a:30'; "
                          "--window START:END like '0:0.5'") from None
    settings = _settings(a, start, end)
    if a.quick:
        settings.seeds, settings.steps = settings.seeds[:1], 8
        concepts, multi, gen = concepts or ["star", "stripes"], [], None
    earlier = load_report(a.update) if a.update else None
    if earlier is not None:
        grid = earlier.get("grid") or {}  # without --concepts every concept is re-measured
        check_updatable(earlier, settings, set_runs=bool(gen), multi=bool(multi), methods=methods,
                        concepts=concepts or grid.get("objects", []) + grid.get("styles", []),
                        node_defaults=not a.no_defaults)
    saes = [load_sae(path) for path in a.sae] if a.sae else [load_sae(_demo_asset(None, name)) for name in assets.SAES]
    classifier = load_classifier(_demo_asset(a.classifier, "classifier"))
    pipe = load_model(_demo_asset(a.model, "model"))
    set_scheduler(pipe, settings.scheduler)  # unknown names fail before anything is generated
    if gen:
        set_scheduler(pipe, gen[0])
    report = evaluate(pipe, saes, classifier, settings, methods=methods, concepts=concepts, multi=multi,
                      generalization=gen, node_defaults=not a.no_defaults,
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                      misread_dir=a.misread_dir, checkpoint=a.checkpoint)
    if earlier is not None:
        report = update_report(earlier, report)
    text = format_report(report)
    print(text)
    if a.json or a.update:
        save_report(report, a.json or a.update)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


def _settings(a: argparse.Namespace, start: float, end: float) -> EvalSettings:
    """The :class:`EvalSettings` the options give (the shipped strengths and gates with the shipped SAEs)."""
    from saeuron_core.assignments import parse_assignments
    from saeuron_demo import assets
    from saeuron_demo.evaluation import EvalSettings

    at = parse_assignments(a.ablate_strength_at, "--ablate-strength-at", "HOOK_POINT=STRENGTH", float)
    (gate_of, detector_of), (own_of, own_detectors) = _gates(a.gates, shipped=not a.sae), gate_args(a)
    coverage_of, detect_with = {**gate_of, **own_of}, {**detector_of, **own_detectors}
    if a.ablate_strength is None and not a.sae and not at:  # the shipped SAEs with the strengths chosen for them
        at, of = assets.shipped_strengths()
        if a.ablate_strengths is not None:
            of = _concept_strengths(a.ablate_strengths)
    else:
        of = _concept_strengths(a.ablate_strengths or "")
    return EvalSettings(seeds=list(a.seeds), steps=a.steps, guidance=a.guidance, scheduler=a.scheduler,
                        ablate_strength=EvalSettings.ablate_strength if a.ablate_strength is None else a.ablate_strength,
                        ablate_strength_at=at, ablate_strength_of=of, start=start, end=end,
                        replace=replace_fields().build(a, method="replace"),
                        replace_also_at=replace_also_at_arg(a.replace_also_at, not a.sae),
                        min_coverage=a.min_coverage, min_coverage_of=coverage_of, detect_with=detect_with,
                        batch_size=a.batch_size)


def _demo_asset(given: Optional[str], name: str) -> str:
    if given:
        return given
    from saeuron_demo.assets import ASSETS

    path = ASSETS / name
    if not path.exists():
        raise ConfigError(f"no shipped demo asset {path}; pass its path explicitly")
    return str(path)


def _concept_strengths(path: str) -> dict[str, float]:
    """``--ablate-strengths``: a JSON file ``{concept: strength}`` ('' for none)."""
    if not path:
        return {}
    from saeuron_demo.evaluation import load_concept_strengths

    try:
        return load_concept_strengths(path)
    except ConfigError as e:
        raise ConfigError(f"--ablate-strengths: {e}") from None


def _gates(path: Optional[str], *, shipped: bool) -> tuple[dict[str, float], dict[str, str]]:
    """``--gates``: a JSON file of gates ('' for none; unset: the shipped gates with the shipped SAEs)."""
    from saeuron_demo import assets
    from saeuron_demo.evaluation import load_gates

    if path is None:
        return assets.shipped_gates() if shipped else ({}, {})
    try:
        return load_gates(path) if path else ({}, {})
    except ConfigError as e:
        raise ConfigError(f"--gates: {e}") from None
