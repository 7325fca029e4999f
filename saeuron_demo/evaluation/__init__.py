"""Mini-UnlearnCanvas: measure concept erasure on the demo model with its classifier.

Every run generates one image per (object, style) prompt and seed, so a run covers the whole
8 x 8 grid, and the classifier reads object and style off each image. For an erased concept ``c``
of kind K (object or style) and the other kind K':

* **UA** (unlearning accuracy): share of images prompted with ``c`` where the K head does *not* read ``c``;
* **IRA** (in-domain retain): K-head accuracy on images prompted with the other concepts of kind K;
* **CRA** (cross-domain retain): K'-head accuracy on all images (is the object still right when a
  style is erased, and the other way round).

Artifact measures that need no VLM: the classifier's confidence in the retained (K') label on the
erased concept's images, and how far the hooked block's activations on those images move from the
clean activations of prompts without the concept (per-channel mean and standard deviation).

Methods, on the same seeds: ``none``, ``negative_prompt`` (the concept's name as negative prompt),
``ablate`` (SAeUron feature ablation) and ``replace`` (detect and replace).

Several SAEs on different blocks can be evaluated together (as SAeUron hooks one block for objects
and another for styles): a concept is erased by every SAE whose library has it, all their blocks
hooked in the same generation (as chained Concept Eraser nodes do in ComfyUI).

Modules, lowest first: :mod:`.settings` (:class:`EvalSettings`, the eraser options it gives each
method), :mod:`.grid` (the prompts, which SAE erases which concept), :mod:`.generation` (a run's
images and block statistics), :mod:`.misread` and :mod:`.scoring` (what the classifier read),
:mod:`.evaluator` (:class:`Evaluator`), :mod:`.report` (the settings as a report holds them; JSON save,
load and update), :mod:`.suite` (:func:`evaluate`: the whole report), :mod:`.markdown`
(:func:`format_report`), :mod:`.strengths` (choosing strengths on validation) and :mod:`.diagnostics`
(where replace detects, per block and step). The JSON files of chosen strengths and gates are read by
:mod:`saeuron_demo.asset_files`, which the shipped assets use too.
"""

from __future__ import annotations

from ..asset_files import load_concept_strengths, load_gates
from .evaluator import SAEs, Evaluator
from .generation import RunOutput
from .grid import Grid, concept_owners, demo_grid
from .markdown import format_report
from .report import (PER_CONCEPT_SETTINGS, REPLACE_SETTINGS, check_updatable, load_report, save_report,
                     settings_from_json, settings_json, update_report)
from .scoring import METRIC_KEYS, mean_metrics, summary_by_kind
from .settings import DEMO_REPLACE_ALSO_AT, METHODS, REPLACE_OPTIONS, SAE_METHODS, EvalSettings
from .strengths import best_strengths
from .suite import evaluate

__all__ = [
    "DEMO_REPLACE_ALSO_AT", "METHODS", "METRIC_KEYS", "PER_CONCEPT_SETTINGS", "REPLACE_OPTIONS", "REPLACE_SETTINGS", "SAE_METHODS", "SAEs",
    "EvalSettings", "Evaluator", "Grid", "RunOutput", "best_strengths", "check_updatable", "concept_owners",
    "demo_grid", "evaluate", "format_report", "load_concept_strengths", "load_gates", "load_report", "mean_metrics",
    "save_report", "settings_from_json", "settings_json", "summary_by_kind", "update_report",
]
