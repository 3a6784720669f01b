"""One GPU check (issue 11 §6): everything the engine's GPU targets are judged by, in one run.

On one CUDA GPU, in under 8 minutes, on random-weight models built with diffusers' own classes in
SD 1.5's and SDXL's shapes (nothing is downloaded), with production defaults (euler_a, CFG 7,
previews every 2 steps on our side; diffusers has none and gets no preview work):

- SD 1.5-sized, 16 jobs from 8 members, 512x512, 20 steps, all submitted at once:
  (i) our engine batched, eager; (ii) batched with CUDA graphs (``engine.compile``, after one run
  that captures them); (iii) our engine one job at a time; (iv) diffusers' StableDiffusionPipeline
  one job at a time on the same UNet;
- one job on an idle engine (eager, and with graphs) against diffusers' latency for it;
- SDXL-sized at 1024x1024: our engine batched against diffusers' XL pipeline one at a time;
- peak GPU memory per (size, rows) for each run;
- LoRAs (issue 23, ``bench/lora_throughput.py``): the SD 1.5-sized jobs over 4 LoRA sets and none,
  in one shared batch (LoRA rows) against batched by set through peft, as before the slots;
- SD 3.5 and Flux.1 (``bench/gpu_flow.py``): FLUX.1-dev- and SD 3.5 Large-sized at 1024x1024, 1
  and 4 rows, weights in bf16 and stored in float8: peak GPU memory per (family, size, rows).

Both sides encode a PNG per image. It writes one JSON file and prints a table with the ratios.

    python -m bench.gpu                          # on a CUDA GPU; writes gpu-bench.json
    python -m bench.gpu --tiny --device cpu      # the same pieces at tiny size (tests/test_bench_gpu.py)

A benchmark, not a test: it asserts nothing, and its numbers depend on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from engine.torch_builds import torchvision_importable  # noqa: E402

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from gpu_flow import flow_runs  # noqa: E402
from throughput import SCHEDULER, build_components, loaded_model, run_diffusers  # noqa: E402

from engine.config.settings import EngineSettings, GenerationSettings  # noqa: E402
from engine.serving.worker import EngineWorker  # noqa: E402
from engine.types import GenerationRequest  # noqa: E402

NO_CUDA = (
    "bench.gpu needs a CUDA GPU and torch cannot see one here (torch.cuda.is_available() is False). "
    "Run it on a machine with one, or check its pieces on this machine with: "
    "python -m bench.gpu --tiny --device cpu"
)
PREVIEW_EVERY = 2  # production's default (engine.preview_every)


@dataclass(frozen=True)
class Run:
    """What one model size runs: its jobs, and how many times the latency is measured."""

    unet: str  # a build_components name ("sd15", "sdxl") or "tiny"/"tiny-sdxl"
    size: int
    jobs: int
    members: int
    steps: int
    diffusers_jobs: int  # jobs diffusers runs one at a time (its images/s is measured on these)
    latency_repeats: int = 0  # 0: no latency measurement for this size


FULL = (Run("sd15", 512, 16, 8, 20, 16, latency_repeats=3), Run("sdxl", 1024, 8, 4, 20, 2))
TINY = (Run("tiny", 64, 4, 2, 4, 2, latency_repeats=1), Run("tiny-sdxl", 64, 2, 2, 3, 1))


def components_for(run: Run, device: torch.device) -> tuple[dict, str]:
    """Random-weight components (made on the device: an SDXL UNet initialised on the CPU is slow)."""
    if run.unet.startswith("tiny"):
        from tinymodel import build_tiny_components

        family = "sdxl" if run.unet == "tiny-sdxl" else "sd1"
        components = build_tiny_components(family)
        components.pop("scheduler")
        return components, "sdxl" if family == "sdxl" else "tiny"
    torch.manual_seed(0)
    with torch.device(device):
        return build_components(run.unet), run.unet


def requests(run: Run, first_id: int = 0, count: int | None = None) -> list[GenerationRequest]:
    """Job i from member i % members, each member with its own prompt, euler_a as in production."""
    return [
        GenerationRequest.of(
            job_id=first_id + i,
            prompt=f"member {i % run.members}: a lighthouse at dusk, style {i % run.members}",
            negative_prompt="blurry",
            seed=1000 + i,
            steps=run.steps,
            guidance=7.0,
            width=run.size,
            height=run.size,
            sampler="euler_a",
        )
        for i in range(run.jobs if count is None else count)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run_engine(worker: EngineWorker, jobs: list[GenerationRequest]) -> None:
    """Every job submitted at once, with a progress sink (so previews are made, as in production)."""

    async def all_jobs():
        await asyncio.gather(*(worker.generate(job, lambda progress: None) for job in jobs))

    asyncio.run(all_jobs())


class PeakMemory:
    """Peak GPU memory per (size, rows), in GiB; nothing on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peaks = device, {}

    def measure(self, label: str, fn: Callable[[], float]) -> float:
        """``fn()``'s value, and its peak memory under ``label``."""
        if self.device.type != "cuda":
            return fn()
        torch.cuda.reset_peak_memory_stats(self.device)
        value = fn()
        self.peaks[label] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return value


