"""``saeuron learn-concept``: score the SAE's features for one concept (or a ``--library`` of them) on
generated prompts and store the result in the SAE file's concept library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from saeuron_core.concepts.prompts import KINDS
from saeuron_core.errors import ConfigError

from .common import OWN_HOOK_HELP, SEEDS_HELP, add_model_args, concept_output, load_model, parse_seeds
from .fields import Fields

if TYPE_CHECKING:
    from saeuron_core.concepts.prompts import Vocabulary
    from saeuron_core.concepts.selection import Selection

NAME = "learn-concept"
VOCABULARIES = ("generic", "demo")


def selection_fields() -> tuple[Fields[Selection], Fields[Selection]]:
    """learn-concept's :class:`Selection` options: ``--top-n`` or ``--quantile`` (one of them), then the rest.

    ``--min-specificity`` has no default of its own: left out, the Selection's applies.
    """
    from saeuron_core.concepts.selection import Selection

    return (Fields(Selection, ("top_n", "quantile")),
            Fields(Selection, ("min_specificity", "peak_specificity", "bucket_width"),
                   defaults={"min_specificity": None}))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``learn-concept`` and its options."""
    lc = sub.add_parser(NAME, help="score the SAE's features for a concept and store it in the SAE file")
    lc.add_argument("sae", help="SAE file or sparsify/SAELens folder")
    lc.add_argument("--concept", help="name of the concept (replaces a concept of the same name)")
    lc.add_argument("--positive", help="prompts with the concept: text file (one per line) or JSON list")
    lc.add_argument("--negative", help="prompts without the concept: text file or JSON list")
    lc.add_argument("--word", help="instead of --positive/--negative: the concept as one word or phrase; the "
                                   "prompts are built from templates (needs --kind)")
    lc.add_argument("--kind", choices=KINDS, help="what --word is: a style (drawn across many subjects), an object "
                                                  "(across many styles) or other (both)")
    lc.add_argument("--vocabulary", choices=VOCABULARIES, default=None,
                    help="subjects and styles --word's prompts are built from (default: demo for the demo model, "
                         "else generic)")
    lc.add_argument("--library", help="instead of --concept/--positive/--negative: a JSON file "
                                      "{name: {\"positive\": [...], \"negative\": [...]}} learning every concept "
                                      "from one generation pass")
    add_model_args(lc)
    lc.add_argument("--out", default=None, help="output .safetensors SAE file (default: update SAE in place; "
                                                "required for sparsify/SAELens folders)")
    lc.add_argument("--steps", type=int, default=50)
    lc.add_argument("--guidance", type=float, default=7.5)
    lc.add_argument("--scheduler", default="ddim")
    lc.add_argument("--seeds", type=parse_seeds, default=[0], help=SEEDS_HELP)
    lc.add_argument("--batch-size", type=int, default=4)
    pick, rest = selection_fields()
    pick.add_to(lc.add_mutually_exclusive_group())
    rest.add_to(lc)
    lc.add_argument("--height", type=int, default=None)
    lc.add_argument("--width", type=int, default=None)
    lc.add_argument("--hook-point", default=None, help=OWN_HOOK_HELP)


def word_vocabulary(a: argparse.Namespace) -> Vocabulary:
    """--vocabulary, or the demo's when --model is a folder whose model_index.json names the demo's pipeline."""
    from saeuron_core.concepts.prompts import GENERIC

    choice = a.vocabulary
    if choice is None:
        index = Path(a.model) / "model_index.json"
        try:
            named = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
        except (OSError, ValueError, AttributeError):
            named = None
        choice = "demo" if named == "PixelDiffusionPipeline" else "generic"
    if choice == "demo":
        from saeuron_demo.dataset import DEMO_VOCABULARY

        return DEMO_VOCABULARY
    return GENERIC


def word_spec(a: argparse.Namespace) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, dict[str, str]]]:
    """``({name: (positive, negative)}, {name: {"word", "kind"}})`` from --word/--kind (--concept defaults to the
    word)."""
    from saeuron_core.concepts.prompts import prompts_from_word
    from saeuron_core.sae.library import check_concept_name

    if a.library is not None or a.positive is not None or a.negative is not None:
        raise ConfigError("--word replaces --positive/--negative and --library; give one or the other")
    if a.kind is None:
        raise ConfigError("--word needs --kind (style, object or other)")
    name = check_concept_name(a.concept if a.concept is not None else a.word)
    positive, negative = prompts_from_word(a.word, a.kind, word_vocabulary(a))
    return {name: (positive, negative)}, {name: {"word": " ".join(a.word.split()), "kind": a.kind}}


def library_spec(a: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    """``{name: (positive, negative)}`` from --library, or from --concept/--positive/--negative."""
    from saeuron_core.data.collection import read_prompts
    from saeuron_core.sae.library import check_concept_name

    single = (a.concept, a.positive, a.negative)
    if a.kind is not None or a.vocabulary is not None:
        raise ConfigError("--kind and --vocabulary go with --word")
    if a.library is None:
        if not all(single):
            raise ConfigError("give --concept, --positive and --negative (or --library with several concepts)")
        return {check_concept_name(a.concept): (read_prompts(a.positive), read_prompts(a.negative))}
    if any(single):
        raise ConfigError("--library replaces --concept/--positive/--negative; give one or the other")
    try:
        with open(a.library, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ConfigError(f"--library {a.library}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--library {a.library}: expected a non-empty object {{name: {{positive, negative}}}}")
    spec = {}
    for name, entry in raw.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), list) and all(isinstance(p, str) for p in entry[k]) for k in ("positive", "negative"))
        if not ok:
            raise ConfigError(f"--library {a.library}: concept {name!r} needs 'positive' and 'negative' lists of prompts")
        spec[check_concept_name(name)] = (entry["positive"], entry["negative"])
    return spec


def run(a: argparse.Namespace) -> int:
    """Learn the concepts and write the SAE (to ``--out``, or in place)."""
    from saeuron_core.concepts.learning import learn_concepts
    from saeuron_core.concepts.selection import Selection
    from saeuron_core.inspection import format_concept
    from saeuron_core.sae.files import load_sae, save_sae

    spec, notes = word_spec(a) if a.word is not None else (library_spec(a), None)
    out = concept_output(a.sae, a.out)
    # Built (so checked) before loading the model and the (long) generation; an option left out keeps its default.
    given = {name: value for fields in selection_fields() for name, value in fields.values(a).items()}
    selection = Selection(**{name: value for name, value in given.items() if value is not None})
    sae = load_sae(a.sae, device=a.device)
    pipe = load_model(a.model, device=a.device, config=a.config)
    learned = learn_concepts(pipe, sae, spec, selection, hook_point=a.hook_point, steps=a.steps,
                             guidance_scale=a.guidance, scheduler=a.scheduler, seeds=a.seeds, batch_size=a.batch_size,
                             height=a.height, width=a.width, progress=sys.stderr.isatty(), notes=notes)
    save_sae(sae, out)
    for data in learned:
        counts = data.n_selected[data.observed]
        lo, hi = int(counts.min()), int(counts.max())
        per_t = f"{lo}" if lo == hi else f"{lo}-{hi}"
        distinct = int(data.feature_ids[data.selected_mask()].unique().numel())
        print(f"learned concept {data.name!r}: {per_t} selected features per timestep ({distinct} distinct) -> {out}")
        print(f"  {format_concept(data.name, data)}")
    return 0
