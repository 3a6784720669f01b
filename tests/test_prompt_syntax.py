"""engine/prompt_syntax.py: prompts read without torch (what the bot checks), and clear refusals
for what cannot be read. The emphasis results themselves are checked in tests/test_prompts.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.errors import GenerationError
from engine.prompt_syntax import PromptSyntaxError, count_tokens, lora_key, parse_lora_key, parse_prompt_attention


@pytest.mark.slow
def test_reading_and_counting_a_prompt_never_imports_torch():
    code = """
import sys
from engine.errors import GenerationError
from engine.prompt_syntax import chunks_needed, count_tokens, find_lora, lora_key, parse_lora_key
tokens = count_tokens("a (red:1.2) fox, [blurry] BREAK <lora:detail:0.8> " + "cat " * 80)
assert chunks_needed(tokens) == 3, tokens
parse_lora_key(lora_key("a fox <lora:detail:0.8>"))
try:
    find_lora(None, "detail")
except GenerationError:
    pass
print(sorted(name for name in ("torch", "diffusers", "transformers.models.clip.modeling_clip")
             if name in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "prompt, shown, written",
    [
        ("a (fox:1.2.3) in snow", "(fox:1.2.3)", "1.2.3"),
        ("(fox:.)", "(fox:.)", "."),
        ("((fox: 1..5 ))", "(fox: 1..5 )", "1..5"),
        ("(fox:-.)", "(fox:-.)", "-."),
    ],
)
def test_a_weight_that_is_not_a_number_is_refused_saying_what_to_write(prompt, shown, written):
    with pytest.raises(PromptSyntaxError) as raised:
        parse_prompt_attention(prompt)
    message = str(raised.value)
    assert message == (
        f"“{shown}”: {written!r} is not a weight. Write one number after the colon, such as "
        "(word:1.2), or \\( and \\) for brackets that are part of the text."
    )
    # What the bot catches (ValueError, or the engine's GenerationError) and what the engine shows.
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, GenerationError)


def test_a_malformed_weight_with_no_opening_bracket_is_text_as_in_a1111():
    assert parse_prompt_attention("ratio 1.2.3) fox:1.2.3)") == [("ratio 1.2.3) fox:1.2.3)", 1.0)]


def test_lora_tags_take_no_tokens_since_the_text_encoder_never_sees_them():
    assert count_tokens("a red fox <lora:detail:0.8>, <lora:style v2>") == count_tokens("a red fox, ")


def test_the_old_names_still_import_from_prompts_and_lora():
    from engine import prompt_syntax
    from engine.families.sd import prompts
    from engine.features import lora

    assert prompts.parse_prompt_attention is prompt_syntax.parse_prompt_attention
    assert prompts.count_tokens is prompt_syntax.count_tokens and prompts.CHUNK_LENGTH == 75
    assert lora.lora_key is lora_key and lora.parse_lora_key is parse_lora_key


def test_the_engine_fails_a_job_with_an_unreadable_weight_with_that_message(tiny_model):
    from engine.config.settings import EngineSettings, GenerationSettings
    from engine.serving.worker import EngineWorker
    from engine.types import GenerationRequest

    worker = EngineWorker(tiny_model, EngineSettings(preview_every=0), GenerationSettings())
    worker.start()
    try:
        with pytest.raises(PromptSyntaxError, match=r"“\(fox:1\.2\.3\)”: '1\.2\.3' is not a weight"):
            worker.generate_blocking(
                GenerationRequest.of(1, prompt="a (fox:1.2.3)", seed=1, steps=2, width=64, height=64)
            )
        assert worker.generate_blocking(
            GenerationRequest.of(2, prompt="a (fox:1.2)", seed=1, steps=2, width=64, height=64)
        ).images
    finally:
        worker.stop()
