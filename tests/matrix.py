"""The architecture matrix: one named row per tiny model family (vr_plugin.tiny), for every test module.

Each :class:`Case` says where the family's LLM layers are, which parameters form the projector and the vision tower,
which decoder layers are where visual features enter, and what the family can do here (a processor that builds
locally, so ``vr-plugin train`` runs on it). Paths are those of transformers >= 4.52; :func:`cases` skips a family
the installed transformers does not have (or builds differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import pytest

from vr_plugin.tiny import available

from .common import NEW_HF_LAYOUT

L = "model.language_model.layers"
# The families the first test modules (test_locate, test_freeze, test_lora, test_cli) were written for.
LEGACY = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "llama")
QWEN3_PROJECTOR = ("model.visual.merger.", "model.visual.deepstack_merger_list.")  # DeepStack's mergers project too


@dataclass(frozen=True)
class Case:
    """One architecture of the matrix."""

    name: str  # vr_plugin.tiny architecture
    layers: str  # the LLM's decoder layers
    projector: tuple  # parameter-name prefixes of the multimodal projector
    vision: Optional[str]  # parameter-name prefix of the vision tower (None: a text-only LLM)
    entry: tuple = ()  # visual-entry layers of the tiny model (8 layers): protected from pruning
    processor: bool = False  # vr_plugin.tiny.save_tiny_lvlm builds it: `vr-plugin train` runs end to end
    forward: bool = True  # the model's own forward runs (else tests drive its language model alone)
    old: Optional[tuple] = None  # (layers, projector, vision) in transformers <= 4.51's layout, where it differs

    def paths(self, new_layout: bool = True) -> tuple:
        """``(layers, projector prefixes, vision prefix)`` in the installed transformers' layout."""
        return (self.layers, list(self.projector), self.vision) if new_layout or self.old is None else self.old

    def region_names(self, names, layers=(1, 7)) -> set:
        """Of ``names``, those inside decoder layers ``layers``."""
        return {n for n in names if n.startswith(tuple(f"{self.layers}.{i}." for i in layers))}

    def projector_names(self, names) -> set:
        return {n for n in names if n.startswith(self.projector)}


# fmt: off
CASES = {
    case.name: case
    for case in (
        Case("llava", L, ("model.multi_modal_projector.",), "model.vision_tower.", processor=True,
             old=("language_model.model.layers", ["multi_modal_projector."], "vision_tower.")),
        Case("llava_next", L, ("model.multi_modal_projector.", "model.image_newline"), "model.vision_tower.",
             processor=True,
             old=("language_model.model.layers", ["multi_modal_projector.", "image_newline"], "vision_tower.")),
        Case("llava_onevision", L, ("model.multi_modal_projector.", "model.image_newline"), "model.vision_tower.",
             old=("language_model.model.layers", ["multi_modal_projector.", "image_newline"], "vision_tower.")),
        Case("qwen2_vl", L, ("model.visual.merger.",), "model.visual.", processor=True,
             old=("model.layers", ["visual.merger."], "visual.")),
        Case("qwen2_5_vl", L, ("model.visual.merger.",), "model.visual.", processor=True,
             old=("model.layers", ["visual.merger."], "visual.")),
        Case("idefics3", "model.text_model.layers", ("model.connector.",), "model.vision_model."),
        Case("paligemma", L, ("model.multi_modal_projector.",), "model.vision_tower.",
             old=("language_model.model.layers", ["multi_modal_projector."], "vision_tower.")),
        Case("llama", "model.layers", (), None),  # a text-only LLM: the region without a vision tower
        Case("gemma3", L, ("model.multi_modal_projector.",), "model.vision_tower.", processor=True),
        Case("mllama", L, ("model.multi_modal_projector.",), "model.vision_model.", entry=(3, 6), processor=True),
        Case("qwen3_vl", L, QWEN3_PROJECTOR, "model.visual.", entry=(0, 1), processor=True),
        Case("qwen3_vl_moe", L, QWEN3_PROJECTOR, "model.visual.", entry=(0, 1), processor=True),
        Case("internvl", L, ("model.multi_modal_projector.",), "model.vision_tower.", processor=True),
        Case("smolvlm", "model.text_model.layers", ("model.connector.",), "model.vision_model."),
        Case("mistral3", L, ("model.multi_modal_projector.",), "model.vision_tower."),
        Case("glm4v", L, ("model.visual.merger.",), "model.visual.", processor=True),
        Case("aya_vision", L, ("model.multi_modal_projector.",), "model.vision_tower.", processor=True),
        # Llama4ForConditionalGeneration.forward raises in transformers 5.24 (it reads `image_outputs` from its
        # language model's output); everything but that forward is tested, its language model forwards alone
        Case("llama4", "language_model.model.layers", ("multi_modal_projector.",), "vision_model.", forward=False),
    )
}
# fmt: on


def cases(*names: str, where=None) -> list:
    """``pytest.param`` per case (all, or ``names``; filtered by ``where(case)``), skipped where unavailable."""
    chosen = [CASES[n] for n in names] if names else list(CASES.values())
    if where is not None:
        chosen = [c for c in chosen if where(c)]

    def skip(case: Case) -> pytest.MarkDecorator:
        missing = not available(case.name) or not NEW_HF_LAYOUT  # the paths above are transformers >= 4.52's
        return pytest.mark.skipif(missing, reason="not in this transformers (or its pre-4.52 layout)")

    return [pytest.param(c, id=c.name, marks=skip(c)) for c in chosen]


class Paths(NamedTuple):
    """Where a case's parts are in the installed transformers' layout."""

    layers: str  # the LLM's decoder layers
    projector: list  # parameter-name prefixes of the multimodal projector
    vision: Optional[str]  # parameter-name prefix of the vision tower


# the LEGACY families' paths in the installed layout (these tests also run in the LLaVA and Bunny stacks)
PATHS = {name: Paths(*CASES[name].paths(NEW_HF_LAYOUT)) for name in LEGACY}
_MISSING = "missing in this transformers"
# pytest params over the LEGACY families, skipped where the installed transformers lacks one
LEGACY_ARCHS = [pytest.param(a, marks=pytest.mark.skipif(not available(a), reason=_MISSING)) for a in LEGACY]
