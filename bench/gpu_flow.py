"""The flow families in the GPU check (issue 21 §6): peak GPU memory per (family, size, rows),
with the weights in bf16 and stored in float8 (``model.weights``), and the weights' own size.

Random weights in FLUX.1-dev's and SD 3.5 Large's shapes, from the configs we ship in
``engine/data`` (made on the GPU in the compute dtype; nothing is downloaded; the T5 tokenizer is
the tests' small offline one, whose ids a full-size T5 reads as any others), at 1024x1024; then
the same model with its transformer and T5 stored in float8 (:mod:`engine.families.flow_storage`),
so the two storages are measured on one set of weights in one run. Each (rows) run submits that
many jobs at once to our engine (Euler, 4 steps: memory does not depend on the steps), decodes and
encodes their PNGs.

    python -m bench.gpu_flow                       # alone, on a CUDA GPU
    python -m bench.gpu_flow --weights             # the weights' sizes only (computed, any machine)
    python -m bench.gpu --tiny --device cpu        # its pieces at tiny size, with the rest of bench.gpu

``--weights`` prints the table of the README ("SD 3.5 and Flux.1"): bytes of parameters and
buffers per component and setting, computed from the shipped configs on the meta device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from engine.torch_builds import torchvision_importable  # noqa: E402

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch  # noqa: E402
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: E402

from engine.config.settings import EngineSettings, GenerationSettings  # noqa: E402
from engine.families import guidance_kind  # noqa: E402
from engine.families.flow_files import DATA_DIR  # noqa: E402
from engine.families.flow_storage import store_in_fp8, weight_bytes  # noqa: E402
from engine.families.loading import LoadedModel  # noqa: E402
from engine.families.sd.tokenizer import EOS, clip_tokenizer  # noqa: E402
from engine.types import GenerationRequest, ModelInfo  # noqa: E402

#: The weights table's rows: a shipped config -> what it stands for.
VARIANTS = {"flux-dev": "Flux.1 dev or schnell", "sd3.5-large": "SD 3.5 Large (Turbo)", "sd3.5-medium": "SD 3.5 Medium"}
ENCODER_CLASSES = {
    "T5EncoderModel": T5EncoderModel,
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


@dataclasses.dataclass(frozen=True)
class FlowRun:
    variant: str  # a folder of engine/data, or "tiny-flux" / "tiny-sd3" (tests/tinyflow.py)
    size: int
    rows: tuple[int, ...]
    steps: int


FULL = (FlowRun("flux-dev", 1024, (1, 4), 4), FlowRun("sd3.5-large", 1024, (1, 4), 4))
TINY = (FlowRun("tiny-flux", 64, (1, 2), 2), FlowRun("tiny-sd3", 64, (1, 2), 2))


def components(variant: str, dtype: torch.dtype) -> dict:
    """Random-weight components of a shipped config (on the current default device), or the tests' tiny ones."""
    if variant.startswith("tiny"):
        from tinyflow import build_flux_components, build_sd3_components

        built = build_flux_components() if variant == "tiny-flux" else build_sd3_components()
        return {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in built.items()}
    from tinyflow import t5_tokenizer

    folder = DATA_DIR / variant
    index = json.loads((folder / "model_index.json").read_text())
    flux = index["_class_name"] == "FluxPipeline"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in bf16: a float32 FLUX.1 would take 48 GB first
    try:
        cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
        out = {
            "transformer": cls.from_config(cls.load_config(folder / "transformer")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        }
        for name in sorted(k for k in index if k.startswith("text_encoder")):
            out[name] = ENCODER_CLASSES[index[name][1]](AutoConfig.from_pretrained(folder / name))
    finally:
        torch.set_default_dtype(previous)
    for module in list(out.values()):  # transformers builds a config's own dtype; SD 3.5's position table is float32
        module.to(dtype)
    pads = [EOS] if flux else [EOS, "!"]
    out |= {f"tokenizer{'' if i == 0 else f'_{i + 1}'}": clip_tokenizer(pad) for i, pad in enumerate(pads)}
    out["tokenizer_2" if flux else "tokenizer_3"] = t5_tokenizer()
    out["scheduler_config"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return out


def loaded_model(parts: dict, variant: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    transformer = parts["transformer"]
    family = "flux" if isinstance(transformer, FluxTransformer2DModel) else "sd3"
    names = sorted(k for k in parts if k.startswith("text_encoder") and parts[k] is not None)
    config = parts.get("scheduler_config") or dict(parts["scheduler"].config)
    for module in (transformer, parts["vae"], *(parts[n] for n in names)):
        module.to(device).eval().requires_grad_(False)
    return LoadedModel(
        info=ModelInfo(
            name=f"random-{variant}",
            family=family,
            prediction_type="flow",
            default_size=1024,
            latent_scale=8,
            guidance=guidance_kind(family, bool(transformer.config.get("guidance_embeds", True))),
        ),
        unet=transformer,
        vae=parts["vae"],
        text_encoders=[parts[n] for n in names],
        tokenizers=[parts[n.replace("text_encoder", "tokenizer")] for n in names],
        alphas_cumprod=None,
        scheduler_config=config,
        device=device,
        dtype=dtype,
        vae_scaling_factor=float(parts["vae"].config.scaling_factor),
    )


def requests(run: FlowRun, rows: int, family: str) -> list[GenerationRequest]:
    negative = "blurry" if family == "sd3" else ""
    return [
        GenerationRequest.of(
            job_id=i,
            prompt=f"member {i}: a lighthouse at dusk",
            negative_prompt=negative,
            seed=1000 + i,
            steps=run.steps,
            guidance=3.5,
            width=run.size,
            height=run.size,
            sampler="euler",
        )
        for i in range(rows)
    ]


def measure_flow(run: FlowRun, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> list[dict]:
    """bf16, then float8 storage of the same weights: peak memory and seconds per rows."""
    from gpu import PeakMemory, run_engine, timed

    from engine.serving.worker import EngineWorker

    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
        model = loaded_model(components(run.variant, dtype), run.variant, device, dtype)
    limits = GenerationSettings(max_steps=50, max_width=run.size, max_height=run.size)
    results = []
    for storage in ("bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch."), "float8_e4m3fn"):
        if storage == "float8_e4m3fn":
            store_in_fp8(model.unet, model.text_encoders, dtype)  # in place: the same weights, stored in fp8
        out = {"variant": run.variant, "family": model.info.family, "size": f"{run.size}x{run.size}"}
        out |= {"weights": storage, "steps": run.steps, "transformer_bytes": weight_bytes(model.unet)}
        out["text_encoder_bytes"] = sum(weight_bytes(e) for e in model.text_encoders)
        memory, seconds = PeakMemory(device), {}
        for rows in run.rows:
            worker = EngineWorker(model, EngineSettings(max_batch=rows, preview_every=2), limits)
            worker.start()
            try:
                jobs = requests(run, rows, model.info.family)
                run_engine(worker, jobs[:1])  # warm-up: the prompt encoded, kernels picked
                label = f"{out['size']}, {rows} rows, {storage}"
                seconds[f"{rows} rows"] = round(
                    memory.measure(label, lambda w=worker, j=jobs: timed(lambda: run_engine(w, j), device)), 3
                )
            finally:
                worker.stop()
            log(f"{run.variant} {storage}: {rows} rows in {seconds[f'{rows} rows']} s")
        out["seconds"], out["peak_memory_gib"] = seconds, memory.peaks
        results.append(out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def flow_runs(tiny: bool, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [entry for run in (TINY if tiny else FULL) for entry in measure_flow(run, device, dtype, log)]


def weights_table() -> str:
    """The README's table: GB (10^9 bytes) of weights per component and setting, from the shipped configs."""
    lines = [
        "| model | transformer bf16 / fp8 | T5-XXL bf16 / fp8 | CLIPs | VAE | on the GPU: bf16 | "
        "bf16, encoders on CPU | fp8 | fp8, encoders on CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        with torch.device("meta"):
            parts = components(variant, torch.bfloat16)
        names = sorted(k for k in parts if k.startswith("text_encoder"))
        t5, clips = parts[names[-1]], [parts[n] for n in names[:-1]]
        sizes = {"t": weight_bytes(parts["transformer"]), "t5": weight_bytes(t5), "vae": weight_bytes(parts["vae"])}
        sizes["clips"] = sum(weight_bytes(c) for c in clips)
        store_in_fp8(parts["transformer"], [t5], torch.bfloat16)
        sizes["t8"], sizes["t58"] = weight_bytes(parts["transformer"]), weight_bytes(t5)
        gb = {k: v / 1e9 for k, v in sizes.items()}
        bf16, bf16_alone = gb["t"] + gb["t5"] + gb["clips"] + gb["vae"], gb["t"] + gb["vae"]
        fp8, fp8_alone = gb["t8"] + gb["t58"] + gb["clips"] + gb["vae"], gb["t8"] + gb["vae"]
        lines.append(
            f"| {VARIANTS[variant]} | {gb['t']:.1f} / {gb['t8']:.1f} | {gb['t5']:.1f} / {gb['t58']:.1f} "
            f"| {gb['clips']:.2f} | {gb['vae']:.2f} | {bf16:.1f} | {bf16_alone:.1f} | {fp8:.1f} | {fp8_alone:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", action="store_true", help="print the weights' sizes (computed) and stop")
    parser.add_argument("--tiny", action="store_true", help="tiny models (with --device cpu)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.weights:
        print(weights_table())
        return
    device = torch.device(args.device)
    started = time.perf_counter()
    with torch.inference_mode():
        results = flow_runs(args.tiny, device, lambda line: print(f"[{time.perf_counter() - started:6.1f} s] {line}"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
