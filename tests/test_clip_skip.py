"""CLIP skip as AUTOMATIC1111 applies it: the hidden state N layers from the end, then the final
layer norm (SD 1.x); written as ``Clip skip: N`` when N > 1; a model's default from its config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.families.sd.denoiser import PromptEncoder, final_layer_norm
from engine.metadata import infotext, parse_infotext
from engine.types import GenerationRequest


def encoder_of(model) -> PromptEncoder:
    return PromptEncoder(model.text_encoders, model.tokenizers, model.device, model.dtype)


def test_clip_skip_reads_an_earlier_layer_through_the_final_layer_norm(tiny_model):
    prompts = encoder_of(tiny_model)
    tokenizer, encoder = tiny_model.tokenizers[0], tiny_model.text_encoders[0]
    ids = tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        states = encoder(ids, output_hidden_states=True).hidden_states
        expected = final_layer_norm(encoder)(states[-2])[0]
    skipped = prompts("a red fox", clip_skip=2).hidden
    assert torch.allclose(skipped, expected, atol=1e-5)
    plain = prompts("a red fox").hidden
    assert not torch.allclose(plain, skipped, atol=1e-3)
    assert torch.allclose(prompts("a red fox", clip_skip=1).hidden, plain)  # cached apart, by clip skip


def test_infotext_writes_clip_skip_only_past_the_default():
    request = GenerationRequest.of(3, prompt="a fox", seed=1, clip_skip=2)
    assert parse_infotext(infotext(request, 1, "m"))["Clip skip"] == "2"
    assert "Clip skip" not in parse_infotext(infotext(GenerationRequest.of(3, prompt="a fox", seed=1), 1, "m"))


@pytest.mark.asyncio
async def test_clip_skip_and_schedule_options_and_the_models_default(tmp_path):
    from bot_harness import bot_config, bot_running, new_queue
    from discord_emulator import Emulator, patch_discord

    async with Emulator() as emu:
        with patch_discord(emu):
            config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emu.guild.id)
            config = replace(config, model=replace(config.model, clip_skip=2))
            engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
            async with bot_running(emu, config, queue, None):
                for options in ({}, {"clip_skip": 1, "schedule": "karras"}, {"clip_skip": 13}, {"schedule": "nope"}):
                    ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox", **options})
                    await ix.wait_response()
            engine.dispose()
    jobs = queue.pending_for(emu.alice.id)
    assert [(job.clip_skip, job.schedule) for job in jobs] == [(2, "automatic"), (1, "karras")]
