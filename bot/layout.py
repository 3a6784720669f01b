"""The buttons under a job's messages, laid out within Discord's 5 rows of 5, and their /help text."""

from __future__ import annotations

from discord import ui

from bot import jobs, views_edit
from bot.reference_menu import UseAsReference
from bot.views import Cancel, Delete, Edit, Info, Reroll, Upscale, Vary
from bot.views_safety import Report, Reveal
from db.models import Job


def queued_view(job_id: int) -> ui.View:
    """The Cancel button on a job's status message."""
    view = ui.View(timeout=None)
    view.add_item(Cancel(job_id))
    return view


def result_view(job: Job, image_count: int, *, reveal: bool = False, words: bool = False) -> ui.View:
    """The buttons under a result, within Discord's 5 rows of 5: one image has its editing
    buttons (Vary (Region), Zoom Out, Make Square, Pan) on rows 3-4; a grid has a menu to pick
    the image to edit. Every result with images has Report; a blurred one (``reveal``) Reveal;
    ``words``: Edit with words among the editing buttons (an edit model is configured)."""
    view = ui.View(timeout=None)
    if image_count == 0:  # failed: nothing to vary or upscale
        for item in (Reroll(job.id, row=0), Edit(job.id, row=0), Info(job.id, row=0)):
            view.add_item(item)
        return view
    if image_count > 1:
        for item in (Reroll(job.id, row=0), Edit(job.id, row=0), Info(job.id, row=0), Delete(job.id, row=0)):
            view.add_item(item)
        view.add_item(Report(job.id, row=0))
        for i in range(image_count):
            view.add_item(Vary(job.id, i, jobs.GRID_VARIATION, grid=True, row=1))
        if reveal:  # at most 4 images: row 1 has room
            view.add_item(Reveal(job.id, row=1))
        for i in range(image_count):
            view.add_item(Upscale(job.id, i, grid=True, row=2))
        view.add_item(views_edit.PickImage(job.id, image_count, row=3))
        return view
    for item in (
        Reroll(job.id, row=0),
        Vary(job.id, 0, "subtle", grid=False, row=0),
        Vary(job.id, 0, "strong", grid=False, row=0),
        *(Upscale(job.id, 0, mode, row=0) for mode in jobs.UPSCALE_MODES),
        Edit(job.id, row=1),
        Info(job.id, row=1),
        Delete(job.id, row=1),
        Report(job.id, row=1),
        *([Reveal(job.id, row=1)] if reveal else []),
    ):
        view.add_item(item)
    views_edit.add_edit_buttons(view, job, 0, first_row=2, words=words)
    view.add_item(UseAsReference(job.id, 0, row=2))  # row 2 holds at most 4 editing buttons
    return view


def describe_buttons(upscaler: str = "Lanczos") -> str:
    """One line per button, for /help; ``upscaler``: what the U buttons upscale with here (Edit
    with words is told with the models, bot/texts.py)."""
    return "\n".join(
        [
            "🔁 **Reroll**: same settings, new seed. Adding a 🔁 reaction to a result does the same.",
            f"**Vary (subtle/strong)**, **V1-V4**: variation seed at strength "
            f"{jobs.VARIATION_STRENGTH['subtle']}/{jobs.VARIATION_STRENGTH['strong']}.",
            f"⬆️ **Upscale (Subtle)** / **(Creative)**: {jobs.UPSCALE_FACTOR:g}x by {upscaler}, within the size "
            f"limits; Creative then adds detail by img2img at strength {jobs.UPSCALE_STRENGTH}. "
            "**U1-U4** under a grid offer both for that image.",
            "✏️ **Edit**: change the prompts, keep the seed. ℹ️ **Info**: every parameter.",
            "🗑️ **Delete** and ✖️ **Cancel**: the requester or members with Manage Messages.",
            "🚩 **Report**: any member, once per result; enough reports hide it (blurred) until a "
            "moderator decides (`/server review`). 👁️ **Reveal** under a blurred result shows the "
            "original only in an age-restricted channel, or by DM to its requester where the server allows it.",
            "🖌️ **Vary (Region)**: pick squares of the image and a prompt; only they change. "
            "🔍 **Zoom Out 1.5x/2x**, ⬅️➡️⬆️⬇️ **Pan**, ⏹️ **Make Square**: a bigger canvas, its new part drawn to match.",
            "Anyone may press Reroll, Vary, Upscale, Edit and the editing buttons; the new job is theirs.",
        ]
    )
