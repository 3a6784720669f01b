"""Flux.1 end to end (issue 21): the real bot client against the Discord emulator with a tiny
Flux dev model. The bot takes the family's defaults (sizes in multiples of 16, steps, guidance,
samplers, no negative prompt), refuses in words what does not apply to Flux before anything is
queued, posts PNGs with Forge's infotext, and the result buttons (reroll, Vary (Region)) work."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pytest
from PIL import Image

from bot.wiring import with_families
from bot_harness import bot_config, bot_running, results, running_setup
from db.models import JobKind
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture
from engine.metadata import read_parameters
from tinyflow import save_flux_folder

pytestmark = pytest.mark.asyncio

SIZES = ("64x64", "64x128", "72x64")  # 72 is not on Flux's 16-pixel grid: not offered


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_model(flux_folder):
    import torch

    from engine.families.loading import load_model

    return load_model(str(flux_folder), device="cpu", dtype=torch.float32, name="tiny-flux", progress=False)


@pytest.fixture
def flux_setup(flux_model, flux_folder, tmp_path, emulator: Emulator):
    config = bot_config(str(flux_folder), f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    config = replace(
        config,
        model=replace(config.model, name="tiny-flux"),
        generation=replace(config.generation, sdxl_sizes=SIZES, default_negative_prompt="blurry, ugly"),
    )
    config = with_families(config, "flux")  # as the wiring does, so the worker gets the same limits
    with running_setup(emulator, config, flux_model, tmp_path) as parts:
        yield parts


def job_of(message) -> int:
    return int(re.search(r"sd:reroll:(\d+)", " ".join(message.custom_ids))[1])


async def wait_result(emu, pred=lambda m: True):
    return await emu.wait_for(
        lambda: next((m for m in reversed(results(emu)) if pred(m)), None), what="a posted result", timeout=300
    )


async def refused(emu, options: dict) -> str:
    ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox", **options})
    answer = await ix.wait_response(lambda m: m.ephemeral, timeout=30)
    return answer.content


async def test_imagine_on_flux_takes_its_defaults_and_writes_forges_infotext(flux_setup):
    emu, config, queue, worker = flux_setup
    gen = config.generation
    assert gen.family == "flux" and gen.sizes == ("64x64", "64x128")  # 72x64 is off the 16-pixel grid
    assert gen.default_steps == 8 and gen.default_guidance == 3.5  # 28 steps, capped by max_steps 8
    assert gen.default_negative_prompt == "" and "euler_a" not in gen.samplers
    async with bot_running(emu, config, queue, worker, model_family="flux"):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse at dusk", "seed": 5, "steps": 3})
        assert await ix.wait_ack() == 5
        first = await wait_result(emu)
        data = first.attachments[0].data
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        params = read_parameters(data)
        assert params["Model"] == "tiny-flux" and params["Sampler"] == "Euler"
        assert (params["CFG scale"], params["Distilled CFG Scale"], params["Schedule type"]) == ("1", "3.5", "Simple")
        assert params.get("Negative prompt", "") == ""  # the server's default negative prompt is not Flux's
        job = queue.get(job_of(first))
        assert (job.negative_prompt, job.guidance, job.sampler) == ("", 3.5, "euler")

        # Options that do not apply to Flux are refused in words, before anything is queued.
        assert "no negative prompt" in await refused(emu, {"negative": "blurry"})
        assert "must be one of: euler" in await refused(emu, {"sampler": "euler_a"})  # the choices are Flux's
        assert "CLIP skip does not apply" in await refused(emu, {"clip_skip": 2})

        # A result button: reroll, by another member.
        await emu.click(emu.bob, first, f"sd:reroll:{job_of(first)}")
        rerolled = await wait_result(emu, lambda m: job_of(m) != job_of(first))
        assert read_parameters(rerolled.attachments[0].data)["Distilled CFG Scale"] == "3.5"
        assert job_of(rerolled) == job_of(first) + 1  # the refused commands stored no job


async def test_vary_region_on_flux_repaints_only_the_chosen_squares(flux_setup):
    emu, config, queue, worker = flux_setup
    async with bot_running(emu, config, queue, worker, model_family="flux"):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a lighthouse", "steps": 3})
        await ix.wait_ack()
        first = await wait_result(emu)
        parent = job_of(first)
        press = await emu.click(emu.bob, first, f"sd:region:{parent}:0")
        picker = await press.wait_response(lambda m: m.ephemeral)
        chosen = await emu.click(emu.bob, picker, f"sd:cells:{parent}:0", values=["1"])
        assert await chosen.wait_ack() == 9  # the prompt form
        submitted = await emu.submit_modal(emu.bob, chosen, {"Prompt for the chosen squares": "a red door"})
        await submitted.wait_response(lambda m: "queued" in m.content)
        varied = await wait_result(emu, lambda m: job_of(m) != parent)
    job = queue.get(job_of(varied))
    assert job.kind is JobKind.region and job.prompt == "a red door"
    before = Image.open(io.BytesIO(queue.images(parent)[0].png)).convert("RGB")
    after = Image.open(io.BytesIO(queue.images(job.id)[0].png)).convert("RGB")
    # Square 9 (bottom right) is kept: pasted back from the image it was made from.
    assert after.crop((48, 48, 64, 64)).tobytes() == before.crop((48, 48, 64, 64)).tobytes()
    assert after.crop((0, 0, 16, 16)).tobytes() != before.crop((0, 0, 16, 16)).tobytes()
