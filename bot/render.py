"""Pure functions from a job (and its images) to the parts of a Discord message.

No I/O and no state: delivery and the commands call these and send what comes back. Everything
echoed from a member (prompts) is escaped, and messages are sent with mentions switched off
except for the requester, so a prompt can never ping anyone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import discord
from PIL import Image, PngImagePlugin

from db.models import Job, JobKind, JobStatus, ResultImage
from engine.control_units import IP_ADAPTER_MODULES, units_from_column
from engine.params import SCHEDULE_NAMES
from engine.types import SAMPLER_NAMES

#: Discord's limits on uploads: per file (default, without boosts) and per request.
FILE_LIMIT = 10 * 1024 * 1024
REQUEST_LIMIT = 25 * 1024 * 1024
COLOR_DONE = discord.Colour(0x5865F2)
COLOR_FAILED = discord.Colour(0xED4245)

_KIND_LABEL = {
    JobKind.reroll: "reroll of",
    JobKind.variation: "variation of",
    JobKind.upscale: "upscale of",
    JobKind.edit: "edit of",
    JobKind.region: "region of",
    JobKind.zoom: "zoom out of",
    JobKind.pan: "pan of",
    JobKind.square: "square of",
}


def escape(text: str) -> str:
    """Text a member typed, made safe to echo: no markdown tricks, no mentions."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def excerpt(text: str, limit: int = 80) -> str:
    text = text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
    return escape(text)


def job_title(job: Job) -> str:
    """``Job #12`` or ``Job #12 (reroll of #7)``."""
    label = _KIND_LABEL.get(job.kind)
    if label and job.parent_id:
        return f"Job #{job.id} ({label} #{job.parent_id})"
    return f"Job #{job.id}"


def queued_text(job: Job, position: int | None) -> str:
    place = f"place **{position}** in line" if position else "waiting"
    return f"🕒 **{job_title(job)}** queued, {place}: {excerpt(job.prompt)}"


def running_text(job: Job, step: int, total: int) -> str:
    bar = _bar(step / total if total else 0.0)
    return f"🎨 **{job_title(job)}** step {step}/{total} {bar}: {excerpt(job.prompt)}"


def finished_text(job: Job, jump_url: str | None) -> str:
    """What the status message says once the job has finished."""
    if job.status is JobStatus.done:
        where = f" → {jump_url}" if jump_url else ""
        return f"✅ **{job_title(job)}** done{where}"
    if job.status is JobStatus.cancelled:
        return f"🚫 **{job_title(job)}** was cancelled."
    return f"⚠️ **{job_title(job)}** failed: {escape(job.error or 'unknown error')}"


def _bar(fraction: float, width: int = 10) -> str:
    filled = min(width, max(0, round(fraction * width)))
    return "`" + "█" * filled + "░" * (width - filled) + "`"


def parameter_lines(job: Job, model_name: str) -> list[tuple[str, str]]:
    """(name, value) pairs of everything that made the image, for embeds and /info.
    ``model_name``: the default model's, shown for jobs that did not name one."""
    pairs = [
        ("Seed", str(job.seed) if job.count == 1 else f"{job.seed}–{job.seed + job.count - 1}"),
        ("Steps", str(job.steps)),
        ("Guidance", f"{job.guidance:g}"),
        ("Sampler", SAMPLER_NAMES.get(job.sampler, job.sampler)),
        ("Size", f"{job.width}x{job.height}"),
        ("Model", escape(job.model or model_name or "?")),
    ]
    if job.upscaler:  # the U buttons: which upscaler, and whether img2img ran over its image
        how = "alone (Subtle)" if job.upscale_only else f"then img2img at {job.strength:g} (Creative)"
        pairs.append(("Upscaler", f"{escape(job.upscaler)}, {how}"))
    elif job.init_image is not None:
        pairs.append(("Strength", f"{job.strength:g}"))
    if job.schedule and job.schedule != "automatic":
        pairs.append(("Schedule", SCHEDULE_NAMES.get(job.schedule, job.schedule)))
    if (job.clip_skip or 1) > 1:
        pairs.append(("Clip skip", str(job.clip_skip)))
    if job.hires_scale and job.hires_scale > 1 and job.init_image is None:
        steps = f", {job.hires_steps} steps" if job.hires_steps else ""
        pairs.append(("Hires", f"{job.hires_scale:g}× {job.hires_upscaler}, strength {job.hires_strength:g}{steps}"))
    if job.variation_seed is not None and job.variation_strength:
        pairs.append(("Variation", f"seed {job.variation_seed}, strength {job.variation_strength:g}"))
    if job.chaos is not None:  # Midjourney's --chaos: each image the seed's, mixed with its own
        pairs.append(("Chaos", f"{job.chaos} (variation strength {job.chaos / 100:g} from seed {job.seed})"))
    if job.tiling:
        pairs.append(("Tiling", "seamless (--tile)"))
    for index, unit in enumerate(units_from_column(job.control_units)):  # a reference's ControlNet
        window = (
            f", steps {unit.guidance_start:g}–{unit.guidance_end:g}"
            if (unit.guidance_start, unit.guidance_end) != (0, 1)
            else ""
        )
        pairs.append(
            (
                "IP-Adapter" if unit.module in IP_ADAPTER_MODULES else f"ControlNet {index}",
                f"{escape(unit.model)} ({unit.module}), weight {unit.weight:g}{window}, {unit.control_mode}",
            )
        )
    return pairs


