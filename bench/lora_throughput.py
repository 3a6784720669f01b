"""``bench/throughput.py --loras N`` (issue 23): jobs with different LoRA sets, shared or apart.

16 jobs from 8 members over N LoRA sets plus jobs with none (member m uses set m % (N + 1); the
last is none), in one process, on the same weights (the same random model and LoRA files):

  (i)   one shared batch: each row adds its own LoRAs from the slots (engine/features/lora_slots.py);
  (ii)  batching by set, as before the slots: each set applied to the whole UNet through peft, in a
        batch of its own (``engine.lora_slots = 0``, on a copy of the model: peft's adapters and the
        slots never meet);
  (iii) one at a time, as (ii) with ``max_batch = 1``.

Then the question of a merged fast path (a batch whose rows all use one set): the denoiser's
step for 16 rows that all use one LoRA, timed (a) with no LoRA at all (what a merged LoRA costs
per step), (b) per row from the slots, (c) through peft's adapters on the whole UNet; and the
time to merge that LoRA into the UNet's weights and take it out again (peft's ``merge`` and
``unmerge``), which a merged path would pay whenever the batch's sets change.

A benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.batching.batch import Batch
from engine.config.settings import EngineSettings, GenerationSettings
from engine.serving.worker import EngineWorker
from engine.types import GenerationRequest

MEMBERS = 8


def lora_files(components: dict, sets: int, rank: int, folder: Path) -> None:
    """``set0`` ... kohya-format LoRAs on every attention projection of the UNet (and CLIP)."""
    from tinylora import kohya_lora

    text = "text_encoder_2" not in components  # kohya's lora_te_ names fit one CLIP
    for i in range(sets):
        save_file(
            kohya_lora(components, rank=rank, seed=100 + i, scale=0.3, text_encoder=text),
            folder / f"set{i}.safetensors",
        )


def lora_jobs(requests: list[GenerationRequest], sets: int) -> list[GenerationRequest]:
    """The throughput jobs from 8 members, member m's prompt with set m % (sets + 1) (the last: none)."""
    out = []
    for request in requests:
        member = request.job_id % MEMBERS
        tag = f" <lora:set{member % (sets + 1)}:0.8>" if member % (sets + 1) < sets else ""
        prompt = f"member {member}: a lighthouse at dusk, style {member}{tag}"
        out.append(GenerationRequest.of(**{**request.params.__dict__, "prompt": prompt}, job_id=request.job_id))
    return out


def step_times(cases: dict[str, tuple], rows: int, rounds: int, size: tuple[int, int]) -> dict[str, float]:
    """Median seconds of one batch step per case (``name: (pipeline, prompt)``, ``rows`` jobs of
    ``prompt``), the cases' steps alternated so that a change of the machine's load hits them all."""
    batches = {}
    for name, (pipeline, prompt) in cases.items():
        batch = batches[name] = Batch(pipeline.denoiser)
        for i in range(rows):
            job = dict(prompt=prompt, seed=i, steps=rounds + 2, sampler="euler", width=size[0], height=size[1])
            batch.add(pipeline.prepare(GenerationRequest.of(i, **job)))
        batch.step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, batch in batches.items():
            times[name].append(_timed(batch.step))
    return {name: statistics.median(values) for name, values in times.items()}


