"""The Discord emulator works with the real discord.py client over real sockets.

A tiny bot written here (one slash command, one DynamicItem button that opens a modal, a
reaction listener that posts with a nonce) is driven through the emulator's actor API.
"""

from __future__ import annotations

import io
import re
from typing import Literal

import aiohttp
import discord
import pytest
from discord import app_commands, ui
from discord.ext import commands
from PIL import Image

from discord_emulator import ATTACH_FILES, EMBED_LINKS, SEND_MESSAGES, VIEW_CHANNEL, Emulator, fixtures, running
from discord_emulator.records import compute_pings

emulator = fixtures.emulator  # the lead may import it in conftest.py instead


def png_bytes(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


class EditModal(ui.Modal, title="Edit prompt"):
    prompt = ui.TextInput(label="Prompt")
    negative = ui.TextInput(label="Negative prompt", required=False)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"queued: {self.prompt.value} / {self.negative.value}")


class EditButton(ui.DynamicItem[ui.Button], template=r"t:edit:(?P<seed>\d+)"):
    def __init__(self, seed: int) -> None:
        super().__init__(ui.Button(label="Edit", emoji="✏️", custom_id=f"t:edit:{seed}"))
        self.seed = seed

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: ui.Button, match: re.Match[str]
    ) -> EditButton:
        return cls(int(match["seed"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        modal = EditModal()
        modal.prompt.default = f"prompt of {self.seed}"
        await interaction.response.send_modal(modal)


class TinyBot(commands.Bot):
    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.1,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.guild_id = guild_id
        self.init_bytes: bytes | None = None
        self.permissions: dict[int, discord.Permissions] = {}  # user id -> as the interaction said
        self.errors: list[Exception] = []

        @self.tree.command(description="Make an image")
        @app_commands.describe(prompt="What to draw")
        async def imagine(
            interaction: discord.Interaction,
            prompt: str,
            seed: app_commands.Range[int, 0, 99] = 7,
            size: Literal["512x512", "768x768"] = "512x512",
            image: discord.Attachment | None = None,
        ) -> None:
            if not prompt.strip():
                await interaction.response.send_message("Write a prompt.", ephemeral=True)
                return
            await interaction.response.defer(thinking=True)
            self.permissions[interaction.user.id] = interaction.permissions
            if image is not None:
                self.init_bytes = await image.read()
            view = ui.View(timeout=None).add_item(EditButton(seed))
            await interaction.followup.send(
                f"{prompt} seed={seed} size={size}", view=view, file=discord.File(io.BytesIO(png_bytes()), "out.png")
            )

        @self.tree.error
        async def on_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            self.errors.append(error)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(EditButton)
        guild = discord.Object(self.guild_id)
        self.tree.copy_global_to(guild=guild)
        await self.tree.sync(guild=guild)

    async def on_raw_reaction_add(self, event: discord.RawReactionActionEvent) -> None:
        if str(event.emoji) != "🔁" or event.user_id == self.user.id:
            return
        channel = self.get_channel(event.channel_id)
        # The nonce makes a retried send return the first message instead of posting twice.
        await channel.send(
            f"<@{event.user_id}> rerolled for @everyone",
            nonce=event.message_id,
            allowed_mentions=discord.AllowedMentions(users=True),
        )
        await channel.get_partial_message(event.message_id).add_reaction("✅")


@pytest.mark.asyncio
async def test_startup_syncs_commands_and_sees_the_guild(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)
    async with running(bot, emulator):
        imagine = emulator.command("imagine")
        options = {o["name"]: o for o in imagine["options"]}
        assert [c["value"] for c in options["size"]["choices"]] == ["512x512", "768x768"]
        assert (options["seed"]["min_value"], options["seed"]["max_value"]) == (0, 99)
        assert options["image"]["type"] == 11 and not options["image"]["required"]
        assert "imagine" in {c["name"] for c in emulator.commands[emulator.guild.id]}
        assert bot.get_channel(emulator.nsfw_channel.id).is_nsfw()
        assert not bot.get_channel(emulator.general.id).is_nsfw()
        assert emulator.identify["intents"] == discord.Intents.default().value


@pytest.mark.asyncio
async def test_slash_with_attachment_then_button_then_modal(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)
    init = emulator.attachment("init.png", png_bytes("blue"))
    async with running(bot, emulator):
        ix = await emulator.slash(
            emulator.alice, "imagine", {"prompt": "a cat", "seed": 42, "size": "768x768"}, attachments={"image": init}
        )
        assert await ix.wait_ack() == 5
        result = await ix.wait_response()
        assert bot.init_bytes == init.data and init.fetches == 1
        assert result.content == "a cat seed=42 size=768x768"
        assert result is ix.original and not result.ephemeral and not result.pinged
        assert [a.filename for a in result.attachments] == ["out.png"]
        async with aiohttp.ClientSession() as http:  # the posted file is served back from /cdn/
            async with http.get(result.attachments[0].url) as response:
                assert (await response.read()).startswith(b"\x89PNG")
        assert result.custom_ids == ["t:edit:42"]
        assert result in emulator.channel_messages(emulator.general)
        assert not bot.permissions[emulator.alice.id].manage_messages
        assert len(result.edits) == 1 and result.edits[0]["flags"] & 128  # was "thinking..." first

        empty = await emulator.slash(emulator.alice, "imagine", {"prompt": "  "})
        error = await empty.wait_response()
        assert error.ephemeral and error.content == "Write a prompt." and empty.ephemeral_messages == [error]
        assert error not in emulator.channel_messages(emulator.general)

        click = await emulator.click(emulator.bob, result, "t:edit:42")
        assert await click.wait_ack() == 9 and click.modal["title"] == "Edit prompt"
        submit = await emulator.submit_modal(emulator.bob, click, {"Negative prompt": "blurry"})
        reply = await submit.wait_response()
        assert reply.content == "queued: prompt of 42 / blurry"
        assert reply is await emulator.wait_for_message(emulator.general, lambda m: m.content.startswith("queued"))


@pytest.mark.asyncio
async def test_reaction_posts_once_pings_only_the_reactor_and_survives_a_429(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)
    async with running(bot, emulator):
        ix = await emulator.slash(emulator.alice, "imagine", {"prompt": "a dog"})
        result = await ix.wait_response()
        rate_limit = emulator.fail_next("POST", "/channels/*/messages", 429, retry_after=0.01)

        await emulator.react(emulator.bob, result, "🔁")
        posted = await emulator.wait_for_message(emulator.general, lambda m: "rerolled" in m.content)
        assert rate_limit.hits == 1  # discord.py waited retry_after and sent it again
        assert posted.pinged_users == {emulator.bob.id} and not posted.pinged_everyone
        await emulator.wait_for(lambda: result.reactions.get("✅"), what="the bot's ✅")
        assert result.reactions["🔁"] == [emulator.bob.id]


@pytest.mark.asyncio
async def test_nonce_returns_the_first_message_when_the_answer_was_lost(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)
    async with running(bot, emulator):
        ix = await emulator.slash(emulator.alice, "imagine", {"prompt": "a fox"})
        result = await ix.wait_response()
        # The message is created but the answer is a 500: discord.py retries with the same nonce.
        lost = emulator.fail_next("POST", "/channels/*/messages", 500, after=True)
        await emulator.react(emulator.bob, result, "🔁")
        await emulator.wait_for(lambda: result.reactions.get("✅"), what="the bot's ✅")
        assert lost.hits == 1
        posts = [c for c in emulator.calls if c.method == "POST" and c.path.endswith("/messages")]
        assert [c.status for c in posts] == [500, 200]
        assert len([m for m in emulator.channel_messages(emulator.general) if "rerolled" in m.content]) == 1


@pytest.mark.asyncio
async def test_interaction_rules_deadline_double_ack_and_errors(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)
    async with running(bot, emulator):
        ix = await emulator.slash(emulator.alice, "imagine", {"prompt": "late"})
        await ix.wait_response()
        webhook = discord.Webhook.partial(emulator.app_id, ix.token, client=bot)
        with pytest.raises(discord.NotFound):  # deleted messages are gone for good
            await emulator.delete_message(ix.original)
            await webhook.fetch_message(ix.original.id)

        async with aiohttp.ClientSession() as http:  # a second ack of an answered interaction
            url = f"{emulator.api_base}/interactions/{ix.id}/{ix.token}/callback?with_response=1"
            async with http.post(url, json={"type": 4, "data": {"content": "again"}}) as response:
                assert response.status == 400 and (await response.json())["code"] == 40060

        emulator.ack_deadline = 0.0
        slow = await emulator.slash(emulator.alice, "imagine", {"prompt": "too slow"})
        await emulator.wait_for(lambda: bot.errors, what="the bot's error")
        assert isinstance(bot.errors[0].original, discord.NotFound) and bot.errors[0].original.code == 10062
        assert slow.response_type is None

        await emulator.delete_channel(emulator.nsfw_channel)
        with pytest.raises(discord.NotFound) as gone:
            await bot.http.send_message(emulator.nsfw_channel.id, params=_params("hello"))
        assert gone.value.code == 10003
        emulator.revoke_permissions(emulator.general)
        with pytest.raises(discord.Forbidden) as denied:
            await bot.http.send_message(emulator.general.id, params=_params("hello"))
        assert denied.value.code == 50013


@pytest.mark.asyncio
async def test_gateway_resume_replays_missed_events(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)
    resumed = []

    async def on_resumed() -> None:
        resumed.append(True)

    bot.add_listener(on_resumed)
    async with running(bot, emulator):
        await emulator.reconnect_gateway()
        ix = await emulator.slash(emulator.admin, "imagine", {"prompt": "while away"})  # held, then replayed
        assert not emulator.connected
        assert (await ix.wait_response()).content.startswith("while away")
        await emulator.wait_for(lambda: resumed, what="on_resumed")
        mod = await emulator.slash(emulator.mod, "imagine", {"prompt": "moderated"})
        await mod.wait_response()
        admin, mod = bot.permissions[emulator.admin.id], bot.permissions[emulator.mod.id]
        assert admin.manage_guild and not admin.manage_messages
        assert mod.manage_messages and not mod.manage_guild


def _params(content: str):
    return discord.http.handle_message_parameters(content=content)


@pytest.mark.asyncio
async def test_sync_rejects_what_discord_rejects(emulator: Emulator) -> None:
    bot = TinyBot(emulator.guild.id)

    @bot.tree.command(description="Too many choices")
    @app_commands.choices(size=[app_commands.Choice(name=str(n), value=n) for n in range(26)])
    async def big(interaction: discord.Interaction, size: int) -> None: ...

    with pytest.raises(discord.HTTPException) as error:
        async with running(bot, emulator):
            pass
    assert error.value.code == 50035 and "at most 25 choices" in error.value.text


@pytest.mark.asyncio
async def test_channel_permissions_are_enforced_as_discord_does(emulator: Emulator) -> None:
    """Missing Send Messages or (for uploads) Attach Files: 403 50013; no View Channel: 403 50001;
    no Embed Links: the embeds are dropped without an error. The bot's cache sees the overwrites,
    and the guild's owner (all permissions) comes with GUILD_CREATE."""
    bot = TinyBot(emulator.guild.id)
    art = emulator.add_channel("art")
    async with running(bot, emulator):
        guild = bot.get_guild(emulator.guild.id)
        assert guild.owner_id == emulator.owner.id
        await emulator.set_permissions(emulator.general, emulator.bot_user, deny=ATTACH_FILES)
        await emulator.set_permissions(art, emulator.bot_user, deny=EMBED_LINKS)
        await emulator.set_permissions(emulator.nsfw_channel, emulator.bot_user, deny=VIEW_CHANNEL)
        await emulator.wait_for(
            lambda: not bot.get_channel(art.id).permissions_for(guild.me).embed_links,
            what="the overwrites in the bot's cache",
        )
        assert not bot.get_channel(emulator.general.id).permissions_for(guild.me).attach_files

        general = bot.get_channel(emulator.general.id)
        with pytest.raises(discord.Forbidden) as denied:
            await general.send("x", file=discord.File(io.BytesIO(png_bytes()), "x.png"))
        assert denied.value.code == 50013
        await general.send("text only is fine")
        with pytest.raises(discord.Forbidden) as hidden:
            await bot.http.send_message(emulator.nsfw_channel.id, params=_params("hello"))
        assert hidden.value.code == 50001
        posted = await bot.get_channel(art.id).send("no embeds here", embed=discord.Embed(title="dropped"))
        assert posted.embeds == [] and emulator.messages[posted.id].embeds == []

        await emulator.set_permissions(art, emulator.bot_user, deny=SEND_MESSAGES)
        with pytest.raises(discord.Forbidden) as muted:
            await bot.http.send_message(art.id, params=_params("hello"))
        assert muted.value.code == 50013
        owner_dm = await bot.create_dm(discord.Object(guild.owner_id))
        await owner_dm.send("the owner can be told")
        assert emulator.dm_messages(emulator.owner)[0].content == "the owner can be told"


def test_mentions_without_allowed_mentions_ping_everyone() -> None:
    world = Emulator()
    content = f"<@{world.alice.id}> drew @everyone <@&{world.guild.roles['moderator'].id}>"
    users, roles, everyone = compute_pings(content, None, world.guild, world.users, None)
    assert users == {world.alice.id} and roles == {world.guild.roles["moderator"].id} and everyone
    assert compute_pings(content, {"parse": []}, world.guild, world.users, None) == (set(), set(), False)
    replied = compute_pings("done", {"parse": [], "replied_user": True}, world.guild, world.users, world.bob)
    assert replied == ({world.bob.id}, set(), False)