def info_text(job: Job, model_name: str, position: int | None = None) -> str:
    """Every parameter of a job, its status and id (for ℹ️ Info and /info)."""
    status = job.status.value
    if job.status is JobStatus.queued and position:
        status += f", place {position} in line"
    if job.error:
        status += f": {escape(job.error)}"
    lines = [f"**{job_title(job)}** by <@{job.requester_id}>: {status}", f"**Prompt:** {escape(job.prompt)}"]
    if job.prompt_template is not None:  # the first image's pick above; each image draws its own
        lines.append(f"**Template:** {clip(escape(job.prompt_template), 600)} (each image's pick by its seed)")
    if job.negative_prompt:
        lines.append(f"**Negative:** {escape(job.negative_prompt)}")
    lines += [f"**{name}:** {value}" for name, value in parameter_lines(job, model_name)]
    lines.append(f"**Kind:** {job.kind.value}, {job.count} image{'s' if job.count > 1 else ''}")
    if job.safety_flagged is not None:
        check = f"**Image check:** {'flagged, ' if job.safety_flagged else ''}{safety_text(job)}"
        check += f" → {job.safety_action}" if job.safety_action else ""
        check += f" ({job.safety_review})" if job.safety_review else ""
        lines.append(check)
    return clip("\n".join(lines), 2000)


@dataclass
class ResultMessage:
    content: str
    embed: discord.Embed
    files: list[discord.File] = field(default_factory=list)


def result_message(job: Job, images: Sequence[ResultImage], model_name: str, *, spoiler: bool = False) -> ResultMessage:
    """The message that shows a finished job: mention, embed with the parameters, PNG files
    (behind spoiler tags, and not shown in the embed, when ``spoiler``)."""
    files = result_files(job, images, spoiler=spoiler)
    embed = discord.Embed(description=clip(escape(job.prompt), 4000), colour=COLOR_DONE)
    if job.negative_prompt:
        embed.add_field(name="Negative", value=clip(escape(job.negative_prompt), 1000), inline=False)
    for name, value in parameter_lines(job, model_name):
        embed.add_field(name=name, value=value, inline=True)
    embed.set_footer(text=job_title(job))
    if files and not spoiler:
        embed.set_image(url=f"attachment://{files[0].filename}")
    content = f"<@{job.requester_id}>"
    if len(files) < len(images) + (1 if len(images) > 1 else 0):
        content += " (some images were too large to attach)"
    return ResultMessage(content=content, embed=embed, files=files)


def withheld_message(job: Job) -> ResultMessage:
    """The message in place of a result the server's image policy withholds here."""
    embed = discord.Embed(description=clip(escape(job.prompt), 4000), colour=COLOR_FAILED)
    embed.set_footer(text=job_title(job))
    return ResultMessage(content=f"<@{job.requester_id}> {withheld_line(job)}", embed=embed)


def withheld_line(job: Job) -> str:
    """One line telling the requester their result is withheld, and why."""
    return (
        f"**{job_title(job)}**: the image was withheld by this server's image filter ({safety_text(job)}); "
        "its moderators can review it."
    )


def safety_text(job: Job) -> str:
    """``nsfw 93%`` / ``clean`` / ``could not be checked`` / ``not checked``."""
    if job.safety_flagged is None:
        return "not checked"
    if job.safety_label == "unclassified":
        return "could not be checked"
    if job.safety_label is None or job.safety_score is None:
        return "clean"
    return f"{escape(job.safety_label)} {job.safety_score:.0%}"


def failure_message(job: Job) -> ResultMessage:
    """The message that tells the requester a job failed or was cancelled, and why."""
    if job.status is JobStatus.cancelled:
        reason = "was cancelled"
    else:
        reason = f"failed: {escape(job.error or 'unknown error')}"
    embed = discord.Embed(description=clip(escape(job.prompt), 4000), colour=COLOR_FAILED)
    embed.set_footer(text=job_title(job))
    return ResultMessage(content=f"<@{job.requester_id}> **{job_title(job)}** {reason}", embed=embed)


def result_files(job: Job, images: Sequence[ResultImage], *, spoiler: bool = False) -> list[discord.File]:
    """PNG files to attach: one image as is, or a grid first and then the single images.

    The single PNGs are sent byte for byte, so their metadata (parameters, job id) stays.
    Files over Discord's limits are left out rather than failing the whole post.
    """
    images = sorted(images, key=lambda im: im.index)
    named = [(f"sd_{job.id}_{im.seed}.png", im.png) for im in images]
    if len(images) > 1:
        named.insert(0, (f"sd_{job.id}_grid.png", make_grid([im.png for im in images])))
    files, total = [], 0
    for name, data in named:
        if len(data) > FILE_LIMIT or total + len(data) > REQUEST_LIMIT:
            continue
        total += len(data)
        files.append(discord.File(io.BytesIO(data), filename=name, spoiler=spoiler))
    return files


def make_grid(pngs: Sequence[bytes]) -> bytes:
    """The images side by side (two columns for four, else one row), as a PNG that keeps the
    first image's ``parameters`` text."""
    images = [Image.open(io.BytesIO(png)) for png in pngs]
    cols = 2 if len(images) == 4 else len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    info = PngImagePlugin.PngInfo()
    parameters = images[0].info.get("parameters")
    if parameters:
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    grid.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
