"""The hires fix, a member's default schedule and a server's CLIP skip, through the Discord emulator.

The bot here allows 128x128 at most and makes 64x64 by default, so ``hires:2`` is the largest
factor that fits."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot.infotext import settings_from
from bot_harness import (
    bot_config,
    bot_running,
    help_embeds,
    is_result,
    queued_setup,  # noqa: F401 - the fixture
)
from bot_harness import setup as engine_setup  # noqa: F401 - the fixture
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.metadata import read_parameters


@pytest.fixture
def setup(queued_setup):
    return queued_setup


async def ephemeral(emu: Emulator, user, name: str, options=None) -> str:
    ix = await emu.slash(user, name, options)
    return (await ix.wait_response(lambda m: m.ephemeral)).content


async def imagine(emu: Emulator, user, **options):
    ix = await emu.slash(user, "imagine", {"prompt": "a cat", **options})
    return await ix.wait_response(lambda m: "queued" in m.content or m.ephemeral)


@pytest.mark.asyncio
async def test_imagine_hires_posts_an_image_twice_the_size_with_a1111s_fields(engine_setup):
    emu, config, queue, worker = engine_setup
    async with bot_running(emu, config, queue, worker):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a red cube", "seed": 3, "hires": 2, "hires_steps": 1})
        await ix.wait_ack()
        posted = await emu.wait_for_message(emu.general, is_result, timeout=60)
        png = posted.attachments[0].data
        assert Image.open(io.BytesIO(png)).size == (128, 128)
        params = read_parameters(png)
        assert (params["Size"], params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == (
            "64x64",
            "2",
            "1",
            "Latent",
        )
        assert params["Denoising strength"] == "0.7"  # AUTOMATIC1111's default for the second pass


@pytest.mark.asyncio
async def test_a_hires_fix_over_the_size_limit_is_refused_saying_what_fits(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        refused = await imagine(emu, emu.alice, hires=3)
        assert refused.ephemeral and "192x192" in refused.content and "`hires:2`" in refused.content
        refused = await imagine(emu, emu.alice, hires=1.5, size="128x64")
        assert refused.ephemeral and "leave `hires` out" in refused.content
        await ephemeral(emu, emu.admin, "server limits", {"max_steps": 2})
        refused = await imagine(emu, emu.alice, hires=2, hires_steps=3)
        assert refused.ephemeral and "at most 2 steps" in refused.content and "`hires_steps`" in refused.content
        assert queue.pending_for(emu.alice.id) == []
        assert "queued" in (await imagine(emu, emu.alice, hires=2, hires_upscaler="Lanczos")).content
        (job,) = queue.pending_for(emu.alice.id)
        assert (job.hires_scale, job.hires_upscaler, job.hires_strength) == (2.0, "Lanczos", 0.7)


@pytest.mark.asyncio
async def test_member_defaults_for_the_hires_fix_and_the_schedule(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        saved = await ephemeral(
            emu, emu.alice, "settings set", {"hires": 3, "hires_upscaler": "Lanczos", "schedule": "karras"}
        )
        assert "Saved" in saved and "3× (Lanczos)" in saved and "Karras" in saved
        await imagine(emu, emu.alice)  # 64x64: the default's 3x is lowered to the 2x that fits
        await imagine(emu, emu.alice, size="128x64")  # no enlargement fits: no hires fix
        await imagine(emu, emu.alice, hires=1, schedule="uniform")  # the options win
        await imagine(emu, emu.bob)  # Bob has no defaults
        lowered, too_wide, asked_off = queue.pending_for(emu.alice.id)
        (bobs,) = queue.pending_for(emu.bob.id)
        assert (lowered.hires_scale, lowered.hires_upscaler, lowered.schedule) == (2.0, "Lanczos", "karras")
        assert too_wide.hires_scale is None and asked_off.hires_scale is None
        assert asked_off.schedule == "uniform"
        assert (bobs.hires_scale, bobs.schedule) == (None, config.generation.default_schedule)

        await ephemeral(emu, emu.alice, "settings reset", {"setting": "hires"})
        mine = community.member_defaults(emu.alice.id)
        assert (mine.hires_scale, mine.hires_upscaler, mine.schedule) == (None, "Lanczos", "karras")


@pytest.mark.asyncio
async def test_a_servers_clip_skip_comes_before_the_models_and_is_logged(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        assert "Manage Server" in await ephemeral(emu, emu.alice, "server clip_skip", {"value": 2})
        shown = await ephemeral(emu, emu.admin, "server clip_skip", {"value": 2})
        assert "CLIP skip: **2**" in shown
        await imagine(emu, emu.alice)
        await imagine(emu, emu.alice, clip_skip=3)
        server_default, asked = queue.pending_for(emu.alice.id)
        assert (server_default.clip_skip, asked.clip_skip) == (2, 3)
        await ephemeral(emu, emu.admin, "server clip_skip")  # left out: back to each model's own
        await imagine(emu, emu.bob)
        (bobs,) = queue.pending_for(emu.bob.id)
        assert bobs.clip_skip == config.model.clip_skip
    entries = [(e.action, e.old_value, e.new_value) for e in reversed(community.audit_log(emu.guild.id))]
    assert entries[-2:] == [("clip_skip", None, "2"), ("clip_skip", "2", None)]


def test_use_these_settings_carries_the_hires_fix(tmp_path):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", 1)
    fields = {
        "Prompt": "a fox",
        "Steps": "2",
        "Size": "64x64",
        "Denoising strength": "0.45",
        "Hires upscale": "2",
        "Hires steps": "1",
        "Hires upscaler": "Latent (bicubic)",
    }
    asked, notes = settings_from(fields, config)
    assert (asked.hires, asked.hires_steps, asked.hires_upscaler, asked.hires_strength) == (
        2.0,
        1,
        "Latent (bicubic)",
        0.45,
    )
    assert notes == []
    resized, notes = settings_from(
        fields | {"Hires resize": "96x96", "Hires upscaler": "4x-UltraSharp"} | {"Hires upscale": ""}, config
    )
    assert resized.hires == 1.5 and resized.hires_upscaler is None
    assert any("96x96" in note for note in notes) and any("4x-UltraSharp" in note for note in notes)
    plain, _ = settings_from({"Prompt": "a fox", "Steps": "2", "Denoising strength": "0.5"}, config)
    assert plain.hires == 1.0  # an img2img's strength alone is no hires fix: off, whatever my default


@pytest.mark.asyncio
async def test_help_lists_the_hires_options_with_their_limits(setup):
    emu, config, queue, community = setup
    async with bot_running(emu, config, queue, None):
        embeds = await help_embeds(emu)
    text = "\n".join(e["description"] for e in embeds)
    lines = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("`") and "`:" in line}
    assert "1 to 4" in lines["hires"] and "0 to 8" in lines["hires_steps"]
    assert "Latent (bicubic)" in lines["hires_upscaler"] and "Lanczos" in lines["hires_upscaler"]
    assert "/server clip_skip" in text
    assert text.rstrip().endswith("jobs waiting at a time.")  # nothing was cut to fit the embeds


def test_jobs_made_from_a_hires_image_work_at_its_enlarged_size_without_a_hires_fix():
    from bot import jobs
    from db.models import Job, ResultImage
    from engine.params import GenerationParams, job_columns

    parent = Job(id=5, **job_columns(GenerationParams(prompt="a fox", seed=1, width=64, height=64, hires_scale=2)))
    image = ResultImage(job_id=5, index=0, seed=1, png=b"png")
    region = jobs.region(parent, image, b"mask", "a hat").params
    assert (region.width, region.height, region.hires_scale) == (128, 128, None)
    reroll = jobs.reroll(parent).params
    assert (reroll.width, reroll.hires_scale) == (64, 2)  # a reroll makes the same hires job again
