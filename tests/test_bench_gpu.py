"""bench/gpu.py, the one GPU check: its pieces run here at tiny size, so the script cannot rot
between the rare runs on a GPU; without CUDA it says what to do instead of failing somewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu


def test_without_cuda_it_says_how_to_run_the_pieces(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu.main(["--out", "unused.json"])
    assert "needs a CUDA GPU" in str(stopped.value) and "--tiny --device cpu" in str(stopped.value)


def test_full_size_is_refused_on_the_cpu():
    with pytest.raises(SystemExit) as stopped:
        gpu.main(["--device", "cpu", "--out", "unused.json"])
    assert "--tiny" in str(stopped.value)


def test_tiny_run_on_the_cpu_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    gpu.main(["--tiny", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    first, sdxl = results["sizes"]
    assert (first["family"], sdxl["family"]) == ("sd1", "sdxl")
    assert set(first["images_per_second"]) == {"batched_eager", "batched_graphs", "serial", "diffusers"}
    assert all(ips > 0 for ips in first["images_per_second"].values())
    assert set(first["latency_seconds"]) == {"batched_eager", "batched_graphs", "diffusers"}
    assert "batched_graphs / diffusers (latency)" in first["ratios"]
    assert set(results["loras"]["images_per_second"]) == {"shared", "by_set"}  # issue 23's case
    assert results["loras"]["ratio"] > 0
    assert first["peak_memory_gib"] == {}  # no GPU: nothing measured, nothing made up
    assert sdxl["images"]["batched_eager"] == sdxl["jobs"]
    flux = [run for run in results["flow"] if run["family"] == "flux"]
    assert [run["weights"] for run in flux] == ["float32", "float8_e4m3fn"]  # the same weights, two storages
    assert flux[1]["transformer_bytes"] < flux[0]["transformer_bytes"] / 2
    assert {run["family"] for run in results["flow"]} == {"flux", "sd3"}
    assert all(set(run["seconds"]) == {"1 rows", "2 rows"} and run["peak_memory_gib"] == {} for run in results["flow"])
    printed = capsys.readouterr().out
    assert "batched_graphs / batched_eager" in printed and "written to" in printed
