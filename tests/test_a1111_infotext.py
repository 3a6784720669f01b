"""Our infotext as AUTOMATIC1111 reads it: RNG, Sampler + Schedule type, Model hash.

``a1111_parse`` below is AUTOMATIC1111's ``parse_generation_parameters`` (``modules/infotext_utils.py``)
written again from what it does, for the fields we write: the same ``Key: value`` pattern on the
last line, JSON-quoted values unquoted, ``WxH`` values split into ``-1``/``-2``, and the defaults it
fills for missing fields (``RNG`` GPU, ``Schedule type`` Automatic), which are what decide whether
A1111 makes the same image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch

from engine.hashes import HashCache, sha256_of_file
from engine.metadata import INFOTEXT_SAMPLERS, infotext, read_parameters
from engine.params import SAMPLER_NAMES
from engine.types import GenerationRequest

A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
#: ``modules/sd_samplers_kdiffusion.py`` and ``sd_samplers_timesteps.py`` labels (v1.9+).
A1111_SAMPLERS = {
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM",
    "DDIM CFG++",
    "PLMS",
    "UniPC",
    "LCM",
}
#: ``modules/sd_schedulers.py`` labels.
A1111_SCHEDULE_TYPES = {
    "Automatic",
    "Uniform",
    "Karras",
    "Exponential",
    "Polyexponential",
    "SGM Uniform",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
}


def a1111_parse(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = A1111_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    result.setdefault("RNG", "GPU")  # A1111: "Missing RNG means the default was set, which is GPU RNG"
    result.setdefault("Schedule type", "Automatic")
    return result


def make_request(**fields) -> GenerationRequest:
    defaults = dict(
        job_id=7,
        prompt="a castle, at dusk",
        negative_prompt="lowres",
        seed=123,
        steps=20,
        guidance=7.0,
        width=512,
        height=768,
        sampler="euler_a",
    )
    return GenerationRequest.of(**(defaults | fields))


# ---------------------------------------------------------------------------- fields


def test_a1111_reads_our_noise_as_its_cpu_rng():
    assert a1111_parse(infotext(make_request(), 123, "sd15"))["RNG"] == "CPU"


@pytest.mark.parametrize(
    ("sampler", "label", "schedule_type"),
    [
        ("euler_a", "Euler a", "Automatic"),
        ("euler", "Euler", "Automatic"),
        ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
        ("ddim", "DDIM", "Automatic"),
    ],
)
def test_sampler_and_schedule_type_as_a1111_writes_them(sampler, label, schedule_type):
    text = infotext(make_request(sampler=sampler), 123, "sd15")
    assert f"Sampler: {label}, Schedule type: {schedule_type}, CFG scale: 7," in text
    parsed = a1111_parse(text)
    assert (parsed["Sampler"], parsed["Schedule type"]) == (label, schedule_type)


def test_every_sampler_we_offer_has_a1111_labels():
    assert set(INFOTEXT_SAMPLERS) >= set(SAMPLER_NAMES)
    for label, schedule_type in INFOTEXT_SAMPLERS.values():
        assert label in A1111_SAMPLERS and schedule_type in A1111_SCHEDULE_TYPES


def test_every_field_reads_back_in_a1111_as_written():
    request = make_request(
        init_image=b"png",
        strength=0.6,
        variation_seed=5,
        variation_strength=0.3,
        guidance=6.5,
        sampler="dpmpp_2m_karras",
    )
    text = infotext(request, 124, "my model, v2", "6ce0161689")
    parsed = a1111_parse(text)
    assert parsed["Prompt"] == "a castle, at dusk" and parsed["Negative prompt"] == "lowres"
    assert (
        parsed
        | {
            "Steps": "20",
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": "6.5",
            "Seed": "124",
            "Size-1": "512",
            "Size-2": "768",
            "Model hash": "6ce0161689",
            "Model": "my model, v2",
            "Variation seed": "6",
            "Variation seed strength": "0.3",
            "Denoising strength": "0.6",
            "RNG": "CPU",
        }
        == parsed
    )
    # A1111's field order (create_infotext), so a diff against one of its own infotexts is clean.
    keys = [key for key, _ in A1111_PARAM.findall(text.split("\n")[-1])]
    assert keys[:7] == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash"]


def test_no_model_hash_field_without_a_file():
    assert "Model hash" not in infotext(make_request(), 123, "owner/some-model", None)


# ---------------------------------------------------------------------------- model hash


@pytest.fixture
def checkpoint(tmp_path):
    """A file of 2.5 chunks of bytes (a chunked hash that dropped a chunk would show)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(5 << 19))
    return path


def test_model_hash_is_a1111s_short_sha256_of_the_whole_file(checkpoint, tmp_path):
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert sha256_of_file(checkpoint) == expected
    assert HashCache(tmp_path / "hashes.json").short_hash(checkpoint) == expected[:10]


def rewrite_keeping_size_and_mtime(path):
    """Other bytes, same size and mtime: a cache that hashed again would see the new bytes."""
    stat = path.stat()
    path.write_bytes(os.urandom(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_hash_is_remembered_by_path_size_and_mtime_across_restarts(checkpoint, tmp_path):
    cache_file = tmp_path / "cache" / "hashes.json"
    first = HashCache(cache_file).short_hash(checkpoint)
    rewrite_keeping_size_and_mtime(checkpoint)
    assert HashCache(cache_file).short_hash(checkpoint) == first  # a new process: read from the file
    assert str(checkpoint.resolve()) in json.loads(cache_file.read_text())
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    again = HashCache(cache_file).short_hash(checkpoint)
    assert again == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10] != first


def test_memory_only_cache_and_a_broken_cache_file_still_hash(checkpoint, tmp_path):
    memory = HashCache(None)
    first = memory.short_hash(checkpoint)
    rewrite_keeping_size_and_mtime(checkpoint)
    assert memory.short_hash(checkpoint) == first
    broken = tmp_path / "hashes.json"
    broken.write_text("{not json")
    assert HashCache(broken).short_hash(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert json.loads(broken.read_text())  # rewritten whole


def test_a_single_file_checkpoint_puts_its_hash_in_every_png(tiny_sd_single_file, tiny_model, tmp_path):
    from engine.families.loading import load_model
    from engine.pipeline import Pipeline

    model = load_model(
        str(tiny_sd_single_file),
        device="cpu",
        dtype=torch.float32,
        progress=False,
        hashes=HashCache(tmp_path / "hashes.json"),
    )
    expected = hashlib.sha256(tiny_sd_single_file.read_bytes()).hexdigest()[:10]
    assert model.info.file_hash == expected
    request = make_request(steps=2, width=64, height=64)
    png = Pipeline(model).generate(request).images[0].png
    assert read_parameters(png)["Model hash"] == expected
    # A diffusers folder is no single file: A1111 has no hash for it, so the field is left out.
    assert tiny_model.info.file_hash is None
    assert "Model hash" not in read_parameters(Pipeline(tiny_model).generate(request).images[0].png)
