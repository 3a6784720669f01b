"""Does torch.compile pay for itself on our UNet calls? Eager vs compiled, per batch size (issue 4).

The engine runs one UNet call per step on every row of the running batch, prompts and negative
prompts together (2 x rows). A compiled graph is specialised to its input shapes, so a compiling
engine would pad rows up to a few bucket sizes and keep one graph per bucket. This script measures
what that would buy before the engine does it: for each batch size it times the same call eager and
compiled (``--mode``, e.g. ``reduce-overhead`` for CUDA graphs), in one run on the same weights, and
prints the compile time and the ratio.

    python bench/compile_unet.py                                   # CPU, tiny model, rows 1 and 8
    python bench/compile_unet.py --unet sd15 --device cuda --rows 1 2 4 8 16 --mode reduce-overhead

A benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from throughput import DEFAULT_SIZE, build_components, sync  # noqa: E402


def call_inputs(unet, rows: int, size: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """What Denoiser passes: 2 x rows latents, timesteps, text states (and SDXL's added inputs)."""
    n, latent = 2 * rows, size // 8
    generator = torch.Generator("cpu").manual_seed(rows)
    sample = torch.randn(n, unet.config.in_channels, latent, latent, generator=generator).to(device, dtype)
    timesteps = torch.full((n,), 500.0, device=device)
    states = torch.randn(n, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    kwargs: dict = dict(encoder_hidden_states=states, return_dict=False)
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, 1280).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * n, device=device, dtype=dtype),
        }
    return (sample, timesteps), kwargs


def per_call(fn, args: tuple, kwargs: dict, device: torch.device, repeats: int) -> float:
    """Median seconds of one call, after one untimed call."""
    times = []
    with torch.inference_mode():
        fn(*args, **kwargs)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn(*args, **kwargs)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: float32 on the CPU, float16 on a GPU",
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="batch sizes (rows) to time")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    parser.add_argument("--size", type=int, default=None, help="image width = height (default: 128/512/1024)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    size = args.size or DEFAULT_SIZE[args.unet]
    unet = build_components(args.unet)["unet"].to(device, dtype)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    compiled = torch.compile(unet, mode=args.mode, dynamic=False)
    print(
        f"device={device} dtype={dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"unet={args.unet} size={size}x{size} mode={args.mode}"
    )
    for rows in args.rows:
        call_args, kwargs = call_inputs(unet, rows, size, device, dtype)
        eager = per_call(unet, call_args, kwargs, device, args.repeats)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(*call_args, **kwargs)  # compiles this shape
        sync(device)
        compile_s = time.perf_counter() - start
        fast = per_call(compiled, call_args, kwargs, device, args.repeats)
        print(
            f"rows={rows:3d} (UNet batch {2 * rows:3d}): eager {eager * 1000:8.2f} ms, compiled "
            f"{fast * 1000:8.2f} ms per call -> {eager / fast:.2f}x; compile took {compile_s:.1f} s"
        )


if __name__ == "__main__":
    main()
