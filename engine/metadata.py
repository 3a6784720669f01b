"""Generation parameters inside the PNG, in the format AUTOMATIC1111 writes ("infotext").

A PNG dropped into AUTOMATIC1111's "PNG Info" tab, ComfyUI or civitai shows its prompt and
settings because of one ``tEXt`` chunk named ``parameters``::

    a red fox
    Negative prompt: blurry
    Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512,
    Model hash: 6ce0161689, Model: sd15, RNG: CPU, Job id: 3

We write that, plus a ``job_id`` chunk of our own so a posted image leads back to its job.

The fields are the ones AUTOMATIC1111 (v1.9 and later) needs to make the same image again:

- ``Sampler`` and ``Schedule type`` are two fields there (:data:`INFOTEXT_SAMPLERS`); "Automatic"
  is what it writes for a sampler run on its default schedule.
- ``RNG: CPU``: our initial and ancestral noise is drawn from CPU generators, which is A1111's
  "CPU" noise source; a missing field reads there as its default GPU noise, a different image.
- ``Model hash``: A1111's short hash of a single-file checkpoint (:mod:`engine.hashes`); left out
  for a diffusers folder or a hub id, which A1111 has no hash for.
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image, PngImagePlugin

from engine.params import SCHEDULE_NAMES
from engine.types import GenerationRequest

#: zlib's level for the PNGs we write (``engine.png_compress_level``). Measured on this project's
#: CPU machine for a smooth 512x512 image: 21 ms at level 1, 69 ms at Pillow's default 6, for a
#: file 16% larger (452 against 388 KiB); a grainy image gains less (58 against 66 ms).
PNG_COMPRESS_LEVEL = 1

# One "Key: value" field of the last line; values with commas are JSON-quoted (as AUTOMATIC1111 does).
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


#: Our sampler id -> (``Sampler``, ``Schedule type``) as AUTOMATIC1111 >= 1.9 writes them. A
#: sampler whose A1111 default schedule is the one we run says "Automatic", as A1111 itself does
#: for its defaults (Euler, Euler a and DDIM have none of their own; DPM++ 2M defaults to Karras,
#: and A1111 writes the resolved schedule then).
INFOTEXT_SAMPLERS: dict[str, tuple[str, str]] = {
    "euler": ("Euler", "Automatic"),
    "euler_a": ("Euler a", "Automatic"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Automatic"),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "Automatic"),
    "dpmpp_sde": ("DPM++ SDE", "Automatic"),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", "Automatic"),
    "heun": ("Heun", "Automatic"),
    "lms": ("LMS", "Automatic"),
    "dpm2": ("DPM2", "Automatic"),
    "dpm2_a": ("DPM2 a", "Automatic"),
    "lcm": ("LCM", "Automatic"),
    "unipc": ("UniPC", "Automatic"),
}

#: Our noise is A1111's "CPU" noise source (see the module docstring).
RNG_SOURCE = "CPU"


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": what people type and what other tools parse back."""
    return f"{value:g}"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def infotext(
    request: GenerationRequest,
    seed: int,
    model_name: str,
    model_hash: str | None = None,
    *,
    guidance: str = "cfg",
    flow: bool = False,
    control_labels: tuple[str, ...] = (),
) -> str:
    """AUTOMATIC1111 infotext for one image of ``request`` (made with ``seed``), fields in A1111's order.

    ``model_hash``: the checkpoint file's short hash, None for a model that is not one file.
    ``guidance`` (engine.families.GUIDANCE_KINDS) and ``flow``: how Forge writes SD 3.5 and Flux
    (:func:`guidance_fields`). ``control_labels``: each ControlNet unit's model as the extension
    names it (``name [hash]``), for its ``ControlNet N`` fields.
    """
    sampler, schedule_type = INFOTEXT_SAMPLERS.get(request.params.sampler, (request.params.sampler, "Automatic"))
    if request.params.schedule != "automatic":  # a schedule type the member chose
        schedule_type = SCHEDULE_NAMES.get(request.params.schedule, request.params.schedule)
    if flow:
        schedule_type = FLOW_SCHEDULE_TYPE
    fields: dict[str, str] = {
        "Steps": str(request.params.steps),
        "Sampler": sampler,
        "Schedule type": schedule_type,
        **guidance_fields(request.params.guidance, guidance),
        "Seed": str(seed if request.params.chaos is None else request.params.seed),
        "Size": f"{request.params.width}x{request.params.height}",
    }
    upscaled = upscale_fields(request.params)
    if upscaled:  # the upscaled image's parameters are its source's, as AUTOMATIC1111 writes them
        fields["Size"] = upscaled.pop("Size")
    if model_hash:
        fields["Model hash"] = model_hash
    fields["Model"] = _quote(model_name)
    if request.params.is_masked:
        fields |= inpainting_fields(request.params)
    if request.params.chaos is not None:  # Midjourney's chaos: the job's seed mixed with the image's own
        fields["Variation seed"] = str(seed)
        fields["Variation seed strength"] = _number(request.params.chaos / 100)
    elif request.params.variation_seed is not None and request.params.variation_strength > 0:
        fields["Variation seed"] = str(request.params.variation_seed + (seed - request.params.seed))
        fields["Variation seed strength"] = _number(request.params.variation_strength)
    if request.is_img2img and not request.params.upscale_only:
        fields["Denoising strength"] = _number(request.params.strength)
    elif request.params.is_hires:  # AUTOMATIC1111 writes the second pass's strength in the same field
        fields["Denoising strength"] = _number(request.params.hires_strength)
    fields |= upscaled
    if request.params.clip_skip > 1:  # A1111 writes it only when it is not the default
        fields["Clip skip"] = str(request.params.clip_skip)
    fields["RNG"] = RNG_SOURCE
    if request.params.tiling:
        fields["Tiling"] = "True"
    for index, (unit, label) in enumerate(zip(request.params.control_units, control_labels, strict=False)):
        fields[f"ControlNet {index}"] = _quote(unit.infotext(label))  # the extension's extra parameters
    if request.params.is_hires:
        fields |= hires_fields(request.params)
    fields["Job id"] = str(request.job_id)
    if request.parent_id is not None:  # the image an edit, zoom, pan or reroll was made from
        fields["Parent job id"] = str(request.parent_id)
    lines = [request.params.image_prompt(seed)]  # a Dynamic Prompts template: this image's pick
    if request.params.negative_prompt:
        lines.append(f"Negative prompt: {request.params.negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


#: Forge's name for the flow families' schedule: its "Simple" walks the same shifted sigmas
#: (exactly, for Flux dev at 1024x1024, whose shift Forge fixes at that size's).
FLOW_SCHEDULE_TYPE = "Simple"


def guidance_fields(scale: float, guidance: str) -> dict[str, str]:
    """``CFG scale``, and Forge's ``Distilled CFG Scale`` for a guidance-distilled model (Flux dev),
    whose CFG scale is then 1 as Forge runs it (``modules/processing.py``: ``create_infotext``);
    Flux schnell takes no guidance (CFG scale 1, nothing distilled)."""
    if guidance == "distilled":
        return {"CFG scale": "1", "Distilled CFG Scale": _number(scale)}
    if guidance == "none":
        return {"CFG scale": "1"}
    return {"CFG scale": _number(scale)}


def hires_fields(params) -> dict[str, str]:
    """AUTOMATIC1111's hires fix fields (``StableDiffusionProcessingTxt2Img.init``), in its order;
    ``Hires steps`` only when it is not "same as the first pass" (0)."""
    fields = {"Hires upscale": _number(params.hires_scale)}
    if params.hires_steps:
        fields["Hires steps"] = str(params.hires_steps)
    fields["Hires upscaler"] = _quote(params.hires_upscaler)
    return fields


def upscale_fields(params) -> dict[str, str]:
    """The upscaler's fields, with ``Size`` the source image's, or {} for a job without one.

    "Upscale (Subtle)" (the upscaler alone) is AUTOMATIC1111's extras tab: ``Postprocess upscale
    by`` (or ``to``, for a size that is not an exact multiple) and ``Postprocess upscaler``.
    "Upscale (Creative)" (the upscaler, then img2img at the denoising strength) is what its hires
    fix does after the first pass: ``Hires upscale`` (or ``Hires resize-1/-2``) and ``Hires upscaler``.
    """
    if not params.upscaler or params.init_image is None:
        return {}
    with Image.open(io.BytesIO(params.init_image)) as source:  # the header only
        width, height = source.size
    factor = params.width / width
    exact = params.height == round(height * factor)  # the same factor both ways
    fields = {"Size": f"{width}x{height}"}
    if params.upscale_only:
        if exact:
            fields["Postprocess upscale by"] = _number(round(factor, 4))
        else:
            fields["Postprocess upscale to"] = f"{params.width}x{params.height}"
        fields["Postprocess upscaler"] = _quote(params.upscaler)
        return fields
    if exact:
        fields["Hires upscale"] = _number(round(factor, 4))
    else:
        fields["Hires resize-1"], fields["Hires resize-2"] = str(params.width), str(params.height)
    fields["Hires upscaler"] = _quote(params.upscaler)
    return fields


def inpainting_fields(params) -> dict[str, str]:
    """AUTOMATIC1111's fields for a masked job, with its keys and its habit of leaving defaults out
    (``StableDiffusionProcessingImg2Img.init``): no blur, "Whole picture" and "original" are unwritten."""
    fields = {}
    if params.mask_blur > 0:
        fields["Mask blur"] = str(params.mask_blur)
    if params.inpaint_full_res:
        fields["Inpaint area"] = "Only masked"
        fields["Masked area padding"] = str(params.inpaint_padding)
    if params.masked_content != "original":
        fields["Masked content"] = params.masked_content
    return fields


def encode_png(image: Image.Image, infotext: str, job_id: int, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes carrying ``infotext`` in ``parameters`` and ``job_id`` in its own chunk.

    ``compress_level`` is zlib's, 0-9 (``engine.png_compress_level``); the pixels are the same at
    every level, only the file's size and the time to write it change.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    info.add_text("job_id", str(job_id))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> ``{"Prompt": ..., "Negative prompt": ..., "Steps": "25", ...}`` (values as written)."""
    *prompt_lines, last = text.strip().split("\n")
    found = _FIELD.findall(last)
    fields = dict(found) if len(found) >= 3 else {}
    if not fields:  # no settings line: the whole text is the prompt
        prompt_lines.append(last)
    prompt, negative, in_negative = [], [], False
    for line in prompt_lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in fields.items():
        result[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return result


def read_parameters(png_bytes: bytes) -> dict[str, str]:
    """Read back what :func:`encode_png` wrote: the parsed infotext plus ``job_id`` (when present)."""
    with Image.open(io.BytesIO(png_bytes)) as image:
        chunks = dict(getattr(image, "text", {}))
    result = parse_infotext(chunks.get("parameters", ""))
    if "job_id" in chunks:
        result["job_id"] = chunks["job_id"]
    return result
