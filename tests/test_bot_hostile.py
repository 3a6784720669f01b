"""Hostile and broken input, and who may do what (issue 5, sections 4 and 5), through the real
discord.py client and the Discord emulator.

The property-based test drives random command inputs through the command layer of one bot
that runs for the whole module (in a thread of its own, so hypothesis can call it from a plain
test) and checks what must hold whatever members send: nothing crashes, every command gets
exactly one answer, and every job the bot said it queued is in the database and no other.
No engine runs: jobs stay queued, which keeps it cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import threading
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace

import discord
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import func, select

from bot.checks import (
    PREPARE_BUDGET,
    NotAllowed,
    manage_server_only,
    mark_received,
    require_manage_server,
    within_deadline,
)
from bot.inputs import clean_text
from bot_harness import bot_config, bot_running, make_bot, new_queue, png
from db.models import Job
from discord_emulator import Emulator, patch_discord, running
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

# ------------------------------------------------------------------------ a bot for the whole module


class ErrorLog(logging.Handler):
    """Every ERROR record anywhere: discord.py's on_error and the bot's handlers log there."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        lines = [f"{r.name}: {r.getMessage()}\n{self.format(r) if r.exc_info else ''}" for r in self.records]
        self.records.clear()
        return lines


class BotThread:
    """An event loop in a thread, running the emulator and the bot until the module is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile-bot", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_bot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    thread = BotThread()
    stack = contextlib.AsyncExitStack()

    async def start():
        emu = await stack.enter_async_context(Emulator())
        stack.enter_context(patch_discord(emu))
        config = bot_config("unused-model", f"sqlite:///{tmp}/bot.sqlite3", emu.guild.id)
        config = replace(config, queue=replace(config.queue, pending_limit=100_000))
        engine, queue = new_queue(tmp / "bot.sqlite3", config)
        stack.callback(engine.dispose)
        bot = await stack.enter_async_context(running(make_bot(config, queue, None), emu))
        return SimpleNamespace(
            emu=emu, config=config, engine=engine, queue=queue, bot=bot, errors=errors, run=thread.run, accepted=0
        )

    try:
        yield thread.run(start())
    finally:
        thread.run(stack.aclose())
        thread.stop()
        logging.getLogger().removeHandler(errors)


def jobs_in_database(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Job)).scalar_one()


# ------------------------------------------------------------------------ what members may send

NASTY = [
    "\x00",
    "\x07",
    "\x1b[31m",
    "\u202e",
    "\u2066",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\u3164",
    "\u2800",
    "\ud800",
    "@everyone",
    "@here",
    "<@1>",
    "<@&1>",
    "<#1>",
    "`",
    "```",
    "||",
    "**",
    "\n",
    "\\",
    "(",
    ")",
    ":1.5)",
    "BREAK",
    "\U0001f600",
    "\u4e2d",
    "e\u0301",
    "\U000e0001",
    "\ufffe",
]
prompts = st.one_of(
    st.text(max_size=120),
    st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=6)), max_size=30).map("".join),
    st.sampled_from(["", " ", "\u200b\u202e", "a cat"]),
    st.integers(990, 1010).map(lambda n: "x" * n),  # around the 1000-character limit
    st.integers(500, 1000).map(lambda n: "\U0001f600" * n),  # over the token limit
    st.integers(20, 120).map(lambda n: " ".join(f"word{i}" for i in range(n))),  # 2-5 chunks
)
# Integer options reach the bot as sent; number options go through float() in discord.py's
# Namespace before any code of ours runs (Discord only ever sends numbers there, or "" -> NaN).
integers = st.one_of(
    st.integers(-10, 20),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
reals = st.one_of(
    st.integers(-10, 20), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.just("")
)
choices = st.one_of(
    st.sampled_from(["64x64", "64x128", "128x64", "euler", "ddim", "euler_a", "dpmpp_2m"]), st.text(max_size=12)
)


def _images() -> list[bytes]:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:])
    return [
        png(),
        png((80, 60), mode="RGBA", color=(0, 0, 0, 0)),
        png((90, 90), mode="P", color=3),
        png((70, 70), mode="I;16", color=40000),
        png((80, 60), color=(0, 255, 255, 0), mode="CMYK", fmt="JPEG"),
        png((96, 64), fmt="WEBP"),
        png(fmt="GIF"),
        png(fmt="TIFF"),
        png()[:60],
        animated.getvalue(),
        png((7000, 7000), mode="1"),
    ]


IMAGES = _images()
uploads = st.fixed_dictionaries(
    {
        "data": st.one_of(st.sampled_from(IMAGES), st.binary(max_size=300)),
        "content_type": st.sampled_from(
            [
                None,
                "image/png",
                "image/jpeg",
                "image/webp",
                "image/gif",
                "text/plain",
                "application/octet-stream",
                "image/png; charset=binary",
                "IMAGE/PNG",
            ]
        ),
        "size": st.one_of(st.just(-1), st.integers(0, 600 * 1024)),  # -1: the real size; else a claim
        "filename": st.text(
            st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="/?#%\\"), min_size=1, max_size=20
        ),
    }
)
OPTIONAL = {
    "negative": prompts,
    "seed": integers,
    "steps": integers,
    "guidance": reals,
    "count": integers,
    "size": choices,
    "sampler": choices,
}
# Values a Discord client would send, so that many commands are accepted, and all together.
PLAUSIBLE = {
    "negative": prompts,
    "seed": st.integers(0, 2**32 - 1),
    "steps": st.integers(1, 8),
    "guidance": st.floats(0, 15),
    "count": st.integers(1, 4),
    "size": st.sampled_from(["64x64", "64x128", "128x64"]),
    "sampler": st.sampled_from(["euler", "euler_a", "dpmpp_2m_karras", "ddim"]),
}
good_uploads = st.fixed_dictionaries(
    {
        "data": st.sampled_from(IMAGES[:6] + IMAGES[9:10]),
        "size": st.just(-1),
        "filename": st.just("image"),
        "content_type": st.sampled_from(["image/png", "image/jpeg", "image/webp"]),
    }
)
commands = st.one_of(
    st.tuples(st.just("imagine"), st.fixed_dictionaries({"prompt": prompts}, optional=OPTIONAL), st.none()),
    st.tuples(st.just("imagine"), st.fixed_dictionaries({"prompt": prompts}, optional=PLAUSIBLE), st.none()),
    st.tuples(
        st.just("img2img"), st.fixed_dictionaries({"prompt": prompts}, optional=OPTIONAL | {"strength": reals}), uploads
    ),
    st.tuples(
        st.just("img2img"),
        st.fixed_dictionaries({"prompt": prompts}, optional=PLAUSIBLE | {"strength": st.floats(0.05, 1)}),
        good_uploads,
    ),
    st.tuples(st.just("cancel"), st.fixed_dictionaries({}, optional={"job": integers}), st.none()),
    st.tuples(st.just("info"), st.fixed_dictionaries({"job": integers}), st.none()),
    st.tuples(st.just("queue"), st.just({}), st.none()),
)


async def send_and_settle(emu: Emulator, who: str, name: str, options: dict, upload: dict | None):
    """Send one command; wait until it is answered for good: an ephemeral reply, or a job status."""
    user = getattr(emu, who)
    attachments = None
    if upload is not None:
        attachments = {
            "image": emu.attachment(
                upload["filename"], upload["data"], upload["content_type"] or "", size=upload["size"]
            )
        }
        if upload["content_type"] is None:
            attachments["image"].content_type = None
    ix = await emu.slash(user, name, options, attachments=attachments)

    def settled():
        for message in ix.messages:
            # "✖️ Not queued." is the transient public text of a refusal that came after a
            # deferral; the refusal itself follows as an ephemeral message.
            if message.loading or message.deleted or "Not queued" in message.content:
                continue
            if message.ephemeral or re.search(r"Job #\d+", message.content):
                return message
        return None

    message = await emu.wait_for(settled, timeout=15, what=f"an answer to /{name} {options}")
    # Sync point: discord.py runs each command in a task of this name; once none is left, anything
    # else the bot was going to send for this one (a second answer) has been sent.
    await emu.wait_for(
        lambda: not any(t.get_name() == "CommandTree-invoker" for t in asyncio.all_tasks()),
        timeout=120,
        what=f"the bot to finish /{name}",
    )
    accepted = not message.ephemeral and re.search(r"Job #\d+", message.content) is not None
    callbacks = [c for c in emu.calls if c.method == "POST" and c.path.startswith(f"/interactions/{ix.id}/")]
    return ix, accepted, callbacks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(who=st.sampled_from(["alice", "bob", "mod", "admin"]), command=commands)
def test_random_commands_never_crash_never_double_answer_never_lose_a_job(fuzz_bot, who, command):
    name, options, upload = command
    ix, accepted, callbacks = fuzz_bot.run(send_and_settle(fuzz_bot.emu, who, name, options, upload))
    assert [c.status for c in callbacks] == [200], f"/{name} {options}: answered {len(callbacks)} times"
    if name in ("imagine", "img2img"):
        fuzz_bot.accepted += accepted
        if accepted:  # what reaches the queue is within every limit
            job = fuzz_bot.queue.get(int(re.search(r"Job #(\d+)", ix.original.content)[1]))
            assert job.requester_id == getattr(fuzz_bot.emu, who).id
            assert job.prompt and job.prompt == clean_text(job.prompt) and len(job.prompt) <= 1000
            assert job.negative_prompt == clean_text(job.negative_prompt)
            assert 1 <= job.steps <= 8 and 1 <= job.count <= 4 and 0 <= job.guidance <= 15
            assert 0 <= job.seed < 2**32 and 0.05 <= job.strength <= 1
            assert f"{job.width}x{job.height}" in ("64x64", "64x128", "128x64") or job.init_image
            assert job.width <= 128 and job.height <= 128 and job.width % 8 == job.height % 8 == 0
        # A refusal is one ephemeral message and nothing else: no public message is left behind.
        if not accepted:
            assert all(m.ephemeral or m.deleted for m in ix.messages), [m.content for m in ix.messages]
    assert jobs_in_database(fuzz_bot.engine) == fuzz_bot.accepted
    assert fuzz_bot.errors.take() == []
    assert fuzz_bot.emu.connected and not fuzz_bot.bot.is_closed()


# ------------------------------------------------------------------------ one of each, end to end

asyncio_test = pytest.mark.asyncio


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(config, queue=replace(config.queue, pending_limit=10))
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


async def ephemeral_reply(ix) -> str:
    return (await ix.wait_response(lambda m: m.ephemeral)).content


async def queued(ix):
    return await ix.wait_response(lambda m: "queued" in m.content)


@asyncio_test
async def test_long_prompts_are_read_in_chunks_and_too_long_ones_refused(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        words = " ".join(f"word{i}" for i in range(80))  # 230 tokens
        status = await queued(await emu.slash(emu.alice, "imagine", {"prompt": words}))
        assert "4 chunks of 75" in status.content and "nothing is cut off" in status.content
        short = await queued(await emu.slash(emu.alice, "imagine", {"prompt": "a cat", "negative": words}))
        assert "negative prompt is 230 tokens" in short.content
        refused = await ephemeral_reply(await emu.slash(emu.alice, "imagine", {"prompt": "\U0001f600" * 700}))
        assert "the limit is 8 chunks" in refused
        refused = await ephemeral_reply(
            await emu.slash(emu.alice, "imagine", {"prompt": "a cat", "negative": "\u4e2d" * 900})
        )
        assert "negative prompt" in refused and "limit" in refused
    assert [j.prompt[:5] for j in queue.pending_for(emu.alice.id)] == ["word0", "a cat"]


@asyncio_test
async def test_negative_prompts_are_cleaned_and_limited(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        await queued(await emu.slash(emu.alice, "imagine", {"prompt": "a cat", "negative": "\u202eblur\u200b\x00ry"}))
        too_long = await ephemeral_reply(await emu.slash(emu.alice, "imagine", {"prompt": "a", "negative": "n" * 1001}))
        assert "The negative prompt is 1001 characters long; the limit is 1000" in too_long
    (job,) = queue.pending_for(emu.alice.id)
    assert job.negative_prompt == "blurry"


@asyncio_test
async def test_uploads_that_lie_or_hide_are_refused(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        # Declared small, really over the cap: the download stops at the cap.
        big = emu.attachment("big.png", png((64, 64)) + b"\0" * (300 * 1024), "image/png", size=1000)
        text = await ephemeral_reply(
            await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": big})
        )
        assert "larger than 0.2 MiB" in text
        # A TIFF sent as a PNG: the TIFF decoder never sees it.
        tiff = emu.attachment("photo.png", png((64, 64), fmt="TIFF"), "image/png")
        text = await ephemeral_reply(
            await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": tiff})
        )
        assert "could not be read as an image" in text
        # A file name made to break the reply or ping people is shown harmlessly.
        odd = emu.attachment("`@everyone`\u202e.txt", b"hello", "text/plain")
        text = await ephemeral_reply(
            await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": odd})
        )
        assert text.startswith("`'@everyone'.txt` is text/plain") and odd.fetches == 0
    assert queue.pending_for(emu.alice.id) == [] and not emu.pings()


@asyncio_test
async def test_an_animated_webp_is_queued_with_its_first_frame(setup):
    emu, config, queue = setup
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    async with bot_running(emu, config, queue, None):
        upload = emu.attachment("anim.webp", out.getvalue(), "image/webp")
        await queued(await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": upload}))
    (job,) = queue.pending_for(emu.alice.id)
    r, g, b = Image.open(io.BytesIO(job.init_image)).getpixel((5, 5))
    assert r > 200 and b < 50


# ------------------------------------------------------------------------ permissions (issue 5, section 5)


async def post_result(emu: Emulator, queue, requester, prompt: str = "a cat"):
    """A job of ``requester``'s, made by a worker elsewhere and posted with its buttons."""
    await queued(await emu.slash(requester, "imagine", {"prompt": prompt, "seed": 5}))
    job = queue.claim("remote-gpu")
    assert queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
    posted = await emu.wait_for_message(emu.general, lambda m: f"sd:reroll:{job.id}" in m.custom_ids, timeout=10)
    return job, posted


