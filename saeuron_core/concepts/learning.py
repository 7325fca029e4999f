"""Learning concepts through a diffusers pipeline: generate prompts with and without each concept, record the
SAE's features at the hooked block (conditional rows only, as SAeUron does) and add the scored concepts to the
SAE's library. One generation pass serves many concepts (each distinct prompt is generated once); the
bookkeeping and the scoring are :class:`ConceptLearner`'s, this module only runs the pipeline."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..hosts.diffusers import generate, set_scheduler
from ..hosts.hooks import check_sae_fits, denoiser, pipeline_hook
from ..sae.library import ConceptData, add_concept
from ..sae.model import TopKSAE
from .learner import ConceptLearner, ConceptRecorder, ConceptSpec
from .prompts import GENERIC, Vocabulary, prompts_from_word
from .selection import Selection

__all__ = ["ConceptLearner", "ConceptRecorder", "Selection", "learn_concept", "learn_concepts"]


def learn_concept(pipe: Any, sae: TopKSAE, name: str, positive: Optional[Sequence[str]] = None,
                  negative: Optional[Sequence[str]] = None, *, word: Optional[str] = None, kind: Optional[str] = None,
                  vocabulary: Optional[Vocabulary] = None, **options: Any) -> ConceptData:
    """Generate ``positive`` and ``negative`` prompts, score the SAE's features and add the concept to ``sae``.

    Instead of the prompts, a ``word`` (or phrase) and its ``kind`` build them from ``vocabulary``'s templates
    (:func:`~.prompts.prompts_from_word`; default :data:`~.prompts.GENERIC`), and the concept's ``info`` records
    the word and kind beside the prompts. ``options`` are :func:`learn_concepts`' (how to generate, and a
    ``selection`` and/or its fields by name). Activations are read from the conditional half only (as SAeUron does).
    """
    if word is None and kind is None and vocabulary is None:
        if positive is None or negative is None:
            raise ConfigError("learn_concept: give positive and negative prompts, or a word and its kind")
        return learn_concepts(pipe, sae, {name: (positive, negative)}, **options)[0]
    if positive is not None or negative is not None:
        raise ConfigError("learn_concept: give positive and negative prompts or a word and its kind, not both")
    if word is None or kind is None:
        raise ConfigError("learn_concept: a word needs its kind (style, object or other) and a kind its word")
    positive, negative = prompts_from_word(word, kind, vocabulary or GENERIC)
    return learn_concepts(pipe, sae, {name: (positive, negative)},
                          notes={name: {"word": " ".join(word.split()), "kind": kind}}, **options)[0]


def learn_concepts(pipe: Any, sae: TopKSAE, concepts: ConceptSpec, selection: Optional[Selection] = None, *,
                   hook_point: Optional[str] = None, steps: int = 50, guidance_scale: float = 7.5,
                   scheduler: Optional[str] = None, seeds: Sequence[int] = (0,), batch_size: int = 4,
                   height: Optional[int] = None, width: Optional[int] = None, progress: bool = True,
                   notes: Optional[Mapping[str, Mapping[str, Any]]] = None, **options: Any) -> list[ConceptData]:
    """Learn several concepts ``{name: (positive prompts, negative prompts)}`` from one generation pass.

    Every distinct prompt is generated once per seed, whatever the number of concepts using it;
    each concept is then scored from the statistics of its own prompts and added to ``sae``.
    Which features are kept: ``selection`` (a :class:`Selection`) and/or its fields by name (``top_n``,
    ``quantile``, ``min_specificity``, ``peak_specificity``, ``bucket_width``). ``notes`` (``{name: {key: value}}``)
    go into each named concept's ``info`` after its prompts.
    """
    selection = _selection(selection, options)
    max_t = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
    learner = ConceptLearner(sae, concepts, selection, max_timestep=max_t, notes=notes)
    if steps < 1 or batch_size < 1 or not seeds:
        raise ConfigError("learn_concept: steps and batch_size must be >= 1 and at least one seed is needed")
    hook_point = hook_point or sae.config.hook_point
    if not hook_point:
        raise ConfigError("the SAE does not say where it hooks; pass hook_point (e.g. 'up_blocks.1.attentions.1')")
    check_sae_fits(denoiser(pipe), hook_point, sae)
    old_scheduler = pipe.scheduler
    if scheduler:
        set_scheduler(pipe, scheduler)
    work = [(p, s) for s in seeds for p in learner.prompts]
    label = next(iter(learner.concepts)) if len(learner.concepts) == 1 else f"{len(learner.concepts)} concepts"
    bar = tqdm(total=len(work), desc=f"learn {label}", unit="gen", disable=not progress)
    scheduler_name = type(pipe.scheduler).__name__
    try:
        with sae.kept_beside(denoiser(pipe)), \
                pipeline_hook(pipe, hook_point, learner.recorder, residual=sae.config.residual), torch.no_grad():
            for begin in range(0, len(work), batch_size):
                chunk = work[begin:begin + batch_size]
                learner.feed([p for p, _ in chunk])
                generate(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps=steps,
                         guidance_scale=guidance_scale, height=height, width=width)
                bar.update(len(chunk))
    finally:
        bar.close()
        pipe.scheduler = old_scheduler
    learned = learner.results({"hook_point": hook_point, "steps": steps, "guidance_scale": guidance_scale,
                               "scheduler": scheduler_name, "seeds": list(seeds)})
    for data in learned:
        add_concept(sae, data)
    return learned


def _selection(selection: Optional[Selection], options: Mapping[str, Any]) -> Selection:
    """``selection`` with the fields given by name; a name that is neither a field nor a keyword of
    :func:`learn_concepts` is refused with the list of both."""
    unknown = sorted(set(options) - set(Selection.names()))
    if unknown:
        keywords = [p.name for p in inspect.signature(learn_concepts).parameters.values()
                    if p.kind is p.KEYWORD_ONLY or p.name == "selection"]
        valid = ", ".join(sorted({*keywords, *Selection.names()}))
        raise ConfigError(f"learn_concept: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"the options are {valid}")
    return Selection.build(selection, **options)
