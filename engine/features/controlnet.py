"""ControlNet per row of the running batch: a field of the rows' conditioning that the SD
denoiser reads (:class:`ControlRows`), joined and split with the rows like every other one.

Each ControlNet in use runs once per step on the rows that use it (both rows of each CFG pair,
as diffusers' ``StableDiffusionControlNetPipeline`` and AUTOMATIC1111 run it: the same scaled
latents, each row's own prompt or negative prompt, the control image twice), and its residuals
are added to those rows only, scaled per row by:

- the unit's weight, and per residual by its control mode (AUTOMATIC1111's ControlNet extension,
  ``scripts/hook.py``): "Balanced" plain; "My prompt is more important" by 0.825^(12 - i) for
  residual i of 13 (its soft injection; SDXL takes the first 10 of those 13, so its middle block
  gets 0.825^3, as the extension does); "ControlNet is more important" the same, and the
  negative prompt's row of each pair gets none (its CFG injection, ``control * cond_mark``);
- whether the row's step is inside the unit's window. The extension counts step i of N as
  active unless ``i / N < start or i / N > end``. A job's steps are known when it is prepared,
  so the window is kept as the sigmas it spans (the first active step's sigma down to, not
  including, the sigma after the last active one) and checked against each row's sigma on the
  device: no step counter, no host sync. (A Heun step's second evaluation is at the next step's
  sigma, so for Heun alone the window's edges move by that half step.) Outside its window a
  unit's residuals are multiplied by 0, as diffusers does with ``control_guidance_start/end``.

Rows without a unit get zero residuals, which leave the UNet's sums exactly as they were. A
ControlNet's cross-attention takes no mask, so rows are grouped by their prompt's token count
too (each group one call, with its rows' own unpadded tokens): a row's residuals are the same
whatever shares its batch. Compiled (``engine.compile``), the residuals are inputs of the UNet's
graphs, padded to the bucket with the rows (engine.batching.graphs); the ControlNets run eager.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.control_units import CONTROL_MODES, ControlUnit
from engine.errors import GenerationError
from engine.features.annotators import annotator_refusal, control_map
from engine.features.masks import open_image

if TYPE_CHECKING:
    from engine.features.controlnet_loading import ControlNets

#: AUTOMATIC1111's soft injection: residual i of 13 (12 down, then the middle block) scaled by
#: 0.825 ** (12 - i); SDXL's 10 residuals take the first 10 of those.
SOFT_INJECTION = 0.825
SDXL_SOFT_OFFSET = 3
#: A union ControlNet's control type for each preprocessor (xinsir's ControlNet++ order, which
#: diffusers' ``StableDiffusionXLControlNetUnionPipeline`` takes as ``control_mode``).
UNION_TYPES = {"openpose": 0, "depth": 1, "softedge": 2, "canny": 3, "lineart": 3, "tile": 6, "blur": 6}


def is_union(net) -> bool:
    """A ``ControlNetUnionModel`` (one network for many control types, told which per call)."""
    return hasattr(net.config, "num_control_type")


def residual_scales(net, weight: float, control_mode: str) -> list[float]:
    """The unit's factor for each of the ControlNet's residuals (down blocks', then the middle's)."""
    count = len(net.controlnet_down_blocks) + 1
    if control_mode == CONTROL_MODES[0]:
        return [weight] * count
    offset = SDXL_SOFT_OFFSET if net.config.addition_embed_type == "text_time" else 0
    return [weight * SOFT_INJECTION ** float(count - 1 + offset - i) for i in range(count)]


def sigma_window(sigmas: Tensor, start: float, end: float) -> tuple[float, float]:
    """The unit's steps as sigmas: active where ``low < sigma <= high``; ``(-1, 0)``: never."""
    steps = len(sigmas) - 1
    active = [i for i in range(steps) if not (i / steps < start or i / steps > end)]
    if not active:
        return -1.0, 0.0
    return float(sigmas[active[0]]), float(sigmas[active[-1] + 1])


@dataclass(frozen=True)
class ControlGroup:
    """Rows that one ControlNet runs on in one call (one prompt length)."""

    net: Any  # diffusers' ControlNetModel
    slot: int  # the unit's place in its job (0-2): a row's units are summed in this order
    tokens: int  # the rows' prompt length: their embeddings are cut to it
    index: tuple[int, ...]  # the rows (images) among the conditioning's rows
    image: Tensor  # [k, 3, H, W] in [0, 1], the net's dtype, on the device
    scales: Tensor  # [k, residuals] float32: weight x control mode's factor per residual
    negative: Tensor  # [k] float32: 1, or 0 where the negative prompt's row gets no residuals
    window: Tensor  # [k, 2] float32: the highest sigma of the window, and the one below it
    union_type: int | None = None  # a union ControlNet's control type (UNION_TYPES); None: a plain one

    def key(self) -> tuple[int, int, int, int | None]:
        return self.slot, id(self.net), self.tokens, self.union_type


