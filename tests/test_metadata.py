"""PNG parameters in AUTOMATIC1111's infotext format, written and read back."""

from __future__ import annotations

import io

from PIL import Image

from engine.metadata import encode_png, infotext, parse_infotext, read_parameters
from engine.types import GenerationRequest


def make_request(**fields) -> GenerationRequest:
    defaults = dict(
        job_id=42,
        prompt="a red fox, snow",
        negative_prompt="blurry",
        seed=1,
        steps=25,
        guidance=7.0,
        width=512,
        height=768,
        sampler="euler_a",
    )
    return GenerationRequest.of(**(defaults | fields))


def test_infotext_is_automatic1111s_format():
    assert infotext(make_request(), 1, "sd15") == (
        "a red fox, snow\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x768, "
        "Model: sd15, RNG: CPU, Job id: 42"
    )


def test_img2img_and_variation_fields():
    text = infotext(
        make_request(
            init_image=b"png",
            strength=0.75,
            variation_seed=9,
            variation_strength=0.25,
            guidance=7.5,
            negative_prompt="",
        ),
        2,
        "sd15",
    )
    assert "Negative prompt" not in text
    assert text.endswith(
        "CFG scale: 7.5, Seed: 2, Size: 512x768, Model: sd15, "
        "Variation seed: 10, Variation seed strength: 0.25, Denoising strength: 0.75, RNG: CPU, Job id: 42"
    )


def test_png_round_trip():
    request = make_request(prompt="a fox\non two lines", sampler="dpmpp_2m_karras")
    png = encode_png(Image.new("RGB", (8, 8)), infotext(request, 5, "my model, v2", "6ce0161689"), request.job_id)
    params = read_parameters(png)
    assert params["Prompt"] == "a fox\non two lines"
    assert params["Negative prompt"] == "blurry"
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["Model hash"] == "6ce0161689" and params["RNG"] == "CPU"
    assert params["Seed"] == "5" and params["Steps"] == "25" and params["Size"] == "512x768"
    assert params["Model"] == "my model, v2"  # quoted because of the comma, unquoted when read
    assert params["job_id"] == "42" and params["Job id"] == "42"
    with Image.open(io.BytesIO(png)) as image:
        assert image.text["parameters"].startswith("a fox\non two lines\nNegative prompt: blurry\nSteps: 25")


def test_parses_text_written_by_automatic1111():
    text = (
        "masterpiece, a castle\nNegative prompt: lowres, bad hands\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 123, Size: 768x512, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.6.0'
    )
    params = parse_infotext(text)
    assert params["Prompt"] == "masterpiece, a castle"
    assert params["Negative prompt"] == "lowres, bad hands"
    assert params["CFG scale"] == "6.5" and params["Lora hashes"] == "a: 1, b: 2"


def test_a_png_without_parameters_reads_as_empty_prompt():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    assert read_parameters(buffer.getvalue()) == {"Prompt": "", "Negative prompt": ""}


def test_an_edit_names_the_job_it_was_made_from():
    from engine.metadata import infotext, parse_infotext
    from engine.types import GenerationRequest

    made = GenerationRequest.of(9, prompt="a fox", seed=1)
    edit = GenerationRequest(10, made.params, parent_id=9)
    assert parse_infotext(infotext(edit, 1, "m"))["Parent job id"] == "9"
    assert "Parent job id" not in parse_infotext(infotext(made, 1, "m"))


def source_png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "blue").save(out, "PNG")
    return out.getvalue()


def test_upscale_subtle_writes_the_sources_parameters_and_automatic1111s_extras_fields():
    request = make_request(
        width=1024,
        height=1536,
        init_image=source_png((512, 768)),
        strength=0.4,
        upscaler="4x-Ultra, v2",
        upscale_only=True,
    )
    fields = parse_infotext(infotext(request, 1, "sd15"))
    assert fields["Size"] == "512x768" and "Denoising strength" not in fields
    assert fields["Postprocess upscale by"] == "2" and fields["Postprocess upscaler"] == "4x-Ultra, v2"
    # A size capped by the limits is no exact multiple: A1111's "upscale to" then.
    capped = parse_infotext(infotext(request.__class__(42, request.params.but(height=1024, width=680)), 1, "sd15"))
    assert capped["Postprocess upscale to"] == "680x1024" and "Postprocess upscale by" not in capped


def test_upscale_creative_writes_automatic1111s_hires_fields_with_the_denoising_strength():
    request = make_request(width=1024, height=1536, init_image=source_png((512, 768)), strength=0.4, upscaler="Lanczos")
    fields = parse_infotext(infotext(request, 1, "sd15"))
    assert (fields["Size"], fields["Denoising strength"]) == ("512x768", "0.4")
    assert fields["Hires upscale"] == "2" and fields["Hires upscaler"] == "Lanczos"
    assert "Postprocess upscaler" not in fields
    # An img2img job without an upscaler writes none of them.
    plain = parse_infotext(infotext(make_request(init_image=source_png((512, 768)), strength=0.4), 1, "sd15"))
    assert not {"Hires upscaler", "Postprocess upscaler"} & set(plain) and plain["Size"] == "512x768"
