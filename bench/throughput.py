"""Throughput benchmark (issue 4): our batched engine vs one-at-a-time vs diffusers' pipeline.

The same N jobs from M members run, in one process and on the same weights, through
  (i)   our EngineWorker with continuous batching (max_batch rows),
  (ii)  our EngineWorker one job at a time (max_batch 1),
  (iii) diffusers' StableDiffusionPipeline (XL for --unet sdxl), one job at a time,
and it prints images/s, the ratios, and the latency of one job on an idle engine against (iii).
Every job makes one PNG (both sides encode it), with the Euler sampler on both sides so that the
work per step is the same.

    python bench/throughput.py                                # CPU, tiny model, 128x128
    python bench/throughput.py --unet sd15 --device cuda      # SD 1.5-sized UNet, random weights, 512x512
    python bench/throughput.py --unet sdxl --device cuda      # SDXL-sized, 1024x1024
    python bench/throughput.py --sizes 128x128 96x128         # members asking for different sizes
    python bench/throughput.py --compile default              # also (v): batched with engine.compile
    python bench/throughput.py --unet flux                    # tiny Flux.1 dev (or sd3: SD 3.5) vs their pipelines
    python bench/throughput.py --loras 4 --members 8          # LoRA sets shared or apart (bench/lora_throughput.py)

With several ``--sizes`` (job i gets size i % len), it also runs (iv) our engine batched in strict
arrival order (``engine.overtake_window = 0``), where a job of another size ends the batch.

A benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from engine.torch_builds import torchvision_importable  # noqa: E402

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from engine.config.settings import EngineSettings, GenerationSettings, parse_size  # noqa: E402
from engine.families.loading import LoadedModel  # noqa: E402
from engine.families.sd.tokenizer import EOS, clip_tokenizer  # noqa: E402
from engine.serving.worker import EngineWorker  # noqa: E402
from engine.types import GenerationRequest, ModelInfo  # noqa: E402

SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="linspace"
)
DEFAULT_SIZE = {"tiny": 128, "sd15": 512, "sdxl": 1024, "flux": 128, "sd3": 128}
#: The flow families (tests/tinyflow.py's tiny models): their own pipelines and guidance.
FLOW = {"flux": 3.5, "sd3": 4.5}


# ---------------------------------------------------------------------------- models


def text_encoder(width: int, layers: int, heads: int, act: str, projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=width,
        hidden_act=act,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def full_size_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=scaling_factor,
    ).eval()


def build_components(unet: str) -> dict:
    """Random-weight components: the tests' tiny model, or SD 1.5 / SDXL shapes for GPU timing."""
    if unet == "tiny":
        from tinymodel import build_tiny_components

        return build_tiny_components("sd1")
    if unet == "sd15":
        return {
            "unet": UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval(),
            "vae": full_size_vae(0.18215),
            "text_encoder": text_encoder(768, 12, 12, "quick_gelu"),
            "tokenizer": clip_tokenizer(EOS),
        }
    return {
        "unet": UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ).eval(),
        "vae": full_size_vae(0.13025),
        "text_encoder": text_encoder(768, 12, 12, "quick_gelu"),
        "tokenizer": clip_tokenizer(EOS),
        "text_encoder_2": text_encoder(1280, 32, 20, "gelu", projection=True),
        "tokenizer_2": clip_tokenizer("!"),
    }


