"""The shipped demo assets: where they live and the erasure settings the evaluation chose for them.

Objects and styles are erased at different blocks of the demo UNet, as SAeUron hooks one block
of SD for objects and another for styles: each demo SAE's library holds one kind of concept.
Objects enter the UNet at two layers, so two object SAEs erase them together; the outline and gradient
styles, which no single layer carries, are erased at the style block and at ``up_blocks.1.attentions.1``.
The strengths, one per block and one per concept, were chosen on validation seeds
(``scripts/sweep_demo_eval.py``; EVALUATION.md): the objects' on seeds 500 and 501, the styles' on 500-503.
Some concepts are gated (``min_coverage``, read by a detector entry of the same library; ``gates.json``).
"""

from __future__ import annotations

from pathlib import Path

from .asset_files import load_concept_strengths, load_gates

ASSETS = Path(__file__).resolve().parents[1] / "demo_assets"
# Seeds, kept apart: SAEs are trained on 0-5 and concepts learned on 100-103; every setting is chosen on the
# validation seeds only, and the evaluation's figures come from the evaluation seeds, which nothing is tuned on.
VALIDATION_SEEDS = range(500, 504)
EVALUATION_SEEDS = range(1000, 1008)
OBJECT_SAE = "sae-objects.safetensors"          # down_blocks.2.attentions.1: where the object enters the UNet
OBJECT_MID_SAE = "sae-objects-mid.safetensors"  # mid_block.attentions.0: where more of it enters
STYLE_SAE = "sae-styles.safetensors"            # up_blocks.1.attentions.2: where the style enters
STYLE_EXTRA_SAE = "sae-styles-extra.safetensors"  # up_blocks.1.attentions.1: where more of outline and gradient enter
OBJECT_SAES = (OBJECT_SAE, OBJECT_MID_SAE)
STYLE_SAES = (STYLE_SAE, STYLE_EXTRA_SAE)
SAES = (*OBJECT_SAES, *STYLE_SAES)  # what the evaluation uses: every SAE with a concept erases it
ALL_CONCEPTS_SAE = "sae.safetensors"            # up_blocks.1.attentions.1, every object and style
# One strength per block, for concepts without their own: the best mean of UA, IRA and CRA over its kind
# (at up_blocks.1.attentions.1, outline's first choice, made with the retained-confidence floor; outline and
# gradient, the only concepts there, now have their own). Chosen on the step-10500 model; the shipped step-12500
# model keeps them (EVALUATION.md, "The step-12500 model").
ABLATE_STRENGTH = {"down_blocks.2.attentions.1": 5.0, "mid_block.attentions.0": 5.0,
                   "up_blocks.1.attentions.2": 2.0, "up_blocks.1.attentions.1": 3.0}
CONCEPT_STRENGTHS = "ablate-strengths.json"     # {concept: strength}, the best of each concept
GATES = "gates.json"                            # {concept: {"min_coverage": share, "detect_with": entry}}


def concept_strengths() -> dict[str, float]:
    """The ablation strength chosen for each shipped concept on the validation seeds."""
    return load_concept_strengths(str(ASSETS / CONCEPT_STRENGTHS))


def shipped_strengths() -> tuple[dict[str, float], dict[str, float]]:
    """The strengths the shipped SAEs erase with: ``(per block, per concept)``, both chosen on validation seeds."""
    return dict(ABLATE_STRENGTH), concept_strengths()


def shipped_gates() -> tuple[dict[str, float], dict[str, str]]:
    """The gates the shipped SAEs erase with: ``(min_coverage per concept, detector entry per concept)``."""
    path = ASSETS / GATES
    return load_gates(str(path)) if path.exists() else ({}, {})
