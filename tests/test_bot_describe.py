"""/describe end to end: a tiny random-weight BLIP captioner (transformers' real classes) and a
tiny WD14-shaped ONNX tagger (onnxruntime), each alone and both, on the worker, through the
queue, the real bot and the emulator; each of the four buttons queues its prompt."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from PIL import Image

from bot_harness import bot_config, bot_running, help_embeds, png, running_setup
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.config.describe_settings import DescribeSettings
from engine.features.describe import PROMPTS, Describer
from tiny_captioner import WORDS, save_tiny_captioner
from tiny_tagger import PROMPT_TAGS, save_tiny_tagger


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return save_tiny_tagger(tmp_path_factory.mktemp("tagger"))


def test_four_different_prompts_and_the_same_four_for_the_same_seed(captioner):
    describer = Describer(str(captioner))
    image = Image.new("RGB", (48, 40), "red")
    prompts = describer.prompts(image, 7)
    assert len(prompts) == PROMPTS == len(set(prompts))
    assert all(word in WORDS for prompt in prompts for word in prompt.split())
    assert describer.prompts(image, 7) == prompts


@pytest.mark.asyncio
@pytest.mark.parametrize("models", ["captioner", "tagger", "both"])
async def test_describe_queues_a_job_posts_four_prompts_and_each_button_imagines_one(
    tiny_model, tiny_sd_folder, tmp_path, emulator: Emulator, captioner, tagger, models
):
    config = bot_config(str(tiny_sd_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    describe = DescribeSettings(
        captioner=str(captioner) if models != "tagger" else "", tagger=str(tagger) if models != "captioner" else ""
    )
    config = replace(config, describe=describe)
    with running_setup(emulator, config, tiny_model, tmp_path) as (emu, config, queue, worker):
        async with bot_running(emu, config, queue, worker):
            upload = emu.attachment("photo.png", png((48, 40), "green"))
            ix = await emu.slash(emu.alice, "describe", attachments={"image": upload})
            await ix.wait_response(lambda m: "queued" in m.content)
            result = await emu.wait_for_message(
                emu.general, lambda m: any(c.startswith("sd:prompt:") for c in m.custom_ids), timeout=60
            )
            listed = result.embeds[0]["description"].splitlines()
            assert len(listed) == PROMPTS and result.attachments
            buttons = [c for c in result.custom_ids if c.startswith("sd:prompt:")]
            assert len(buttons) == PROMPTS
            press = await emu.click(emu.bob, result, buttons[1])
            answer = await press.wait_response(lambda m: "queued" in m.content)
        imagined = queue.get(int(re.search(r"#(\d+)", answer.content).group(1)))
        described = queue.get(imagined.id - 1)
    assert (imagined.kind.value, imagined.requester_id, described.kind.value) == ("txt2img", emu.bob.id, "describe")
    assert (described.status.value, described.attempts) == ("done", 1)  # the attempt was counted
    tags = ", ".join(PROMPT_TAGS)
    if models == "captioner":
        assert listed[1].split(" ", 1)[1] == imagined.prompt
    elif models == "tagger":  # the second: the tags over 0.5 (TAG_THRESHOLDS)
        assert imagined.prompt == ", ".join(PROMPT_TAGS[:5])
    else:  # a sentence with the tags appended (the fourth is the tags alone)
        assert imagined.prompt.endswith(", " + tags) and imagined.prompt != tags


def test_a_captioner_that_is_neither_a_folder_nor_a_hub_id_stops_the_start(tmp_path):
    from engine.config.describe_settings import parse_describe
    from engine.config.toml_config import ConfigError

    assert parse_describe({}).captioner == ""
    assert parse_describe({"describe": {"captioner": "Salesforce/blip-image-captioning-large"}}).captioner
    with pytest.raises(ConfigError, match="describe.captioner"):
        parse_describe({"describe": {"captioner": str(tmp_path / "missing")}})


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("models", "says"),
    [
        (DescribeSettings(captioner="owner/captioner"), "Four prompts for an image"),
        (DescribeSettings(tagger="owner/tagger"), "Four booru-tag prompts"),
        (DescribeSettings("owner/captioner", "owner/tagger"), "Four prompts: text + tags"),
    ],
)
async def test_help_names_describe_and_still_fits_discords_embeds(tmp_path, emulator: Emulator, models, says):
    from bot_harness import new_queue

    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(config, describe=models)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    async with bot_running(emulator, config, queue, None):
        embeds = await help_embeds(emulator)
    engine.dispose()
    text = "\n".join(e["description"] for e in embeds)
    assert "`/describe image`: " + says + "\n" in text and "`{a, b}`: a job each" in text
    assert text.rstrip().endswith("jobs waiting at a time.")  # nothing was cut to fit the embeds