def _timed(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def merge_time(pipeline, name: str) -> float:
    """Seconds to merge LoRA ``name``'s adapter into the UNet's weights and take it out again."""
    adapter = pipeline.loras._loaded[name][0]
    layers = [m for m in pipeline.model.unet.modules() if adapter in getattr(m, "lora_A", {})]

    def merge_and_unmerge() -> None:
        with torch.no_grad():
            for layer in layers:
                layer.merge(adapter_names=[adapter])
            for layer in layers:
                layer.unmerge()

    merge_and_unmerge()
    return statistics.median(_timed(merge_and_unmerge) for _ in range(5))


def run(model, requests: list[GenerationRequest], args, run_engine) -> None:
    """The three runs and the fast-path measurement; ``run_engine(worker, requests, device)``."""
    device = model.device
    with tempfile.TemporaryDirectory() as folder:
        components = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
        if len(model.text_encoders) > 1:
            components["text_encoder_2"] = model.text_encoders[1]
        lora_files(components, args.loras, args.lora_rank, Path(folder))
        apart = copy.deepcopy(model)  # the same weights, its own adapters and no slots
        model.lora_dir = apart.lora_dir = Path(folder)
        model.lora_slots, model.lora_max_rank, apart.lora_slots = args.loras, args.lora_rank, 0
        jobs = lora_jobs(requests, args.loras)
        limits = GenerationSettings(max_steps=max(args.steps, 50), max_width=args.width, max_height=args.height)
        settings = EngineSettings(max_batch=args.max_batch, preview_every=0)
        shared = EngineWorker(model, settings, limits)
        by_set = EngineWorker(apart, settings, limits)
        serial = EngineWorker(apart, EngineSettings(max_batch=1, preview_every=0), limits)
        workers = (shared, by_set, serial)
        for worker in workers:
            worker.start()
        try:
            for worker in workers:  # warm-up: every LoRA loaded, kernels picked
                run_engine(worker, jobs[: args.loras + 1], device)
            t_shared = run_engine(shared, jobs, device)
            t_by_set = run_engine(by_set, jobs, device)
            t_serial = run_engine(serial, jobs, device)
        finally:
            for worker in workers:
                worker.stop()
        n = len(jobs)
        print(
            f"--loras {args.loras}: {n} jobs from {MEMBERS} members over {args.loras} LoRA sets (rank "
            f"{args.lora_rank}, every attention projection) and none, {args.steps} steps, {args.width}x{args.height}"
        )
        print(f"(i)   one shared batch (LoRA rows)      {n / t_shared:8.3f} images/s  ({t_shared:.2f} s)")
        print(f"(ii)  batched by set (peft, as before)  {n / t_by_set:8.3f} images/s  ({t_by_set:.2f} s)")
        print(f"(iii) one at a time (peft)              {n / t_serial:8.3f} images/s  ({t_serial:.2f} s)")
        print(f"ratio (i)/(ii) = {t_by_set / t_shared:.2f}x   ratio (i)/(iii) = {t_serial / t_shared:.2f}x")

        rows, size, tagged = min(16, args.max_batch), (args.width, args.height), "a lighthouse <lora:set0:0.8>"
        cases = {"plain": (shared.pipeline, "a lighthouse"), "slots": (shared.pipeline, tagged)}
        times = step_times(cases | {"peft": (by_set.pipeline, tagged)}, rows, 12, size)
        plain, slots, peft = times["plain"], times["slots"], times["peft"]
        merge = merge_time(by_set.pipeline, "set0")
        print(f"one set in every row, {rows} rows, seconds per step (median of 12, alternated):")
        print(f"  (a) no LoRA (= merged)   {plain:.4f}")
        print(f"  (b) LoRA rows (slots)    {slots:.4f}  {slots / plain - 1:+.1%} over (a)")
        print(f"  (c) peft on the UNet     {peft:.4f}  {peft / plain - 1:+.1%} over (a)")
        print(
            f"  merging the LoRA into the UNet and out again: {merge:.4f} s = {merge / max(slots - plain, 1e-9):.1f} "
            "steps of what (b) costs over (a)"
        )


def gpu_case(model, jobs: list[GenerationRequest], sets: int, rank: int, timed, run_engine) -> dict:
    """``python -m bench.gpu``'s LoRA case: ``jobs`` over ``sets`` LoRA sets and none, (i) in one
    shared batch and (ii) batched by set through peft as before the slots, timed by
    ``timed(fn) -> seconds`` with ``run_engine(worker, jobs)``; images/s and the ratio."""
    with tempfile.TemporaryDirectory() as folder:
        components = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
        if len(model.text_encoders) > 1:
            components["text_encoder_2"] = model.text_encoders[1]
        lora_files(components, sets, rank, Path(folder))
        apart = copy.deepcopy(model)
        model.lora_dir = apart.lora_dir = Path(folder)
        model.lora_slots, model.lora_max_rank, apart.lora_slots = sets, rank, 0
        tagged = lora_jobs(jobs, sets)
        size = tagged[0].params.width
        limits = GenerationSettings(max_steps=50, max_width=size, max_height=size)
        settings = EngineSettings(max_batch=len(jobs), preview_every=2)
        workers = {"shared": EngineWorker(model, settings, limits), "by_set": EngineWorker(apart, settings, limits)}
        seconds = {}
        for name, worker in workers.items():
            worker.start()
            try:
                run_engine(worker, tagged[: sets + 1])  # warm-up: every LoRA loaded
                seconds[name] = timed(lambda worker=worker: run_engine(worker, tagged))
            finally:
                worker.stop()
    ips = {name: len(tagged) / took for name, took in seconds.items()}
    return {"sets": sets, "rank": rank, "jobs": len(tagged), "images_per_second": ips,
            "ratio": ips["shared"] / ips["by_set"]}  # fmt: skip
