"""Concept Eraser node: a MODEL clone whose SAE block erases the chosen concepts."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from saeuron_core.erasure.eraser import ConceptEraser as Eraser
from saeuron_core.erasure.options import EraseOptions
from saeuron_core.errors import ConfigError
from saeuron_core.sae.library import concept_names

from .common import CATEGORY, SAE, block_target, check_choice, parse_concepts, patch_block, validation
from .option_inputs import FieldInputs

# the eraser's options among the inputs (method to detect_with), from EraseOptions' metadata
ERASER_OPTIONS = FieldInputs(EraseOptions)


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
                *ERASER_OPTIONS.inputs(),
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
    def options(*values: Any, **named: Any) -> EraseOptions:
        """The node's eraser-option widgets (in input order, or by name) as the core's eraser options (validated)."""
        return ERASER_OPTIONS.build(values, named)

    @classmethod
    @ERASER_OPTIONS.signed
    def validate_inputs(cls, concepts: str = "", mask_mode: str = "inside", replace_also_at: str = "",
                        **options: Any) -> bool | str:
        def check() -> None:
            chosen = cls.options(**options)
            check_choice("mask_mode", mask_mode, ["inside", "outside"])
            if parse_concepts(replace_also_at) and chosen.method != "replace":
                raise ConfigError("replace_also_at: only method 'replace' can replace at later blocks")
            if not parse_concepts(concepts):
                raise ConfigError("choose at least one concept (names from the SAE's library, comma separated)")
        return validation(check)

    @classmethod
    def execute(cls, model: Any, sae: Any, concepts: str, *options: Any, mask: Any = None, mask_mode: str = "inside",
                replace_also_at: str = "", **named: Any) -> io.NodeOutput:
        target = block_target(model, sae)
        names = parse_concepts(concepts)
        if not names:
            known = ", ".join(concept_names(sae)) or "none"
            raise ConfigError(f"no concept chosen; this SAE knows: {known}")
        eraser = Eraser(sae, names, options=cls.options(*options, **named))
        patched = model
        # the SAE's block first, then the later blocks that replay its detection after it in each model call
        for i, (point, fn, residual) in enumerate(eraser.mounts(parse_concepts(replace_also_at), mask, mask_mode)):
            at = target if i == 0 else block_target(model, sae, point, check_width=False)
            patched = patch_block(patched, sae, fn, at, residual=residual)
        return io.NodeOutput(patched)
