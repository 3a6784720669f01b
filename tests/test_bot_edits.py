"""Midjourney's editing buttons and /inpaint, end to end: Vary (Region), Zoom Out, Pan, Make Square."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from bot_harness import bot_running, is_result, png, results, setup  # noqa: F401 - setup is a fixture
from db.models import JobKind
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


def job_of(message) -> int:
    return int(re.search(r"sd:reroll:(\d+)", " ".join(message.custom_ids))[1])


async def wait_result(emu, pred=lambda m: True):
    return await emu.wait_for(
        lambda: next((m for m in reversed(results(emu)) if pred(m)), None), what="a posted result", timeout=300
    )


def rows_of(message) -> int:
    return len(message.components)


async def test_zoom_pan_and_square_queue_bigger_canvases_that_keep_the_image(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse"})
        await ix.wait_ack()
        first = await wait_result(emu)
        parent = job_of(first)
        ids = set(first.custom_ids)
        assert {
            f"sd:region:{parent}:0",
            f"sd:zoom:{parent}:0:15",
            f"sd:zoom:{parent}:0:20",
            *(f"sd:pan:{parent}:0:{side}" for side in ("left", "right", "up", "down")),
        } <= ids
        assert f"sd:square:{parent}:0" not in ids  # a square image has nothing to square
        assert rows_of(first) <= 5 and all(len(row["components"]) <= 5 for row in first.components)

        await emu.click(emu.bob, first, f"sd:zoom:{parent}:0:20")
        zoomed = await wait_result(emu, lambda m: job_of(m) != parent)
        await emu.click(emu.bob, first, f"sd:pan:{parent}:0:right")
        panned = await wait_result(emu, lambda m: job_of(m) not in (parent, job_of(zoomed)))
        square = f"sd:square:{job_of(panned)}:0"
        assert square in panned.custom_ids  # the pan made it wide
    zoom_job, pan_job = queue.get(job_of(zoomed)), queue.get(job_of(panned))
    assert (zoom_job.kind, zoom_job.width, zoom_job.height) == (JobKind.zoom, 128, 128)
    assert (pan_job.kind, pan_job.width, pan_job.height) == (JobKind.pan, 96, 64)
    assert zoom_job.mask is not None and zoom_job.requester_id == emu.bob.id
    original = Image.open(io.BytesIO(queue.images(parent)[0].png)).convert("RGB")
    canvas = Image.open(io.BytesIO(pan_job.init_image)).convert("RGB")
    assert canvas.crop((0, 0, 64, 64)).tobytes() == original.tobytes()  # the image kept its place
    result = Image.open(io.BytesIO(queue.images(pan_job.id)[0].png))
    assert result.size == (96, 64)


async def test_vary_region_asks_for_squares_then_a_prompt(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse"})
        await ix.wait_ack()
        first = await wait_result(emu)
        parent = job_of(first)
        press = await emu.click(emu.bob, first, f"sd:region:{parent}:0")
        picker = await press.wait_response(lambda m: m.ephemeral)
        assert picker.attachments and f"sd:cells:{parent}:0" in picker.custom_ids
        chosen = await emu.click(emu.bob, picker, f"sd:cells:{parent}:0", values=["1", "2"])
        assert await chosen.wait_ack() == 9  # the prompt form
        submitted = await emu.submit_modal(emu.bob, chosen, {"Prompt for the chosen squares": "a red door"})
        await submitted.wait_response(lambda m: "queued" in m.content)
    job = queue.get(parent + 1)  # the next job made (Bob's only one)
    assert (
        job.requester_id == emu.bob.id
        and job.kind is JobKind.region
        and job.prompt == "a red door"
        and job.mask is not None
    )
    mask = Image.open(io.BytesIO(job.mask)).convert("L")
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((60, 60)) == 0  # square 1 changes, square 9 stays


async def test_a_grid_offers_each_image_s_editing_buttons_through_a_menu(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse", "count": 2})
        await ix.wait_ack()
        grid = await wait_result(emu)
        parent = job_of(grid)
        assert f"sd:pick:{parent}" in grid.custom_ids and rows_of(grid) <= 5
        picked = await emu.click(emu.bob, grid, f"sd:pick:{parent}", values=["1"])
        answer = await picked.wait_response(lambda m: m.ephemeral)
    assert {f"sd:region:{parent}:1", f"sd:zoom:{parent}:1:15", f"sd:pan:{parent}:1:up"} <= set(answer.custom_ids)


def mask_png(size, box=None, fill=255) -> bytes:
    mask = Image.new("L", size, 0 if box else fill)
    if box:
        mask.paste(255, box)
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


async def test_inpaint_takes_a_mask_and_refuses_masks_that_select_nothing_or_everything(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, None):
        image = emu.attachment("photo.png", png((64, 64)), "image/png")
        good = emu.attachment("mask.png", mask_png((32, 32), (0, 0, 16, 16)), "image/png")
        ix = await emu.slash(emu.alice, "inpaint", {"prompt": "a cat"}, attachments={"image": image, "mask": good})
        await ix.wait_response(lambda m: "queued" in m.content)
        for mask, expected in (
            (mask_png((64, 64), fill=0), "selects nothing"),
            (mask_png((64, 64), fill=255), "the whole image"),
        ):
            ix = await emu.slash(
                emu.alice,
                "inpaint",
                {"prompt": "a cat"},
                attachments={
                    "image": emu.attachment("photo.png", png((64, 64)), "image/png"),
                    "mask": emu.attachment("mask.png", mask, "image/png"),
                },
            )
            assert expected in (await ix.wait_response(lambda m: m.ephemeral)).content
    (job,) = queue.pending_for(emu.alice.id)
    assert job.kind is JobKind.inpaint
    mask = Image.open(io.BytesIO(job.mask))
    assert mask.size == (job.width, job.height) and mask.getpixel((0, 0)) == 255
    assert mask.getpixel((job.width - 1, job.height - 1)) == 0
