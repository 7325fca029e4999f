"""Learn Concept node: score the SAE's features for a concept by sampling with ComfyUI's own sampler."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from saeuron_core.concepts.learner import ConceptLearner
from saeuron_core.concepts.prompts import GENERIC, KINDS, prompts_from_word
from saeuron_core.concepts.selection import DEFAULT_MIN_SPECIFICITY, Selection
from saeuron_core.errors import ConfigError
from saeuron_core.sae.library import check_concept_name, with_concept
from saeuron_core.sae.model import TopKSAE

from .common import CATEGORY, SAE, block_target, check_sampling_choices, max_timestep, patch_block, validation


def _prompts(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _checked(concept_name: str, positive_prompts: str, negative_prompts: str, word: str = "",
             kind: str = "style") -> tuple[list[str], list[str]]:
    check_concept_name(concept_name)
    positive, negative = _prompts(positive_prompts), _prompts(negative_prompts)
    if str(word).strip():
        if positive or negative:
            raise ConfigError("Learn Concept takes either prompt lists or a word, not both: clear the word or the "
                              "positive and negative prompts")
        return prompts_from_word(word, kind, GENERIC)
    if not positive or not negative:
        raise ConfigError("Learn Concept needs at least one positive and one negative prompt (one per line), or a "
                          "word")
    return positive, negative


def _encode(clip: Any, text: str) -> list:
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


class LearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="SAeUronLearnConcept",
            display_name="Learn Concept (SAE)",
            category=CATEGORY,
            description=("Finds the SAE features of a concept: samples the positive prompts (with the concept) and "
                         "the negative prompts (without it), scores every feature per timestep and adds the concept "
                         "to a copy of the SAE's library. Connect Save SAE to keep it."),
            inputs=[
                io.Model.Input("model", tooltip="The model the SAE was trained on."),
                io.Clip.Input("clip", tooltip="Text encoder used to encode the prompts."),
                SAE.Input("sae", tooltip="The SAE to learn the concept for."),
                io.Latent.Input("latent_image",
                                tooltip="Latent to sample from (e.g. Empty Latent Image); sets the size."),
                io.String.Input("concept_name", default="my concept", tooltip="Name of the concept in the library."),
                io.String.Input("positive_prompts", multiline=True, default="",
                                tooltip="Prompts that contain the concept, one per line."),
                io.String.Input("negative_prompts", multiline=True, default="",
                                tooltip="Similar prompts without the concept, one per line."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of every sample."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps per prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Sampler used while scoring."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Noise schedule used while scoring."),
                io.Int.Input("top_n", default=3, min=1, max=64, tooltip="Features kept per timestep."),
                io.Float.Input("min_specificity", default=DEFAULT_MIN_SPECIFICITY, min=0.0, max=0.99, step=0.05,
                               optional=True,
                               tooltip="Keep only features that fire mostly with the concept: (with - without) / "
                                       "(with + without) of their mean activations must reach this. Higher erases "
                                       "less but leaves other pictures alone; 0 is SAeUron's original selection."),
                io.Float.Input("peak_specificity", default=-1.0, min=-1.0, max=0.99, step=0.05, optional=True,
                               tooltip="Also require that specificity against each negative prompt on its own (the "
                                       "one where the feature is most active), so that a feature the concept shares "
                                       "with one sibling (a ring for a circle) is not chosen. Below 0: off (the "
                                       "default)."),
                io.String.Input("word", default="", optional=True,
                                tooltip="Instead of prompt lists: the concept as one word or phrase; the prompts are "
                                        "built from templates. They use common subjects and art styles, whatever "
                                        "the model (for the demo model, write its prompt lists)."),
                io.Combo.Input("kind", options=list(KINDS), default="style", optional=True,
                               tooltip="What the word is: a style (drawn across many subjects), an object (across "
                                       "many styles) or other (both)."),
            ],
            outputs=[SAE.Output(tooltip="The SAE with the concept added (the input SAE is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, concept_name: str = "", positive_prompts: str = "", negative_prompts: str = "",
                        sampler_name: str = "euler", scheduler: str = "normal", word: str = "",
                        kind: str = "style") -> bool | str:
        def check() -> None:
            check_sampling_choices(sampler_name, scheduler)
            _checked(concept_name, positive_prompts, negative_prompts, word, kind)
        return validation(check)

    @classmethod
    def execute(cls, model: Any, clip: Any, sae: TopKSAE, latent_image: dict, concept_name: str,
                positive_prompts: str, negative_prompts: str, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, top_n: int, min_specificity: float = DEFAULT_MIN_SPECIFICITY,
                peak_specificity: float = -1.0, word: str = "", kind: str = "style") -> io.NodeOutput:
        import comfy.utils

        import nodes as comfy_nodes

        target = block_target(model, sae)
        positive, negative = _checked(concept_name, positive_prompts, negative_prompts, word, kind)
        notes = {concept_name: {"word": " ".join(word.split()), "kind": kind}} if word.strip() else None
        selection = Selection(top_n=top_n, min_specificity=min_specificity,
                              peak_specificity=None if peak_specificity < 0 else float(peak_specificity))
        learner = ConceptLearner(sae, {concept_name: (positive, negative)}, selection, max_timestep=max_timestep(model),
                                 notes=notes)
        patched = patch_block(model, sae, learner.recorder, target)
        uncond = _encode(clip, "")
        bar = comfy.utils.ProgressBar(len(learner.prompts))
        for prompt in learner.prompts:  # each distinct prompt once; all its conditional rows are that prompt's
            learner.feed(prompt)
            comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, _encode(clip, prompt),
                                        uncond, latent_image, denoise=1.0)
            bar.update(1)
        settings = {"hook_point": sae.config.hook_point, "steps": steps, "guidance_scale": cfg,
                    "scheduler": f"comfyui {sampler_name}/{scheduler}", "seeds": [seed]}
        (learned,) = learner.results(settings)
        return io.NodeOutput(with_concept(sae, learned))
