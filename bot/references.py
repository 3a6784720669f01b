"""/imagine's reference image: a mode (edges, tile, style...) -> a ControlNet or IP-Adapter unit of the job's model.

Members pick what the reference should guide, not a ControlNet: each mode names the
preprocessor it needs and the words a ControlNet's name for it contains, which is how
AUTOMATIC1111's ControlNet extension filters its model list by control type
(``control_v11p_sd15_canny`` is an edges ControlNet, ``control_v11f1e_sd15_tile`` a tile one).
The ControlNets are the job's model's (``controlnet_dir`` in its config table), the first by
name that matches. A mode whose preprocessor is not installed, that the server turned off
(``/server references``), or that has no ControlNet for the model is refused with the modes
that can be used. ``style`` and ``subject`` go through the model's IP-Adapter (``ip_adapter`` in
its config table) instead, as a unit whose module says which blocks it feeds
(engine.features.ip_adapter), the way the A1111 extension runs IP-Adapters as units.

The reference is an upload like /img2img's: checked before it is downloaded, decoded by
:func:`bot.inputs.load_init_image` (non-images, bombs, truncated files refused alike) and, with
the init image if any, judged by the image filter before a job is stored (bot/service.py).
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import discord
from PIL import Image

from bot import policy
from bot.config import Config
from bot.inputs import PILLOW_FORMATS, BadInput, check_attachment_meta, load_init_image
from bot.policy import Asked
from db.community_values import ServerPolicy
from engine.control_units import IP_ADAPTER_MODULES, PREPROCESSORS, ControlUnit, controlnet_names
from engine.families import FAMILIES
from engine.features.annotators import control_map
from engine.params import GenerationParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceMode:
    module: str  # the preprocessor (engine.control_units.PREPROCESSORS when installed)
    words: tuple[str, ...]  # what the name of a ControlNet for it contains
    blurb: str  # for /help and the option's choices


REFERENCE_MODES: dict[str, ReferenceMode] = {
    "edges": ReferenceMode("canny", ("canny",), "its outlines (canny edges)"),
    "tile": ReferenceMode("tile", ("tile",), "its colours and layout, redrawn in detail"),
    "blur": ReferenceMode("blur", ("tile", "blur"), "its blurred colours and shapes"),
    "depth": ReferenceMode("depth", ("depth",), "its depth"),
    "pose": ReferenceMode("openpose", ("openpose", "pose"), "the pose of its people"),
    "lineart": ReferenceMode("lineart", ("lineart",), "its line art"),
    "softedge": ReferenceMode("softedge", ("softedge", "hed", "pidi"), "its soft edges"),
    "style": ReferenceMode("ip-adapter_style", (), "its style: colours, materials, mood (IP-Adapter)"),
    "subject": ReferenceMode("ip-adapter_clip", (), "its subject and composition (IP-Adapter)"),
}
DEFAULT_REFERENCE_MODE = "edges"
DEFAULT_REFERENCE_STRENGTH = 1.0


def controlnet_for(mode: str, controlnet_dir: str | Path, ip_adapter: str = "") -> str | None:
    """The first ControlNet of the folder (by name) made for ``mode``, or the model's IP-Adapter
    (its file's stem) for an IP-Adapter mode; None when there is none."""
    if REFERENCE_MODES[mode].module in IP_ADAPTER_MODULES:
        return Path(ip_adapter).stem if ip_adapter else None
    words = REFERENCE_MODES[mode].words
    return next((name for name in controlnet_names(controlnet_dir) if any(w in name.lower() for w in words)), None)


def installed(mode: str) -> bool:
    return REFERENCE_MODES[mode].module in PREPROCESSORS or REFERENCE_MODES[mode].module in IP_ADAPTER_MODULES


def usable_modes(controlnet_dir: str | Path, off: tuple[str, ...] = (), ip_adapter: str = "") -> list[str]:
    """Modes a member can use with this model here: installed preprocessor and ControlNet (or
    IP-Adapter), not off."""
    return [
        mode
        for mode in REFERENCE_MODES
        if installed(mode) and mode not in off and controlnet_for(mode, controlnet_dir, ip_adapter)
    ]


def reference_unit(
    mode: str | None,
    strength: float | None,
    image_png: bytes,
    controlnet_dir: str | Path,
    off: tuple[str, ...] = (),
    *,
    family_label: str | None = None,
    ip_adapter: str = "",
) -> ControlUnit:
    """The job's ControlNet (or IP-Adapter) unit for a reference in ``mode``, or BadInput saying what to do."""
    mode = mode or DEFAULT_REFERENCE_MODE
    if family_label is not None:
        raise BadInput(f"References guide SD 1.x and SDXL models, not {family_label} ones; pick such a model.")
    usable = usable_modes(controlnet_dir, off, ip_adapter)
    choices = f"reference modes you can use here: {', '.join(usable)}." if usable else "none can be used here."
    if mode not in REFERENCE_MODES:
        raise BadInput(f"Unknown reference mode {mode!r}; {choices}")
    if mode in off:
        raise BadInput(f"This server has turned the {mode} reference off; {choices}")
    spec = REFERENCE_MODES[mode]
    if not installed(mode):
        raise BadInput(f"The {mode} reference needs the {spec.module} annotator, which is not installed; {choices}")
    name = controlnet_for(mode, controlnet_dir, ip_adapter)
    if name is None:
        what = "IP-Adapter" if spec.module in IP_ADAPTER_MODULES else "ControlNet"
        raise BadInput(f"No {what} for {mode} is installed for this model; {choices}")
    return ControlUnit(
        name, image_png, spec.module, weight=DEFAULT_REFERENCE_STRENGTH if strength is None else strength
    )


class Downloads(Protocol):
    """What loading a reference needs of the job service (bot/service.py)."""

    config: Config
    allowed_hosts: frozenset[str]

    async def download(self, url: str, max_bytes: int) -> bytes: ...


async def load_reference(
    service: Downloads, reference: discord.Attachment, asked: Asked, server: ServerPolicy, params: GenerationParams
) -> GenerationParams:
    """``params`` with the reference's unit; the upload checked as /img2img's are (its PNG, decoded
    safely, is the unit's image; the image filter judges it with the job's other uploads)."""
    config, dc = service.config, service.config.discord
    check_attachment_meta(
        filename=reference.filename,
        content_type=reference.content_type,
        size=reference.size,
        url=reference.url,
        allowed_types=dc.allowed_image_types,
        max_bytes=dc.max_attachment_bytes,
        allowed_hosts=service.allowed_hosts,
    )
    gen = config.generation_for(params.model)
    traits = FAMILIES.get(gen.family)
    label = traits.label if traits is not None and traits.flow else None
    model = config.model_settings(params.model)
    # The mode is checked before the download: a refusal costs the member no wait.
    reference_unit(
        asked.reference_mode,
        asked.reference_strength,
        b"",
        model.controlnet_dir,
        server.reference_modes_off,
        family_label=label,
        ip_adapter=model.ip_adapter,
    )
    data = await service.download(reference.url, dc.max_attachment_bytes)
    max_width, max_height = policy.max_size(server, gen)
    image = await asyncio.to_thread(
        load_init_image,
        data,
        size=None,
        max_width=max_width,
        max_height=max_height,
        target_area=params.width * params.height,
        formats=tuple(PILLOW_FORMATS[t] for t in dc.allowed_image_types),
        multiple=gen.pixel_multiple,
    )
    unit = reference_unit(
        asked.reference_mode,
        asked.reference_strength,
        image.png,
        model.controlnet_dir,
        server.reference_modes_off,
        ip_adapter=model.ip_adapter,
    )
    return params.but(control_units=(unit,))


def control_map_files(params: GenerationParams) -> list[discord.File]:
    """Each unit's control map as the ControlNet will see it, at the job's size (PNG files)."""
    files = []
    for index, unit in enumerate(control_net_units(params)):
        image = Image.open(io.BytesIO(unit.image))
        picture = control_map(image, unit.module, params.width, params.height, unit.resize_mode)
        out = io.BytesIO()
        picture.save(out, "PNG")
        out.seek(0)
        files.append(discord.File(out, filename=f"control-map-{index}.png"))
    return files


def control_net_units(params: GenerationParams) -> list[ControlUnit]:
    """The job's ControlNet units (an IP-Adapter reference has no control map: its image is read whole)."""
    return [unit for unit in params.control_units if unit.module not in IP_ADAPTER_MODULES]


async def show_control_maps(interaction: discord.Interaction, params: GenerationParams) -> None:
    """The reply's preview of what guides the job (only the member sees it); a failure to show it
    leaves the job queued."""
    if not control_net_units(params):
        return
    files = await asyncio.to_thread(control_map_files, params)
    what = ", ".join(f"{unit.module} for {unit.model}" for unit in control_net_units(params))
    try:
        await interaction.followup.send(
            f"Your reference as the ControlNet sees it ({what}):", files=files, ephemeral=True
        )
    except discord.HTTPException as e:
        log.info("could not show the control map: %s", e)