def diffusers_pipeline(components: dict, family: str):
    parts = {k: v for k, v in components.items() if k in ("unet", "vae", "text_encoder", "tokenizer")}
    scheduler = EulerAncestralDiscreteScheduler(**SCHEDULER)
    if family == "sdxl":
        parts |= {k: components[k] for k in ("text_encoder_2", "tokenizer_2")}
        pipe = StableDiffusionXLPipeline(**parts, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def graphs_compiler(device: torch.device) -> Callable[[torch.nn.Module], Callable]:
    """CUDA graphs on a GPU; on the CPU dynamo's eager backend (the same tracing, nothing to build)."""
    if device.type == "cuda":
        return functools.partial(torch.compile, mode="reduce-overhead", dynamic=False)
    return functools.partial(torch.compile, backend="eager", dynamic=False)


def measure_size(run: Run, device: torch.device, dtype: torch.dtype, graphs: bool, log: Callable[[str], None]) -> dict:
    """Every figure for one model size; the models are let go when it returns."""
    components, name = components_for(run, device)
    model = loaded_model(components, name, device, dtype)
    family = model.info.family
    limits = GenerationSettings(max_steps=max(run.steps, 50), max_width=run.size, max_height=run.size)
    settings = EngineSettings(max_batch=run.jobs, preview_every=PREVIEW_EVERY)
    workers = {
        "batched_eager": EngineWorker(model, settings, limits),
        "serial": EngineWorker(model, dataclasses.replace(settings, max_batch=1), limits),
    }
    if graphs:
        compiled = dataclasses.replace(settings, compile="reduce-overhead")
        workers["batched_graphs"] = EngineWorker(model, compiled, limits, compiler=graphs_compiler(device))
    pipe = diffusers_pipeline(components, family)
    jobs = requests(run)
    memory = PeakMemory(device)
    size = f"{run.size}x{run.size}"
    out: dict = {"unet": run.unet, "family": family, "size": size, "jobs": run.jobs, "members": run.members}
    out["steps"], out["sampler"], out["preview_every"] = run.steps, "euler_a", PREVIEW_EVERY
    seconds: dict[str, float] = {}
    for worker in workers.values():
        worker.start()
    try:
        # Warm-up: kernels picked, memory pooled; the prompts of the timed jobs stay uncached.
        warm = requests(dataclasses.replace(run, steps=2), first_id=-100, count=1)[0]
        for worker in workers.values():
            run_engine(worker, [warm])
        run_diffusers(pipe, warm, device)
        if "batched_graphs" in workers:
            started = time.perf_counter()
            run_engine(workers["batched_graphs"], jobs)  # captures the graphs this batch needs
            out["graphs_capture_seconds"] = round(time.perf_counter() - started, 2)
            log(f"{size}: graphs captured in {out['graphs_capture_seconds']} s")
        if run.latency_repeats:
            out["latency_seconds"] = latency(run, workers, pipe, device)
            log(f"{size}: latency {out['latency_seconds']}")
        for label, worker in workers.items():
            runs = jobs if label != "serial" else jobs[: run.diffusers_jobs]
            at_once = 1 if label == "serial" else run.jobs  # one image a job: its rows
            seconds[label] = memory.measure(
                f"{size}, {at_once} rows, {label}", lambda w=worker, r=runs: timed(lambda: run_engine(w, r), device)
            )
            out.setdefault("images", {})[label] = len(runs)
            log(f"{size}: {label} {seconds[label]:.2f} s")
        few = jobs[: run.diffusers_jobs]
        seconds["diffusers"] = memory.measure(
            f"{size}, 1 rows, diffusers", lambda: timed(lambda: [run_diffusers(pipe, j, device) for j in few], device)
        )
        out["images"]["diffusers"] = len(few)
        log(f"{size}: diffusers {seconds['diffusers']:.2f} s")
    finally:
        for worker in workers.values():
            worker.stop()
    out["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    out["images_per_second"] = {k: round(out["images"][k] / v, 3) for k, v in seconds.items()}
    out["peak_memory_gib"] = memory.peaks
    if graphs:
        denoiser = workers["batched_graphs"].pipeline.denoiser
        out["graphs"], out["eager_calls_past_the_bound"] = len(denoiser.graphs), denoiser.eager_calls
        sampler = denoiser.sampler_graphs
        out["sampler_graphs"], out["sampler_eager_steps"] = len(sampler.graphs), sampler.eager_steps
    out["ratios"] = ratios(out["images_per_second"], out.get("latency_seconds"))
    return out


def latency(run: Run, workers: dict[str, EngineWorker], pipe, device: torch.device) -> dict[str, float]:
    """One job on an idle engine (eager and graphs) and in diffusers, alternated so load hits all; medians."""
    one = requests(run, first_id=-200, count=1)[0]
    times: dict[str, list[float]] = {"diffusers": []}
    for _ in range(run.latency_repeats):
        for label in ("batched_eager", "batched_graphs"):
            if label in workers:
                times.setdefault(label, []).append(timed(lambda w=workers[label]: run_engine(w, [one]), device))
        times["diffusers"].append(timed(lambda: run_diffusers(pipe, one, device), device))
    return {label: round(statistics.median(values), 4) for label, values in times.items()}


def ratios(ips: dict[str, float], latency_seconds: dict[str, float] | None) -> dict[str, float]:
    out = {}
    for label in ("batched_eager", "batched_graphs", "serial"):
        if label in ips:
            out[f"{label} / diffusers (images/s)"] = round(ips[label] / ips["diffusers"], 3)
    if "batched_graphs" in ips:
        out["batched_graphs / batched_eager (images/s)"] = round(ips["batched_graphs"] / ips["batched_eager"], 3)
    for label in ("batched_eager", "batched_graphs"):
        if latency_seconds and label in latency_seconds:
            out[f"{label} / diffusers (latency)"] = round(latency_seconds[label] / latency_seconds["diffusers"], 3)
    return out


def table(results: dict) -> str:
    lines = [f"{results['device_name']}, {results['dtype']}, torch {results['torch']}, {results['date']}"]
    for size in results["sizes"]:
        lines.append(
            f"\n{size['unet']} {size['size']}, {size['jobs']} jobs from {size['members']} members, "
            f"{size['steps']} steps, euler_a, previews every {size['preview_every']} (ours)"
        )
        for label, ips in size["images_per_second"].items():
            took, images = size["seconds"][label], size["images"][label]
            lines.append(f"  {label:<16} {ips:9.3f} images/s  ({took:.2f} s, {images} images)")
        for label, seconds in size.get("latency_seconds", {}).items():
            lines.append(f"  one job, idle: {label:<16} {seconds:.3f} s")
        for label, ratio in size["ratios"].items():
            lines.append(f"  ratio {label:<44} {ratio:.2f}")
        for label, gib in size["peak_memory_gib"].items():
            lines.append(f"  peak GPU memory {label:<44} {gib:.2f} GiB")
    for run in results.get("flow", []):
        lines.append(
            f"\n{run['variant']} {run['size']}, weights {run['weights']}: transformer "
            f"{run['transformer_bytes'] / 1e9:.2f} GB, text encoders {run['text_encoder_bytes'] / 1e9:.2f} GB"
        )
        for label, gib in run["peak_memory_gib"].items():
            lines.append(f"  peak GPU memory {label:<44} {gib:.2f} GiB")
        for label, seconds in run["seconds"].items():
            lines.append(f"  {label}: {seconds:.2f} s")
    if loras := results.get("loras"):
        lines.append(f"\nLoRAs: {loras['jobs']} jobs over {loras['sets']} sets (rank {loras['rank']}) and none")
        for label, ips in loras["images_per_second"].items():
            lines.append(f"  {label:<16} {ips:9.3f} images/s")
        lines.append(f"  ratio shared / by_set {loras['ratio']:.2f}")
    lines.append(f"\ntotal {results['total_seconds']:.0f} s")
    return "\n".join(lines)


def lora_case(run: Run, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> dict:
    """The first size's jobs over 4 LoRA sets and none: shared batch against batched by set."""
    from lora_throughput import gpu_case

    components, name = components_for(run, device)
    log(f"LoRA sets: {run.unet}")
    model = loaded_model(components, name, device, dtype)
    return gpu_case(model, requests(run), 4, 16, lambda fn: timed(fn, device), run_engine)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models at 64x64: checks the pieces run")
    parser.add_argument("--no-graphs", action="store_true", help="leave out (ii) and the latency with graphs")
    parser.add_argument("--no-sdxl", action="store_true", help="leave out the SDXL-sized run")
    parser.add_argument("--no-flow", action="store_true", help="leave out the Flux- and SD 3.5-sized runs")
    parser.add_argument("--no-loras", action="store_true", help="leave out the LoRA sets' case")
    parser.add_argument("--out", default="gpu-bench.json", help="the JSON file to write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    if device.type != "cuda" and not args.tiny:
        raise SystemExit(f"bench.gpu times a GPU; on {device} only --tiny runs (the pieces at tiny size).")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    runs = TINY if args.tiny else FULL
    sizes = []
    with torch.inference_mode():
        for run in runs[:1] if args.no_sdxl else runs:
            sizes.append(measure_size(run, device, dtype, graphs=not args.no_graphs, log=log))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        flow = [] if args.no_flow else flow_runs(args.tiny, device, log)
        loras = None if args.no_loras else lora_case(runs[0], device, dtype, log)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "sizes": sizes,
        "flow": flow,
        "loras": loras,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
