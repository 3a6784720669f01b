"""``python -m engine generate``, run in-process on the tiny checkpoints the tests write."""

from __future__ import annotations

from PIL import Image

from engine.__main__ import main
from engine.metadata import read_parameters


def test_generate_from_a_single_file_checkpoint(tiny_sd_single_file, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd_single_file),
            "--config",
            str(tmp_path / "absent.toml"),
            "--prompt",
            "a red fox",
            "--seed",
            "7",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "48",
            "--sampler",
            "dpmpp_2m_karras",
            "--count",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    first, second = out, tmp_path / "fox-2.png"
    assert Image.open(first).size == (64, 48)
    assert read_parameters(first.read_bytes())["Seed"] == "7"
    assert read_parameters(second.read_bytes())["Seed"] == "8"
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in capsys.readouterr().out


def test_generate_with_a_second_order_sde_sampler_and_a_schedule_type(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd_folder),
            "--config",
            str(tmp_path / "absent.toml"),
            "--prompt",
            "a red fox",
            "--seed",
            "7",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--sampler",
            "dpmpp_sde",
            "--schedule",
            "sgm_uniform",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert "Sampler: DPM++ SDE" in capsys.readouterr().out


def test_img2img_from_a_diffusers_folder(tiny_sd_folder, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (100, 80), (200, 30, 30)).save(init)
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_sd_folder),
            "--config",
            str(tmp_path / "absent.toml"),
            "--prompt",
            "a red fox",
            "--steps",
            "4",
            "--width",
            "64",
            "--height",
            "64",
            "--init-image",
            str(init),
            "--strength",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    params = read_parameters(out.read_bytes())
    assert params["Denoising strength"] == "0.5" and params["Seed"].isdigit()  # random seed, recorded


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "nope.safetensors"),
            "--config",
            str(tmp_path / "x.toml"),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "nope.safetensors" in err
