"""Styles: managers keep named prompt templates (or import A1111's styles.csv), members pick one."""

from __future__ import annotations

import pytest

from bot_harness import bot_config, bot_running, new_queue
from db.styles import StyleText, parse_styles_csv
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

STYLES_CSV = (
    b"name,prompt,negative_prompt\n"
    b'Watercolor,"{prompt}, watercolor, soft light","photo, 3d"\n'
    b'Noir,"film noir, high contrast",color\n'
)


def test_a_style_is_applied_as_automatic1111_does():
    assert StyleText("w", "{prompt}, watercolor", "photo").apply("a fox", "blurry") == (
        "a fox, watercolor",
        "blurry, photo",
    )
    assert StyleText("n", "film noir", "").apply("a fox", "blurry") == ("a fox, film noir", "blurry")
    assert StyleText("n", "film noir", "color").apply("a fox", "") == ("a fox, film noir", "color")
    assert [s.name for s in parse_styles_csv(STYLES_CSV)] == ["Watercolor", "Noir"]


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue, emulator.admin
    engine.dispose()


@pytest.mark.asyncio
async def test_managers_add_and_import_styles_and_members_use_them(setup):
    emu, config, queue, manager = setup
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(
            manager, "server style add", {"name": "Clay", "prompt": "{prompt}, claymation", "negative": "photo"}
        )
        assert "Saved style **Clay**" in (await ix.wait_response(lambda m: m.ephemeral)).content
        ix = await emu.slash(
            manager, "server style import", attachments={"file": emu.attachment("styles.csv", STYLES_CSV, "text/csv")}
        )
        assert "Imported 2 style(s); this server has 3" in (await ix.wait_response(lambda m: m.ephemeral)).content
        listed = (await (await emu.slash(emu.alice, "server style list")).wait_response()).content
        assert "only members with the manage server" in listed.lower()
        listed = (await (await emu.slash(manager, "server style list")).wait_response()).content
        assert "**Clay**" in listed and "**Noir**" in listed and "**Watercolor**" in listed

        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox", "style": "Clay"})
        await ix.wait_response(lambda m: "queued" in m.content)
        ix = await emu.slash(emu.alice, "settings set", {"style": "Noir"})
        assert "style on this server: **Noir**" in (await ix.wait_response(lambda m: m.ephemeral)).content
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a cat", "negative": "blurry"})
        await ix.wait_response(lambda m: "queued" in m.content)
        ix = await emu.slash(emu.bob, "imagine", {"prompt": "a dog", "style": "Pastel"})
        refused = (await ix.wait_response(lambda m: m.ephemeral)).content
        log = (await (await emu.slash(manager, "server log")).wait_response()).content
    jobs = queue.pending_for(emu.alice.id)
    assert [(j.prompt, j.negative_prompt) for j in jobs] == [
        ("a fox, claymation", "photo"),
        ("a cat, film noir, high contrast", "blurry, color"),
    ]
    assert "no style called `Pastel`" in refused and "Clay" in refused
    assert queue.pending_for(emu.bob.id) == []
    assert "style Clay" in log and "style Watercolor" in log
