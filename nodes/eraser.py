"""Concept Eraser node: a MODEL clone whose SAE block erases the chosen concepts."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from saeuron_core.erasure.eraser import ConceptEraser as Eraser
from saeuron_core.erasure.options import MAX_ABLATE_STRENGTH, EraseOptions
from saeuron_core.errors import ConfigError
from saeuron_core.sae.library import concept_names

from .common import CATEGORY, SAE, block_target, check_choice, parse_concepts, parse_pairs, patch_block, validation


class ConceptEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAeUronConceptEraser",
            display_name="Concept Eraser (SAE)",
            category=CATEGORY,
            description=("Erases concepts (styles, objects) from the model with the SAE's features. 'ablate' pushes "
                         "the concept's features negative where they fire (SAeUron); 'replace' only detects where the "
                         "concept is and swaps those patches for ones without it. Works on a copy: the input MODEL is "
                         "unchanged. Chain two erasers to erase both sets."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to erase from (it is not modified)."),
                SAE.Input("sae", tooltip="An SAE trained on this model's block, with the concepts in its library."),
                io.String.Input("concepts", default="", multiline=False,
                                tooltip="Concept names from the SAE's library, separated by commas. In the page, "
                                        "click to pick them from the SAE chosen in Load SAE."),
                io.Combo.Input("method", options=["ablate", "replace"], default="ablate",
                               tooltip="ablate (SAeUron): push the concept's features negative where they fire. "
                                       "Erases the most; best for styles and for several concepts at once, though "
                                       "the edited activations can lie far outside their usual range. replace: the "
                                       "features only detect where the concept is, and those patches (grown by "
                                       "one) get the unconditional half's, so activations stay in distribution and "
                                       "the rest of the picture is kept. Suited to one object, with replace_also_at "
                                       "naming the later block that draws it again; poor for styles."),
                io.Float.Input("strength", default=1.0, min=0.0, max=MAX_ABLATE_STRENGTH, step=0.05,
                               tooltip="ablate: the negative multiplier (0 = off, below 1 pushes less hard, 1 = "
                                       "SAeUron's style setting, up to 100); replace: share of replacement, 0 to 1."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start erasing at this fraction of the denoising (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop erasing after this fraction of the denoising (1 = last step)."),
                io.Combo.Input("cfg_half", options=["both", "cond", "uncond"], default="both",
                               tooltip="Which classifier-free guidance half to edit."),
                io.Float.Input("min_coverage", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Only touch an image where the concept's features fire on at least this share "
                                       "of the feature map (0 = wherever they fire). Keeps pictures without the "
                                       "concept as they were."),
                io.String.Input("detect_with", default="", multiline=False, optional=True,
                                tooltip="With min_coverage: another library entry that decides where the concept "
                                        "is, as 'concept=entry' pairs separated by commas (e.g. 'solid=solid "
                                        "(detector)'). Empty: each concept's own features."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Paint where to erase: only inside this mask (or only outside it, see "
                                      "mask_mode); resized to each block's token grid. Not connected: everywhere."),
                io.Combo.Input("mask_mode", options=["inside", "outside"], default="inside", optional=True,
                               tooltip="With a mask: erase only inside the painted region, or only outside it."),
                io.String.Input("replace_also_at", default="", optional=True,
                                tooltip="replace only: later blocks (diffusers names, comma separated) where what "
                                        "the SAE detects is replaced too, because the concept is drawn again there "
                                        "(the demo's objects: up_blocks.1.attentions.0). Empty: the SAE's block "
                                        "only."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the concepts erased.")],
        )

    @staticmethod
    def options(method: str, strength: float, start_percent: float, end_percent: float, cfg_half: str,
                min_coverage: float, detect_with: str) -> EraseOptions:
        """The node's widgets as the core's eraser options (validated)."""
        return EraseOptions(method=method, strength=strength, start=start_percent, end=end_percent,  # type: ignore[arg-type]
                            cfg=cfg_half, min_coverage=min_coverage,  # type: ignore[arg-type]
                            detect_with=parse_pairs(detect_with))

    @classmethod
    def validate_inputs(cls, concepts: str = "", method: str = "ablate", strength: float = 1.0,
                        start_percent: float = 0.0, end_percent: float = 1.0, cfg_half: str = "both",
                        min_coverage: float = 0.0, detect_with: str = "", mask_mode: str = "inside",
                        replace_also_at: str = "") -> bool | str:
        def check() -> None:
            cls.options(method, strength, start_percent, end_percent, cfg_half, min_coverage, detect_with)
            check_choice("mask_mode", mask_mode, ["inside", "outside"])
            if parse_concepts(replace_also_at) and method != "replace":
                raise ConfigError("replace_also_at: only method 'replace' can replace at later blocks")
            if not parse_concepts(concepts):
                raise ConfigError("choose at least one concept (names from the SAE's library, comma separated)")
        return validation(check)

    @classmethod
    def execute(cls, model: Any, sae: Any, concepts: str, method: str, strength: float, start_percent: float,
                end_percent: float, cfg_half: str, min_coverage: float = 0.0, detect_with: str = "",
                mask: Any = None, mask_mode: str = "inside", replace_also_at: str = "") -> io.NodeOutput:
        target = block_target(model, sae)
        names = parse_concepts(concepts)
        if not names:
            known = ", ".join(concept_names(sae)) or "none"
            raise ConfigError(f"no concept chosen; this SAE knows: {known}")
        eraser = Eraser(sae, names, options=cls.options(method, strength, start_percent, end_percent, cfg_half,
                                                        min_coverage, detect_with))
        patched = model
        # the SAE's block first, then the later blocks that replay its detection after it in each model call
        for i, (point, fn, residual) in enumerate(eraser.mounts(parse_concepts(replace_also_at), mask, mask_mode)):
            at = target if i == 0 else block_target(model, sae, point, check_width=False)
            patched = patch_block(patched, sae, fn, at, residual=residual)
        return io.NodeOutput(patched)