def flow_model_and_pipeline(family: str, device: torch.device, dtype: torch.dtype, folder: Path):
    """A tiny Flux.1 dev or SD 3.5 (tests/tinyflow.py) loaded by our loader, and diffusers' pipeline
    on the same weights."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from engine.families.loading import load_model
    from tinyflow import save_flux_folder, save_sd3_folder

    (save_flux_folder if family == "flux" else save_sd3_folder)(folder)
    model = load_model(str(folder), device=device, dtype=dtype, progress=False)
    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def loaded_model(components: dict, unet: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(device, dtype)
    encoders = [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]
    tokenizers = [components[k] for k in ("tokenizer", "tokenizer_2") if k in components]
    family = "sdxl" if unet == "sdxl" else "sd1"
    return LoadedModel(
        info=ModelInfo(
            name=f"random-{unet}",
            family=family,
            prediction_type="epsilon",
            default_size=DEFAULT_SIZE[unet],
            latent_scale=8,
        ),
        unet=components["unet"],
        vae=components["vae"],
        text_encoders=encoders,
        tokenizers=tokenizers,
        alphas_cumprod=EulerDiscreteScheduler(**SCHEDULER).alphas_cumprod.double(),
        device=device,
        dtype=dtype,
        vae_scaling_factor=components["vae"].config.scaling_factor,
    )


def diffusers_pipeline(components: dict, unet: str):
    parts = {k: v for k, v in components.items() if k != "scheduler"}
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    if unet == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- runs


def jobs(n: int, members: int, args: argparse.Namespace) -> list[GenerationRequest]:
    """Job i comes from member i % M, each member with its own prompt, in size i % len(sizes)."""
    return [
        GenerationRequest.of(
            job_id=i,
            prompt=f"member {i % members}: a lighthouse at dusk, style {i % members}",
            negative_prompt="" if args.unet == "flux" else "blurry",  # Flux takes none
            seed=1000 + i,
            steps=args.steps,
            guidance=FLOW.get(args.unet, 7.0),
            width=args.sizes[i % len(args.sizes)][0],
            height=args.sizes[i % len(args.sizes)][1],
            sampler="euler",
        )
        for i in range(n)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(worker: EngineWorker, requests: list[GenerationRequest], device: torch.device) -> float:
    """Submit every job at once (as members would), wait for all; seconds taken."""

    async def all_jobs():
        await asyncio.gather(*(worker.generate(request) for request in requests))

    return timed(lambda: asyncio.run(all_jobs()), device)


def run_diffusers(pipe, request: GenerationRequest, device: torch.device) -> bytes:
    negative = {} if type(pipe).__name__.startswith("Flux") else {"negative_prompt": request.params.negative_prompt}
    image = pipe(
        request.params.prompt,
        **negative,
        num_inference_steps=request.params.steps,
        guidance_scale=request.params.guidance,
        width=request.params.width,
        height=request.params.height,
        generator=torch.Generator("cpu").manual_seed(request.params.seed),
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=EngineSettings().png_compress_level)  # as the engine does
    return buffer.getvalue()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=["tiny", "sd15", "sdxl", *FLOW], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: float32 on CPU, float16 on CUDA",
    )
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="width = height (default: 128/512/1024)")
    parser.add_argument(
        "--sizes", nargs="+", default=None, metavar="WxH", help="sizes the jobs take in turn (instead of --size)"
    )
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--compile", default="off", help="also run (v): the batched engine with this engine.compile mode"
    )
    parser.add_argument("--latency-repeats", type=int, default=7)
    parser.add_argument("--loras", type=int, default=0, help="N LoRA sets: shared batch vs by set vs one at a time")
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args(argv)
    side = args.size or DEFAULT_SIZE[args.unet]
    args.sizes = [parse_size(size) for size in args.sizes] if args.sizes else [(side, side)]
    args.width, args.height = args.sizes[0]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    if args.unet in FLOW:
        folder = tempfile.TemporaryDirectory()
        model, pipe = flow_model_and_pipeline(args.unet, device, dtype, Path(folder.name) / args.unet)
    else:
        components = build_components(args.unet)
        model = loaded_model(components, args.unet, device, dtype)
        pipe = diffusers_pipeline(components, args.unet)
    limits = GenerationSettings(
        max_steps=max(args.steps, 50), max_width=max(w for w, _ in args.sizes), max_height=max(h for _, h in args.sizes)
    )
    batched = EngineWorker(model, EngineSettings(max_batch=args.max_batch, preview_every=0), limits)
    compiled = (
        EngineWorker(model, EngineSettings(max_batch=args.max_batch, preview_every=0, compile=args.compile), limits)
        if args.compile != "off"
        else None
    )
    if args.loras:
        from lora_throughput import run

        return run(model, jobs(args.jobs, args.members, args), args, run_engine)
    serial = EngineWorker(model, EngineSettings(max_batch=1, preview_every=0), limits)
    mixed = len(set(args.sizes)) > 1
    strict = EngineWorker(model, EngineSettings(max_batch=args.max_batch, preview_every=0, overtake_window=0), limits)
    requests = jobs(args.jobs, args.members, args)
    batched.start()
    serial.start()
    strict.start()
    try:
        # Warm-up: first calls allocate, pick kernels and fill the prompt cache of neither run's jobs.
        warm = GenerationRequest.of(
            job_id=-1, prompt="warm-up", seed=0, steps=2, width=args.width, height=args.height, sampler="euler"
        )
        batched.generate_blocking(warm), serial.generate_blocking(warm), run_diffusers(pipe, warm, device)
        if mixed:
            strict.generate_blocking(warm)

        one = requests[0]
        # One job on an idle engine vs diffusers: alternated, so a change in machine load hits both.
        ours, theirs = [], []
        for _ in range(args.latency_repeats):
            ours.append(timed(lambda: serial.generate_blocking(one), device))
            theirs.append(timed(lambda: run_diffusers(pipe, one, device), device))
        ours_latency, theirs_latency = statistics.median(ours), statistics.median(theirs)

        t_batched = run_engine(batched, requests, device)
        t_compiled = None
        if compiled is not None:
            compiled.start()
            run_engine(compiled, requests, device)  # compiles the shapes the timed run will see
            t_compiled = run_engine(compiled, requests, device)
        t_serial = run_engine(serial, requests, device)
        t_strict = run_engine(strict, requests, device) if mixed else None
        t_diffusers = timed(lambda: [run_diffusers(pipe, r, device) for r in requests], device)
    finally:
        batched.stop()
        serial.stop()
        strict.stop()
        if compiled is not None:
            compiled.stop()

    n = len(requests)
    ips = {"batched": n / t_batched, "serial": n / t_serial, "diffusers": n / t_diffusers}
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"dtype={str(dtype).removeprefix('torch.')}, torch threads={torch.get_num_threads()}, "
        f"load average before={load_before:.2f} after={os.getloadavg()[0]:.2f}"
    )
    sizes = " ".join(f"{w}x{h}" for w, h in args.sizes)
    print(
        f"unet={args.unet} size={sizes} steps={args.steps} sampler=euler "
        f"jobs={n} members={args.members} max_batch={args.max_batch}"
    )
    print(f"(i)   engine, batched         {ips['batched']:8.3f} images/s  ({t_batched:.2f} s)")
    print(f"(ii)  engine, one at a time   {ips['serial']:8.3f} images/s  ({t_serial:.2f} s)")
    print(f"(iii) diffusers, one at a time{ips['diffusers']:8.3f} images/s  ({t_diffusers:.2f} s)")
    print(f"ratio (i)/(ii)   = {ips['batched'] / ips['serial']:.2f}x")
    print(f"ratio (i)/(iii)  = {ips['batched'] / ips['diffusers']:.2f}x")
    print(f"ratio (ii)/(iii) = {ips['serial'] / ips['diffusers']:.2f}x")
    if t_strict is not None:
        print(
            f"(iv)  engine, batched in strict arrival order (overtake_window 0) {n / t_strict:8.3f} images/s "
            f"({t_strict:.2f} s); ratio (i)/(iv) = {t_strict / t_batched:.2f}x"
        )
    if t_compiled is not None:
        print(
            f"(v)   engine, batched, engine.compile={args.compile} {n / t_compiled:8.3f} images/s ({t_compiled:.2f} s, "
            f"after a run that compiled); ratio (v)/(i) = {t_batched / t_compiled:.2f}x"
        )
    print(
        f"one job, idle engine: {ours_latency:.3f} s vs diffusers {theirs_latency:.3f} s "
        f"-> latency ratio {ours_latency / theirs_latency:.2f} (<= 1.0 is no slower)"
    )


if __name__ == "__main__":
    main()