@asyncio_test
async def test_buttons_pressed_by_others_make_jobs_of_their_own(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        parent, posted = await post_result(emu, queue, emu.alice)
        for custom_id in (f"sd:reroll:{parent.id}", f"sd:vary:{parent.id}:0:subtle", f"sd:up:{parent.id}:0:creative"):
            await queued(await emu.click(emu.bob, posted, custom_id))
        edit = await emu.click(emu.bob, posted, f"sd:edit:{parent.id}")
        assert await edit.wait_ack() == 9
        await queued(await emu.submit_modal(emu.bob, edit, {"Prompt": "a cat\u202e in\u200b a hat"}))
    made = queue.pending_for(emu.bob.id)
    assert sorted(j.kind.value for j in made) == ["edit", "reroll", "upscale", "variation"]
    assert all(j.parent_id == parent.id and j.requester_id == emu.bob.id for j in made)
    assert next(j for j in made if j.kind.value == "edit").prompt == "a cat in a hat"
    assert queue.pending_for(emu.alice.id) == []


@asyncio_test
@pytest.mark.parametrize(
    "values, expected",
    [
        ({"Prompt": "\u200b\u202e \x00"}, "The prompt is empty"),
        ({"Prompt": "x" * 1001}, "the limit is 1000"),
        ({"Prompt": "a cat", "Negative prompt": "n" * 1001}, "negative prompt is 1001 characters"),
        ({"Prompt": "\U0001f600" * 700}, "the limit is 8 chunks"),
    ],
)
async def test_the_edit_modal_gets_the_same_checks(setup, values, expected):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        parent, posted = await post_result(emu, queue, emu.alice)
        edit = await emu.click(emu.bob, posted, f"sd:edit:{parent.id}")
        await edit.wait_ack()
        assert expected in await ephemeral_reply(await emu.submit_modal(emu.bob, edit, values))
    assert queue.pending_for(emu.bob.id) == []


@asyncio_test
async def test_delete_is_for_the_requester_and_moderators(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        parent, posted = await post_result(emu, queue, emu.alice)
        for who in (emu.bob, emu.admin):  # Manage Server is not Manage Messages
            text = await ephemeral_reply(await emu.click(who, posted, f"sd:del:{parent.id}"))
            assert "Only the member who asked" in text and not posted.deleted
        await emu.click(emu.mod, posted, f"sd:del:{parent.id}")
        await emu.wait_for(lambda: posted.deleted, what="the moderator's delete")


@asyncio_test
async def test_cancel_is_for_the_requester_and_moderators(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        statuses = [await queued(await emu.slash(emu.alice, "imagine", {"prompt": f"cat {i}"})) for i in range(3)]
        first, second, third = queue.pending_for(emu.alice.id)
        for who in (emu.bob, emu.admin):
            text = await ephemeral_reply(await emu.click(who, statuses[0], f"sd:cancel:{first.id}"))
            assert "Only the member who asked" in text
            text = await ephemeral_reply(await emu.slash(who, "cancel", {"job": second.id}))
            assert "Only the member who asked" in text
        assert len(queue.pending_for(emu.alice.id)) == 3
        assert "Cancelled" in await ephemeral_reply(await emu.click(emu.mod, statuses[0], f"sd:cancel:{first.id}"))
        assert "Cancelled" in await ephemeral_reply(await emu.slash(emu.mod, "cancel", {"job": second.id}))
        assert "Cancelled" in await ephemeral_reply(await emu.click(emu.alice, statuses[2], f"sd:cancel:{third.id}"))
    assert queue.pending_for(emu.alice.id) == []


def fake_interaction(guild_id: int | None, **permissions: bool) -> SimpleNamespace:
    return SimpleNamespace(guild_id=guild_id, permissions=discord.Permissions(**permissions))


def test_manage_server_check():
    assert require_manage_server(fake_interaction(1, manage_guild=True))
    assert require_manage_server(fake_interaction(1, administrator=True, manage_guild=True))
    with pytest.raises(NotAllowed, match="Manage Server"):
        require_manage_server(fake_interaction(1, manage_messages=True, ban_members=True))
    with pytest.raises(NotAllowed, match="only in a server"):
        require_manage_server(fake_interaction(None, manage_guild=True))
    # The bot's handlers show BadInput messages to the member; discord.py's see a CheckFailure.
    assert issubclass(NotAllowed, discord.app_commands.CheckFailure)
    assert callable(manage_server_only)


@asyncio_test
async def test_checks_one_after_another_share_one_budget():
    """The budget counts from when the interaction came, not from each check: two checks that
    each fit the budget but not together must still acknowledge in time."""
    deferred = []

    class Bot:
        async def defer(self, interaction, **_):
            deferred.append(interaction)

    def interaction():
        return SimpleNamespace(extras={}, response=SimpleNamespace(is_done=lambda: bool(deferred)))

    fresh = interaction()
    mark_received(fresh)
    assert await within_deadline(Bot(), fresh, asyncio.sleep(0, result="quick")) == "quick"
    assert deferred == []  # a quick check within the budget: no "thinking…"

    late = interaction()
    mark_received(late)
    late.extras["received"] -= PREPARE_BUDGET  # earlier checks used the whole budget
    assert await within_deadline(Bot(), late, asyncio.sleep(0.05, result="slow")) == "slow"
    assert deferred == [late]  # acknowledged before the check finished


def test_the_budget_counts_from_when_discord_made_the_interaction():
    """An interaction the event loop got to late (a busy bot) has used part of Discord's
    3 seconds already: its id's timestamp says how much."""
    made_ago = PREPARE_BUDGET / 2

    def made(ago: float) -> SimpleNamespace:
        when = discord.utils.utcnow() - timedelta(seconds=ago)
        return SimpleNamespace(extras={}, id=discord.utils.time_snowflake(when))

    old, new = made(made_ago), made(0)
    mark_received(old)
    mark_received(new)
    assert new.extras["received"] - old.extras["received"] >= made_ago - 0.05
    forged = made(-3600)
    mark_received(forged)  # from the future (a clock behind Discord's): counted from now
    assert forged.extras["received"] >= new.extras["received"]


@asyncio_test
async def test_a_slow_check_acknowledges_first_and_still_refuses_privately(setup, monkeypatch):
    """Past the budget the bot answers "thinking…" (Discord's 3 s), and a refusal after that
    removes it and is told ephemerally: nothing public is left, nothing is queued."""
    import time

    from bot import service
    from bot.inputs import BadInput

    def slow_refusal(prompt, negative, lora_dir):
        time.sleep(PREPARE_BUDGET + 0.5)
        raise BadInput("The prompt is 9999 tokens long.")

    monkeypatch.setattr(service, "check_prompt_text", slow_refusal)
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a cat"})
        assert await ix.wait_ack() == 5 and ix.ack_latency < 3.0
        assert "9999 tokens" in await ephemeral_reply(ix)
        assert not [m for m in ix.messages if not m.ephemeral and not m.deleted]
    assert queue.pending_for(emu.alice.id) == []
