"""The bot end to end: the real discord.py client over sockets against the local Discord
emulator, the engine on the tiny model, and a temporary SQLite queue."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot_harness import bot_running, is_result, results, setup  # noqa: F401 - setup is a fixture
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.metadata import read_parameters

pytestmark = pytest.mark.asyncio


async def test_imagine_posts_result_with_buttons(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a red cube @everyone", "seed": 42})
        assert await ix.wait_ack() == 5
        assert ix.ack_latency < 3.0
        status = await ix.wait_response(lambda m: "queued" in m.content or "step" in m.content or "done" in m.content)
        assert "Job #" in status.content
        posted = await emu.wait_for_message(emu.general, is_result, timeout=30)
        assert posted.pinged_users == {emu.alice.id} and not posted.pinged_everyone
        png_bytes = posted.attachments[0].data
        params = read_parameters(png_bytes)
        assert params
        assert "42" in str(params)
        assert any(cid.startswith("sd:reroll:") for cid in posted.custom_ids)
        await emu.wait_for(lambda: "done" in ix.original.content, timeout=10, what="status done")


async def wait_result(emu: Emulator, pred=lambda m: True, timeout: float = 30):
    return await emu.wait_for_message(emu.general, lambda m: is_result(m) and pred(m), timeout=timeout)


def job_of(message) -> int:
    return int(next(cid for cid in message.custom_ids if cid.startswith("sd:reroll:")).split(":")[2])


async def test_grid_buttons_make_the_right_jobs(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "two cats", "count": 2, "seed": 7})
        await ix.wait_ack()
        grid = await wait_result(emu)
        parent = job_of(grid)
        names = [a.filename for a in grid.attachments]
        assert names[0].endswith("_grid.png") and len(names) == 3
        assert Image.open(io.BytesIO(grid.attachments[0].data)).size == (128, 64)
        assert {
            f"sd:vary:{parent}:0:strong",
            f"sd:vary:{parent}:1:strong",
            f"sd:up:{parent}:0",
            f"sd:up:{parent}:1",
        } <= set(grid.custom_ids)

        # Bob rerolls Alice's grid: the new job is Bob's, same prompt, another seed.
        click = await emu.click(emu.bob, grid, f"sd:reroll:{parent}")
        await click.wait_ack()
        reroll = await wait_result(emu, lambda m: job_of(m) != parent)
        job = queue.get(job_of(reroll))
        assert job.requester_id == emu.bob.id and job.parent_id == parent
        assert job.kind.value == "reroll" and job.prompt == "two cats" and job.count == 2
        assert reroll.pinged_users == {emu.bob.id}

        # V2: a variation of the second image (seed 8), with a variation seed.
        await emu.click(emu.alice, grid, f"sd:vary:{parent}:1:strong")
        vary = await wait_result(emu, lambda m: queue.get(job_of(m)).kind.value == "variation")
        job = queue.get(job_of(vary))
        assert job.seed == 8 and job.variation_seed is not None and job.variation_strength == 0.5

        # U1 offers, to Alice only, the two upscales of the first image; Creative is 2x by the
        # upscaler (Lanczos: none is configured), then img2img over it.
        press = await emu.click(emu.alice, grid, f"sd:up:{parent}:0")
        offer = await press.wait_response(lambda m: m.ephemeral)
        assert {f"sd:up:{parent}:0:subtle", f"sd:up:{parent}:0:creative"} == set(offer.custom_ids)
        await emu.click(emu.alice, offer, f"sd:up:{parent}:0:creative")
        up = await wait_result(emu, lambda m: queue.get(job_of(m)).kind.value == "upscale")
        job = queue.get(job_of(up))
        assert (job.width, job.height, job.count, job.seed) == (128, 128, 1, 7)
        assert (job.upscaler, job.upscale_only) == ("Lanczos", False)
        assert Image.open(io.BytesIO(job.init_image)).size == (64, 64)  # the engine enlarges it
        assert Image.open(io.BytesIO(up.attachments[0].data)).size == (128, 128)

        # Upscaling the upscale again is refused: 128 is the largest size here.
        again = await emu.click(emu.alice, up, f"sd:up:{job.id}:0:subtle")
        message = await again.wait_response()
        assert message.ephemeral and "largest size" in message.content

        # Info: ephemeral, with every parameter.
        info = await emu.click(emu.bob, grid, f"sd:info:{parent}")
        message = await info.wait_response()
        assert message.ephemeral and "two cats" in message.content and "Seed" in message.content

        # Delete: not for Bob; for Alice.
        denied = await emu.click(emu.bob, grid, f"sd:del:{parent}")
        assert (await denied.wait_response()).ephemeral and not grid.deleted
        await emu.click(emu.alice, grid, f"sd:del:{parent}")
        await emu.wait_for(lambda: grid.deleted, what="grid deleted")

    # Each job posted exactly once.
    per_job = [job_of(m) for m in results(emu)] + [parent]
    assert len(per_job) == len(set(per_job))


async def test_single_image_vary_edit_and_reaction(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse", "negative": "blur"})
        await ix.wait_ack()
        first = await wait_result(emu)
        parent = job_of(first)
        assert {
            f"sd:vary:{parent}:0:subtle",
            f"sd:vary:{parent}:0:strong",
            f"sd:up:{parent}:0:subtle",
            f"sd:up:{parent}:0:creative",
            f"sd:edit:{parent}",
            f"sd:info:{parent}",
            f"sd:del:{parent}",
        } <= set(first.custom_ids)

        await emu.click(emu.bob, first, f"sd:vary:{parent}:0:subtle")
        vary = await wait_result(emu, lambda m: job_of(m) != parent)
        assert queue.get(job_of(vary)).variation_strength == 0.15

        # Edit: a modal prefilled with the prompts; the new job keeps the seed.
        edit = await emu.click(emu.bob, first, f"sd:edit:{parent}")
        assert await edit.wait_ack() == 9
        values = {
            c["component"]["custom_id"] if c["type"] == 18 else c["components"][0]["custom_id"]: (
                c["component"] if c["type"] == 18 else c["components"][0]
            ).get("value")
            for c in edit.modal["components"]
        }
        assert sorted(v for v in values.values() if v) == ["a lighthouse", "blur"]
        submitted = await emu.submit_modal(emu.bob, edit, {"Prompt": "a lighthouse at night"})
        await submitted.wait_ack()
        edited = await wait_result(emu, lambda m: queue.get(job_of(m)).kind.value == "edit")
        job = queue.get(job_of(edited))
        parent_job = queue.get(parent)
        assert job.prompt == "a lighthouse at night" and job.negative_prompt == "blur"
        assert job.seed == parent_job.seed and job.requester_id == emu.bob.id

        # 🔁 by Bob rerolls for Bob; the bot's own reactions are ignored.
        await emu.react(emu.bob, first, "🔁")
        rerolled = await wait_result(emu, lambda m: queue.get(job_of(m)).kind.value == "reroll")
        job = queue.get(job_of(rerolled))
        assert job.requester_id == emu.bob.id and job.parent_id == parent
        await emu._add_reaction(emu.bot_user, first, "🔁")
        # Sync point instead of a pause: Alice's 🔁 comes after the bot's own, so by the time her
        # reroll is posted one for the bot's reaction would have been queued (and, never served
        # before, made first).
        seen = {m.id for m in results(emu)}
        await emu.react(emu.alice, first, "🔁")
        await wait_result(emu, lambda m: m.id not in seen and queue.get(job_of(m)).requester_id == emu.alice.id)
        assert sum(queue.get(job_of(m)).kind.value == "reroll" for m in results(emu)) == 2
        assert queue.pending_for(emu.bot_user.id) == []


async def test_buttons_and_reactions_work_after_a_restart(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a tree"})
        await ix.wait_ack()
        posted = await wait_result(emu)
        await emu.wait_for(lambda: "done" in ix.original.content, what="status done")
    async with bot_running(emu, config, queue, worker):
        click = await emu.click(emu.bob, posted, f"sd:reroll:{job_of(posted)}")
        assert await click.wait_ack() == 5
        await wait_result(emu, lambda m: job_of(m) != job_of(posted))
        await emu.react(emu.alice, posted, "🔁")
        await emu.wait_for(lambda: len(results(emu)) == 3, timeout=30, what="reaction reroll after restart")
    assert len({job_of(m) for m in results(emu)}) == 3


async def test_prompt_mentions_never_ping(setup):
    emu, config, queue, worker = setup
    async with bot_running(emu, config, queue, worker):
        prompt = f"@everyone @here <@{emu.bob.id}> <@&{emu.guild.id}> a cat"
        ix = await emu.slash(emu.alice, "imagine", {"prompt": prompt})
        await ix.wait_ack()
        await wait_result(emu)
        await emu.wait_for(lambda: "done" in ix.original.content, what="status done")
    pinged = emu.pings()
    assert len(pinged) == 1 and pinged[0].pinged_users == {emu.alice.id}
    assert not pinged[0].pinged_everyone and not pinged[0].pinged_roles
