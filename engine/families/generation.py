"""A model family's generation defaults and choices, from the configured ones (torch-free).

``[generation]`` is written for the SD families. A model of another family takes its own
defaults where the configuration's would not suit it (issue 21 point 8): Flux and SD 3.5 are
made at 1024 px in multiples of 16 (``generation.sdxl_sizes``, the 1024-px size list, as for
SDXL), with their own steps and guidance (:class:`engine.families.FamilyTraits`; Flux schnell
4 steps), the samplers and schedule types they can run, and no default negative prompt for Flux.
A model's own table (``default_steps``, ``default_guidance``, ``default_sampler``) comes first.
"""

from __future__ import annotations

from dataclasses import replace

from engine.families import FAMILIES
from engine.params import parse_size

#: Flux schnell is distilled for few steps (its model card's 4).
SCHNELL_STEPS = 4


def for_family(gen, family: str, guidance: str = "cfg", model=None):
    """``gen`` (a GenerationSettings) for a model of ``family`` (``model``: its ModelSettings)."""
    traits = FAMILIES.get(family)
    if traits is None:
        return gen
    changes: dict = {"family": family, "pixel_multiple": traits.pixel_multiple}
    if family in ("sdxl", "sd3", "flux"):
        sizes = tuple(s for s in gen.sdxl_sizes if all(v % traits.pixel_multiple == 0 for v in parse_size(s)))
        parsed = [parse_size(size) for size in sizes]
        changes |= dict(
            sizes=sizes,
            default_width=parsed[0][0],
            default_height=parsed[0][1],
            max_width=max(gen.max_width, *(w for w, _ in parsed)),
            max_height=max(gen.max_height, *(h for _, h in parsed)),
        )
    if traits.samplers is not None:
        samplers = tuple(s for s in gen.samplers if s in traits.samplers) or traits.samplers
        changes |= dict(samplers=samplers)
        if gen.default_sampler not in samplers:
            changes["default_sampler"] = traits.default_sampler if traits.default_sampler in samplers else samplers[0]
    if traits.schedules is not None:
        changes |= dict(schedules=traits.schedules, default_schedule=traits.schedules[0])
    if traits.default_steps is not None:
        changes["default_steps"] = SCHNELL_STEPS if guidance == "none" else traits.default_steps
    if traits.default_guidance is not None:
        changes["default_guidance"] = traits.default_guidance
    if not traits.negative_prompt:
        changes["default_negative_prompt"] = ""
    if model is not None:
        changes |= {
            key: value
            for key, value in (
                ("default_steps", model.default_steps),
                ("default_guidance", model.default_guidance),
                ("default_sampler", model.default_sampler),
            )
            if value
        }
    changes["default_steps"] = min(changes.get("default_steps", gen.default_steps), gen.max_steps)
    changes["default_guidance"] = min(changes.get("default_guidance", gen.default_guidance), gen.max_guidance)
    return replace(gen, **changes)
