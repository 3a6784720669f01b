"""The image policy end to end, through the real client and the Discord emulator, with a tiny
random-weight ViT classifier (tests/tiny_classifier.py) whose bias decides every verdict.

Results are made by a "remote worker" (the queue's claim and complete), so each test sees the
bot's side only: classification in delivery, what is posted where, Reveal, Report and review.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace

import pytest
from PIL import Image
from prometheus_client import generate_latest

from bot.safety.classifier import ImageClassifier, SafetyCheck
from bot.safety.settings import SafetySettings
from bot_harness import (
    bot_running,
    is_result,
    make_app,
    png,
    queued_setup,  # noqa: F401 - the fixture
)
from db.safety import SafetyRecords
from discord_emulator import Emulator, running
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from tiny_classifier import save_tiny_classifier

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, str]:
    """Folders of three classifiers: every image nsfw (0.999), normal (nsfw 0.001), or nsfw 0.7."""
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "nsfw": str(save_tiny_classifier(root / "nsfw", "nsfw")),
        "normal": str(save_tiny_classifier(root / "normal", "normal")),
        "mid": str(save_tiny_classifier(root / "mid", nsfw_score=0.7)),
    }


@pytest.fixture
def safe(queued_setup, classifiers):
    emu, config, queue, community = queued_setup

    def configured(kind: str = "nsfw", **safety):
        return replace(config, safety=SafetySettings(classifier=classifiers[kind], **safety))

    return emu, configured, queue, community


async def ephemeral(emu: Emulator, user, name: str, options=None, **kwargs) -> str:
    ix = await emu.slash(user, name, options, **kwargs)
    return (await ix.wait_response(lambda m: m.ephemeral)).content


async def make(emu: Emulator, queue, user, *, channel=None, image: bytes | None = None):
    """``user`` asks for an image in ``channel``; a remote worker makes it. The interaction and job."""
    ix = await emu.slash(user, "imagine", {"prompt": "a portrait"}, channel=channel)
    await ix.wait_response(lambda m: "queued" in m.content)
    job = queue.claim("remote-gpu")
    queue.complete(job.id, "remote-gpu", [(image or png((64, 64), color="orange"), job.seed)])
    return ix, job


async def result_in(emu: Emulator, channel, job_id: int):
    return await emu.wait_for_message(
        channel, lambda m: is_result(m) and any(f"sd:reroll:{job_id}" == c for c in m.custom_ids), timeout=10
    )


def checkerboard() -> bytes:
    """An image whose blurred copy differs from it (a flat colour blurs to itself)."""
    image = Image.new("RGB", (64, 64), "white")
    for x in range(0, 64, 8):
        for y in range(0, 64, 8):
            if (x + y) // 8 % 2:
                image.paste((0, 0, 0), (x, y, x + 8, y + 8))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


async def test_spoiler_mode_spoilers_a_flagged_result_and_records_it_everywhere(safe):
    emu, configured, queue, community = safe
    app = make_app(configured("nsfw"), queue, None)
    async with running(app.bot, emu):
        assert "Saved" in await ephemeral(emu, emu.admin, "server safety", {"mode": "spoiler"})
        _, job = await make(emu, queue, emu.alice)
        message = await result_in(emu, emu.general, job.id)
        assert message.attachments[0].filename.startswith("SPOILER_")
        assert not message.embeds[0].get("image")  # not shown in the embed either
        assert f"sd:report:{job.id}" in message.custom_ids
        info = await ephemeral(emu, emu.alice, "info", {"job": job.id})
        assert "Image check:** flagged, nsfw 100% → spoiler" in info
        log = await ephemeral(emu, emu.admin, "server log")
        assert "the image filter **image check**" in log and f"job #{job.id} spoiler (nsfw" in log
        stats = await ephemeral(emu, emu.admin, "stats")
        assert "**Image filter this week:** 1 spoiler; 0 reported" in stats
        metrics = generate_latest(app.ops.metrics.registry).decode()
        assert 'sdbot_image_checks_total{action="spoiler"} 1.0' in metrics
        assert 'sdbot_image_checks_total{action="withheld"} 0.0' in metrics
    stored = queue.get(job.id)
    assert (stored.safety_flagged, stored.safety_label, stored.safety_action) == (True, "nsfw", "spoiler")
    assert stored.safety_score > 0.99


async def test_the_threshold_and_labels_decide(safe):
    emu, configured, queue, community = safe
    async with bot_running(emu, configured("mid", mode="spoiler"), queue, None):
        await ephemeral(emu, emu.admin, "server safety", {"threshold": 0.9})
        _, first = await make(emu, queue, emu.alice)
        assert not (await result_in(emu, emu.general, first.id)).attachments[0].filename.startswith("SPOILER_")
        await ephemeral(emu, emu.admin, "server safety", {"threshold": 0.6})
        _, second = await make(emu, queue, emu.alice)
        assert (await result_in(emu, emu.general, second.id)).attachments[0].filename.startswith("SPOILER_")
        refused = await ephemeral(emu, emu.admin, "server safety", {"labels": "gore"})
        assert "no label gore" in refused and "normal, nsfw" in refused
        await ephemeral(emu, emu.admin, "server safety", {"labels": "normal"})  # 0.3 < 0.6: not flagged
        _, third = await make(emu, queue, emu.alice)
        assert not (await result_in(emu, emu.general, third.id)).attachments[0].filename.startswith("SPOILER_")
        shown = await ephemeral(emu, emu.admin, "server safety", {"labels": "default"})
        assert "for nsfw, porn, hentai, sexy at 0.6" in shown
    assert [queue.get(j.id).safety_action for j in (first, second, third)] == ["posted", "spoiler", "posted"]


async def test_blur_posts_a_blurred_copy_whose_reveal_shows_the_original_only_where_allowed(safe):
    emu, configured, queue, community = safe
    original = checkerboard()
    lounge = emu.add_channel("lounge")
    async with bot_running(emu, configured("nsfw", mode="blur"), queue, None):
        _, job = await make(emu, queue, emu.alice, channel=lounge, image=original)
        message = await result_in(emu, lounge, job.id)
        assert not message.attachments[0].filename.startswith("SPOILER_")
        assert pixels(message.attachments[0].data) != pixels(original)  # a blurred copy, the same size
        assert Image.open(io.BytesIO(message.attachments[0].data)).size == (64, 64)
        # Not an age-restricted channel, and the server does not allow DMs: refused, for anyone.
        for who in (emu.bob, emu.alice):
            ix = await emu.click(who, message, f"sd:reveal:{job.id}")
            refused = await ix.wait_response(lambda m: m.ephemeral)
            assert "only in an age-restricted channel" in refused.content and not refused.attachments
        # The server allows DMs: the requester gets the original by DM; others still nothing.
        await ephemeral(emu, emu.admin, "server safety", {"reveal_in_dm": True})
        ix = await emu.click(emu.alice, message, f"sd:reveal:{job.id}")
        assert "direct messages" in (await ix.wait_response(lambda m: m.ephemeral and not m.loading)).content
        dm = await emu.wait_for_dm(emu.alice, lambda m: bool(m.attachments), timeout=10)
        assert pixels(dm.attachments[0].data) == pixels(original)
        ix = await emu.click(emu.bob, message, f"sd:reveal:{job.id}")
        assert "by direct message to the member who asked" in (await ix.wait_response(lambda m: m.ephemeral)).content
        # The channel is made age-restricted: Reveal shows the original there, privately.
        await emu.set_age_restricted(lounge)
        ix = await emu.click(emu.bob, message, f"sd:reveal:{job.id}")
        shown = await ix.wait_response(lambda m: m.ephemeral and bool(m.attachments), timeout=10)
        assert pixels(shown.attachments[0].data) == pixels(original)
    assert queue.get(job.id).safety_action == "blur"


async def test_withhold_tells_the_requester_and_moderators_review_restore_and_delete(safe):
    emu, configured, queue, community = safe
    async with bot_running(emu, configured("nsfw", mode="withhold"), queue, None):
        ix, job = await make(emu, queue, emu.alice)
        status = await ix.wait_response(lambda m: "withheld" in m.content, timeout=10)
        assert status.content.count("\n") == 0 and "image filter (nsfw 100%)" in status.content
        assert not [m for m in emu.channel_messages(emu.general) if m.attachments]
        listed = await ephemeral(emu, emu.admin, "server review")
        assert f"**#{job.id}** <@{emu.alice.id}>" in listed and "nsfw 100% · withheld" in listed
        refused = await ephemeral(emu, emu.alice, "server review")  # members may not
        assert "Manage Server" in refused
        ix = await emu.slash(emu.admin, "server review", {"job": job.id, "action": "show"})
        shown = await ix.wait_response(lambda m: m.ephemeral and bool(m.attachments), timeout=10)
        assert shown.attachments[0].filename.startswith("SPOILER_")  # the moderator sees it, privately
        ix = await emu.slash(emu.admin, "server review", {"job": job.id, "action": "restore"})
        assert "posted in" in (await ix.wait_response(lambda m: "Restored" in m.content, timeout=10)).content
        posted = await result_in(emu, emu.general, job.id)
        assert not posted.attachments[0].filename.startswith("SPOILER_")
        assert "Nothing to review" in await ephemeral(emu, emu.admin, "server review")
        # A second withheld result, deleted: nothing is posted, and the review list is empty.
        _, second = await make(emu, queue, emu.bob)
        await emu.wait_for(lambda: queue.get(second.id).safety_action == "withheld", 10)
        ix = await emu.slash(emu.admin, "server review", {"job": second.id, "action": "delete"})
        await ix.wait_response(lambda m: "Deleted" in m.content, timeout=10)
        ix = await emu.slash(emu.admin, "server review", {"job": second.id, "action": "bar"})
        assert "now barred" in (await ix.wait_response(lambda m: m.ephemeral)).content
    assert queue.get(job.id).safety_review == "restored" and queue.get(second.id).safety_review == "deleted"
    assert community.is_barred(emu.guild.id, emu.bob.id)


async def test_age_restricted_channels_are_exempt_and_dms_follow_their_server(safe):
    emu, configured, queue, community = safe
    async with bot_running(emu, configured("nsfw", mode="withhold"), queue, None):
        _, there = await make(emu, queue, emu.alice, channel=emu.nsfw_channel)
        message = await result_in(emu, emu.nsfw_channel, there.id)
        assert not message.attachments[0].filename.startswith("SPOILER_")
        await ephemeral(emu, emu.admin, "server safety", {"mode": "blur"})
        assert "Saved" in await ephemeral(emu, emu.bob, "settings set", {"private": True})
        _, private = await make(emu, queue, emu.bob, channel=emu.nsfw_channel)  # asked there, sent by DM
        dm = await emu.wait_for_dm(emu.bob, lambda m: bool(m.attachments), timeout=10)
        assert f"sd:reveal:{private.id}" in dm.custom_ids  # blurred: a DM is not age-restricted
    assert queue.get(there.id).safety_action == "exempt"
    assert queue.get(private.id).safety_action == "blur"


async def test_a_flagged_upload_is_refused_before_any_job_is_stored(safe):
    emu, configured, queue, community = safe
    async with bot_running(emu, configured("nsfw", mode="blur"), queue, None):
        upload = emu.attachment("me.png", png((64, 64)), "image/png")
        ix = await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": upload})
        refused = await ix.wait_response(lambda m: m.ephemeral)
        assert refused.content == (
            "Your image was flagged by this server's image filter (nsfw 100%); use it in an age-restricted channel."
        )
        assert queue.pending_for(emu.alice.id) == []
        upload = emu.attachment("me.png", png((64, 64)), "image/png")
        ix = await emu.slash(
            emu.alice, "img2img", {"prompt": "a cat"}, channel=emu.nsfw_channel, attachments={"image": upload}
        )
        await ix.wait_response(lambda m: "queued" in m.content)
    assert len(queue.pending_for(emu.alice.id)) == 1


async def test_reports_hide_a_result_once_per_member_until_a_moderator_restores_it(safe):
    emu, configured, queue, community = safe
    async with bot_running(emu, configured("normal"), queue, None):
        await ephemeral(emu, emu.admin, "server safety", {"reports_to_hide": 2})
        _, job = await make(emu, queue, emu.alice, image=checkerboard())
        message = await result_in(emu, emu.general, job.id)
        original = pixels(message.attachments[0].data)
        ix = await emu.click(emu.bob, message, f"sd:report:{job.id}")
        assert "Moderators will see it" in (await ix.wait_response(lambda m: m.ephemeral)).content
        ix = await emu.click(emu.bob, message, f"sd:report:{job.id}")
        assert "already reported" in (await ix.wait_response(lambda m: m.ephemeral)).content
        assert pixels(message.attachments[0].data) == original  # one member's reports do not hide it
        listed = await ephemeral(emu, emu.admin, "server review")  # listed from the first report
        assert f"**#{job.id}**" in listed and "nsfw 0% · posted · 1 report" in listed
        ix = await emu.click(emu.admin, message, f"sd:report:{job.id}")
        assert "hidden until a moderator decides" in (await ix.wait_response(lambda m: m.ephemeral)).content
        await emu.wait_for(lambda: pixels(message.attachments[0].data) != original, 10, "the result blurred")
        listed = await ephemeral(emu, emu.admin, "server review")
        assert f"**#{job.id}**" in listed and "hidden by reports · 2 reports" in listed
        ix = await emu.slash(emu.admin, "server review", {"job": job.id, "action": "restore"})
        await ix.wait_response(lambda m: "Restored" in m.content, timeout=10)
        await emu.wait_for(lambda: pixels(message.attachments[0].data) == original, 10, "the result restored")
        assert f"sd:reveal:{job.id}" not in message.custom_ids
    assert queue.get(job.id).safety_review == "restored"


async def test_a_classifier_failing_on_one_image_withholds_it_logs_once_and_loses_no_job(safe, caplog, monkeypatch):
    emu, configured, queue, community = safe
    config = configured("normal", mode="spoiler")
    check = SafetyCheck(ImageClassifier.load(config.safety.classifier))
    run = check.classifier._run

    def fails_on_blue(images):
        if any(image.getpixel((0, 0)) == (0, 0, 255) for image in images):
            raise RuntimeError("the model broke")
        return run(images)

    monkeypatch.setattr(check.classifier, "_run", fails_on_blue)
    caplog.set_level(logging.WARNING)
    async with bot_running(emu, config, queue, None, safety_check=check):
        ix_bad, bad = await make(emu, queue, emu.alice, image=png((64, 64), color="blue"))
        _, good = await make(emu, queue, emu.bob)
        await ix_bad.wait_response(lambda m: "withheld" in m.content and "could not be checked" in m.content, 10)
        await result_in(emu, emu.general, good.id)
    failures = [r for r in caplog.records if "classifier failed on an image" in r.getMessage()]
    assert len(failures) == 1
    assert queue.get(bad.id).status.value == "done" and len(queue.images(bad.id)) == 1  # kept for moderators
    assert queue.get(bad.id).safety_action == "withheld" and queue.get(good.id).safety_action == "posted"


async def test_every_result_has_report_and_a_missing_classifier_refuses_the_modes(queued_setup):
    emu, config, queue, community = queued_setup
    async with bot_running(emu, config, queue, None):
        refused = await ephemeral(emu, emu.admin, "server safety", {"mode": "blur"})
        assert "No image classifier is configured" in refused
        assert "image filter: off" in await ephemeral(emu, emu.admin, "server show")
        _, job = await make(emu, queue, emu.alice)
        message = await result_in(emu, emu.general, job.id)
        assert f"sd:report:{job.id}" in message.custom_ids
    assert queue.get(job.id).safety_flagged is None  # nothing checked, nothing recorded
    assert SafetyRecords(queue.engine).to_review(emu.guild.id) == []


async def test_strikes_warn_then_bar_after_n_withheld_results(safe):
    emu, configured, queue, community = safe
    async with bot_running(emu, configured("nsfw", mode="withhold"), queue, None):
        await ephemeral(emu, emu.admin, "server safety", {"strikes": 2})
        ix, _ = await make(emu, queue, emu.alice)
        first = await ix.wait_response(lambda m: "withheld" in m.content, timeout=10)
        assert "strike 1 of 2" in first.content and not community.is_barred(emu.guild.id, emu.alice.id)
        ix, _ = await make(emu, queue, emu.alice)
        second = await ix.wait_response(lambda m: "withheld" in m.content, timeout=10)
        assert f"<@{emu.alice.id}> is barred after 2 withheld results" in second.content
        refused = await ephemeral(emu, emu.alice, "imagine", {"prompt": "a cat"})
        assert "barred" in refused
        log = await ephemeral(emu, emu.admin, "server log")
        assert "the image filter **bar**" in log
    assert community.is_barred(emu.guild.id, emu.alice.id)


async def test_the_hostile_upload_corpus_through_the_bot_and_its_filter(safe):
    from test_bot_hostile import IMAGES

    emu, configured, queue, community = safe
    async with bot_running(emu, configured("nsfw", mode="blur"), queue, None):
        answers = []
        for i, data in enumerate(IMAGES):
            upload = emu.attachment(f"upload{i}.png", data, "image/png")
            ix = await emu.slash(emu.alice, "img2img", {"prompt": "a cat"}, attachments={"image": upload})
            answers.append((await ix.wait_response(lambda m: m.ephemeral, timeout=20)).content)
        assert not [a for a in answers if "went wrong" in a]
        flagged = [a for a in answers if "flagged by this server's image filter" in a]
        assert len(flagged) >= 4, answers  # every image the decoder took reached the filter
    assert queue.pending_for(emu.alice.id) == []  # each refused: by the decoder, or flagged by the filter
