"""Prompts as members write them, through the real bot and the emulator (jobs stay queued, no
engine): Midjourney's ``--parameters``, permutations with their confirm button across a restart,
and the server's wildcard lists with Dynamic Prompts' variants."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from PIL import Image, PngImagePlugin

from bot.policy import aspect_size
from bot_harness import bot_config, bot_running, new_queue
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.prompt_templates import image_prompt

TILED = "Model: tiny-sd1, RNG: CPU, Tiling: True"


def png(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(out, "PNG", pnginfo=info)
    return out.getvalue()


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(config, queue=replace(config.queue, pending_limit=20))
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


async def refused(emu: Emulator, user, prompt: str, **options) -> str:
    ix = await emu.slash(user, "imagine", {"prompt": prompt, **options})
    return (await ix.wait_response(lambda m: m.ephemeral)).content


@pytest.mark.asyncio
async def test_midjourney_parameters_permutations_and_wildcards(setup):
    emu, config, queue = setup
    alice = emu.alice
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(alice, "imagine", {"prompt": "a fox in snow --ar 16:9 --no trees, people --seed 7 --tile"})
        await ix.wait_response(lambda m: "queued" in m.content)
        assert "is not a parameter here; these are: --ar W:H" in await refused(emu, alice, "a fox --v 6")
        assert "`seed` is given twice" in await refused(emu, alice, "a fox --seed 7", seed=3)
        assert "use `--cfg N`" in await refused(emu, alice, "a fox --stylize 250")

        ix = await emu.slash(alice, "imagine", {"prompt": "a {red, blue, green} car --steps 3"})
        answer = await ix.wait_response(lambda m: "Queued" in m.content)
        assert "Queued 3 of 3 permutation jobs" in answer.content

        # Over the images-per-job limit (4): asked first, and the button outlives the bot.
        ix = await emu.slash(alice, "imagine", {"prompt": "a {a, b, c, d, e} {cat, dog}"})
        ask = await ix.wait_response(lambda m: m.ephemeral)
        assert "make **10 jobs**" in ask.content
        (button,) = [cid for cid in ask.custom_ids if cid.startswith("sd:permute:")]
        assert "more than 40 jobs" in await refused(emu, alice, "{a,b,c,d,e,f,g,h,i,j} " * 4)

        manager = emu.admin
        ix = await emu.slash(
            manager, "server wildcards add", {"name": "colours", "entries": "red | deep blue | __metal__"}
        )
        assert "Saved wildcard list **colours** (3 entries" in (await ix.wait_response()).content
        metal = emu.attachment("metal.txt", b"gold\n# no\nsilver\n", "text/plain")
        ix = await emu.slash(manager, "server wildcards import", {"name": "metal"}, attachments={"file": metal})
        assert "Saved wildcard list **metal** (2 entries" in (await ix.wait_response()).content
        ix = await emu.slash(manager, "server wildcards list")
        listed = (await ix.wait_response()).content
        assert "`__colours__` (3 entries)" in listed and "`__metal__` (2 entries)" in listed
        assert "Manage Server" in (await (await emu.slash(alice, "server wildcards list")).wait_response()).content
        assert "no wildcard list `nope`; its lists: `__colours__`, `__metal__`" in await refused(
            emu, alice, "a __nope__"
        )
        ix = await emu.slash(alice, "imagine", {"prompt": "a __colours__ {cat|dog}", "seed": 5, "count": 3})
        await ix.wait_response(lambda m: "queued" in m.content)
        upload = {"image": emu.attachment("in.png", png("x"))}
        ix = await emu.slash(alice, "img2img", {"prompt": "a fox --ar 2:1"}, attachments=upload)
        await ix.wait_response(lambda m: "queued" in m.content)
        fox_id = queue.pending_for(alice.id)[0].id
        info = (await (await emu.slash(alice, "info", {"job": fox_id})).wait_response()).content
        assert "**Tiling:** seamless" in info and "**Size:** 72x40" in info and "**Negative:** trees, people" in info
        # "Use these settings" keeps the tiling, and a PNG's braces are its words, not choices.
        made = png(f"a {{weird}} fox | __x__\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 64x64, {TILED}")
        ix = await emu.message_command(
            emu.bob, "Use these settings", emu.post(alice, attachments=(emu.attachment("made.png", made),))
        )
        await ix.wait_response(lambda m: "queued" in m.content)
        (reused,) = queue.pending_for(emu.bob.id)
        assert (reused.prompt, reused.prompt_template, reused.tiling) == ("a {weird} fox | __x__", None, True)
    before = len(queue.pending_for(alice.id))

    async with bot_running(emu, config, queue, None):  # a restart: the button still queues them, once
        ix = await emu.click(alice, ask, button)
        await ix.wait_response(lambda m: "Queued" in m.content)
        again = await emu.click(alice, ask, button)
        assert "queued already" in (await again.wait_response(lambda m: m.ephemeral)).content

    jobs = queue.pending_for(alice.id)
    fox = jobs[0]
    assert (fox.prompt, fox.negative_prompt, fox.seed, fox.tiling) == ("a fox in snow", "trees, people", 7, True)
    assert (fox.width, fox.height) == aspect_size((16, 9), 64 * 64, 128, 128, 8)
    assert [j.prompt for j in jobs[1:4]] == ["a red car", "a blue car", "a green car"]
    assert {j.steps for j in jobs[1:4]} == {3}
    templated = jobs[4]
    assert templated.prompt_template is not None and "__" not in templated.prompt_template
    assert templated.prompt == image_prompt(templated.prompt_template, 5)
    assert templated.prompt.split()[1] in ("red", "deep", "gold", "silver")
    assert (jobs[5].kind.value, jobs[5].width, jobs[5].height) == (
        "img2img",
        *aspect_size((2, 1), 64 * 64, 128, 128, 8),
    )
    assert len(jobs) == before + 10
    assert [j.prompt for j in jobs[before : before + 3]] == ["a a cat", "a a dog", "a b cat"]
    permuted = jobs[1:4] + jobs[before:]  # each with a status message of its own in the channel
    assert len({j.status_message_id for j in permuted}) == 13 and all(j.status_channel_id for j in permuted)