@dataclass(frozen=True)
class ControlRows:
    """Every row's ControlNet inputs, by ControlNet: what the denoiser adds to the UNet."""

    rows: int  # the conditioning's rows (images), including those without a unit
    groups: tuple[ControlGroup, ...]

    @staticmethod
    def cat(parts: list[tuple[ControlRows | None, int]]) -> ControlRows | None:
        """Join jobs' rows (``(control or None, rows)`` in row order); groups of the same
        ControlNet and prompt length merge, so each runs once per step."""
        if all(control is None for control, _ in parts):
            return None
        merged: dict[tuple, list[ControlGroup]] = {}
        offset = 0
        for control, rows in parts:
            for group in control.groups if control is not None else ():
                moved = replace(group, index=tuple(i + offset for i in group.index))
                merged.setdefault(group.key(), []).append(moved)
            offset += rows
        groups = tuple(
            ControlGroup(
                net=same[0].net,
                slot=same[0].slot,
                tokens=same[0].tokens,
                index=tuple(i for group in same for i in group.index),
                image=torch.cat([group.image for group in same]),
                scales=torch.cat([group.scales for group in same]),
                negative=torch.cat([group.negative for group in same]),
                window=torch.cat([group.window for group in same]),
                union_type=same[0].union_type,
            )
            for _, same in sorted(merged.items(), key=lambda item: item[0][0])  # by slot, stable
        )
        return ControlRows(offset, groups)


def control_residuals(
    control: ControlRows,
    model_in: Tensor,
    sigma: Tensor,
    timesteps: Tensor,
    embeds: Tensor,
    added: dict[str, Tensor] | None,
) -> tuple[list[Tensor], Tensor]:
    """The UNet's extra residuals for all ``2 * rows`` rows (prompts', then negative prompts'):
    each group's ControlNet on its rows, scaled per row, summed into zeros in unit order."""
    n = control.rows
    down: list[Tensor] | None = None
    mid: Tensor | None = None
    for group in control.groups:
        rows = torch.tensor(group.index, device=model_in.device)
        pick = torch.cat([rows, rows + n])
        sample = model_in.index_select(0, rows)
        image = torch.cat([group.image, group.image])
        union = {}
        if group.union_type is not None:  # one image of one control type, as diffusers' union pipeline gives it
            kinds = model_in.new_zeros((2 * len(group.index), group.net.config.num_control_type))
            kinds[:, group.union_type] = 1
            union = dict(controlnet_cond=[image], control_type=kinds, control_type_idx=[group.union_type])
        out_down, out_mid = group.net(
            torch.cat([sample, sample]),
            timesteps.index_select(0, pick),
            encoder_hidden_states=embeds.index_select(0, pick)[:, : group.tokens],
            **({"controlnet_cond": image} | union),
            conditioning_scale=1.0,
            added_cond_kwargs=None if added is None else {k: v.index_select(0, pick) for k, v in added.items()},
            return_dict=False,
        )
        row_sigma = sigma.index_select(0, rows).float()
        active = ((row_sigma <= group.window[:, 0]) & (row_sigma > group.window[:, 1])).float()
        factor = group.scales * active[:, None]
        factor = torch.cat([factor, factor * group.negative[:, None]])  # [2k, residuals]
        if down is None:
            down = [model_in.new_zeros((2 * n, *r.shape[1:])) for r in out_down]
            mid = model_in.new_zeros((2 * n, *out_mid.shape[1:]))
        for j, residual in enumerate(out_down):
            down[j] = down[j].index_add(0, pick, residual * _per_row(factor[:, j], residual))
        mid = mid.index_add(0, pick, out_mid * _per_row(factor[:, -1], out_mid))
    return down, mid


def _per_row(factor: Tensor, like: Tensor) -> Tensor:
    return factor.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def job_control(
    units: tuple[ControlUnit, ...],
    nets: ControlNets,
    *,
    rows: int,
    tokens: int,
    width: int,
    height: int,
    sigmas: Tensor,
    cross_attention_dim: int,
) -> tuple[ControlRows, list[Image.Image]]:
    """One job's ControlNet rows (every image uses every unit), and each unit's control map."""
    groups, maps = [], []
    for slot, unit in enumerate(units):
        if refusal := unit.refusal() or annotator_refusal(unit.module):
            raise GenerationError(refusal)
        net = nets.get(unit.model, cross_attention_dim)
        union_type = UNION_TYPES.get(unit.module) if is_union(net) else None
        if is_union(net) and union_type is None:
            raise GenerationError(
                f"The union ControlNet {unit.model!r} is told its control type by the preprocessor; "
                f"pick one of {', '.join(UNION_TYPES)}."
            )
        picture = control_map(open_image(unit.image, "control image"), unit.module, width, height, unit.resize_mode)
        maps.append(picture)
        # As diffusers' image processor (do_normalize=False): uint8 / 255 in float32.
        pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255.0
        device = next(net.parameters()).device
        high, low = sigma_window(sigmas, unit.guidance_start, unit.guidance_end)
        scales = torch.tensor(residual_scales(net, unit.weight, unit.control_mode), dtype=torch.float32)
        negative = 0.0 if unit.control_mode == CONTROL_MODES[2] else 1.0
        groups.append(
            ControlGroup(
                net=net,
                slot=slot,
                tokens=tokens,
                index=tuple(range(rows)),
                image=pixels[None].expand(rows, -1, -1, -1).to(device, net.dtype),
                scales=scales[None].expand(rows, -1).to(device),
                negative=torch.full((rows,), negative, device=device),
                window=torch.tensor([[high, low]], dtype=torch.float32).expand(rows, -1).to(device),
                union_type=union_type,
            )
        )
    return ControlRows(rows, tuple(groups)), maps
