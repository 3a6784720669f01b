"""Step cost, counted (issue 11 §5): kernels outside the UNet and host-device syncs per step.

For our engine (the real EngineWorker, its threads and all) and for diffusers'
StableDiffusionPipeline, on the same tiny UNet, with production defaults: euler_a, previews every
2 steps (ours; diffusers has none), 8 jobs of one image each in one batch, 20 steps. It prints,
per steady step (UNet calls 3 to 18: no admission, no finishing):

- kernels outside the UNet: aten operations on device tensors that are not views, on the thread
  that steps (the UNet's own are counted apart, for scale), with the busiest call sites;
- host-device syncs: a device tensor read by the host (``.item()``, ``.tolist()``, ``.cpu()``,
  ``.numpy()``, ``bool()``/``int()``/``float()``, a boolean mask or ``nonzero``) and blocking uploads
  (``torch.tensor(..., device=)``, ``.to(device)`` without ``non_blocking``), on the stepping thread
  and on other threads (our PNG/preview pool) apart, with their call sites.

It runs on the CPU, so "device" is a label: a tensor is a device tensor when it is a model weight
or buffer, comes from a factory or ``.to()`` given a device object (not the string "cpu"), from
``engine.batching.batch.to_device`` (counted as the CUDA path: pinned and non-blocking, so an upload but no
sync), or from an operation on a device tensor. ``engine.batching.readback.Readback`` is counted as its CUDA
path too: a non-blocking download into pinned memory, read by the host only once its event has
fired, so a download but no sync. What runs on CUDA the same way is counted the same.
Diffusers gets its best case: no generator (its noise drawn on the device, no upload per step).

    python bench/step_cost.py            # prints both tables; nothing is asserted
    python bench/step_cost.py --loras    # and ours with LoRA rows mixed in (issue 23): 2 of 4 jobs
                                         # with one LoRA, 1 with two, 1 with none, 3 sets in all
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import tempfile
import threading
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from engine.torch_builds import torchvision_importable  # noqa: E402

torchvision_importable()  # before diffusers imports it (see engine/torch_builds.py)

import torch  # noqa: E402
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline  # noqa: E402
from throughput import SCHEDULER, build_components, loaded_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import engine.batching.batch  # noqa: E402
import engine.batching.readback  # noqa: E402
import engine.pipeline  # noqa: E402
import engine.serving.finishing  # noqa: E402
from engine.config.settings import EngineSettings, GenerationSettings  # noqa: E402
from engine.serving.worker import EngineWorker  # noqa: E402
from engine.types import GenerationRequest  # noqa: E402

JOBS, STEPS, PREVIEW_EVERY, SIZE = 8, 20, 2, 64
STEADY = range(3, STEPS - 1)  # UNet calls counted: after admission's, before finishing's
SOURCES = (str(ROOT / "engine"), os.sep + "diffusers" + os.sep)
#: Not kernels: views, and what only changes how a tensor is seen.
NOT_KERNELS = {
    "lift_fresh",
    "detach",
    "detach_",
    "resolve_conj",
    "resolve_neg",
    "_local_scalar_dense",
    "is_nonzero",
    "alias",
    "_to_copy_no_change",
}
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "randn", "rand", "randint")


def site() -> str:
    """The innermost frame in the engine's or diffusers' code."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(source in frame.filename for source in SOURCES):
            where = frame.filename.split(os.sep + "site-packages" + os.sep)[-1].removeprefix(str(ROOT) + os.sep)
            return f"{where}:{frame.lineno}"
    return "?"


class Tally:
    """What happened, by UNet call ("step"), thread and kind; which tensors are on the device."""

    def __init__(self) -> None:
        self._device: dict[int, weakref.ref] = {}  # by identity: a WeakSet would compare tensors with ==
        self.step = 0
        self.stepper: int | None = None  # the thread that calls the UNet
        self.in_unet = threading.local()
        self.events: list[tuple[int, bool, str, str]] = []  # step, on the stepping thread, kind, site
        self.lock = threading.Lock()

    def on_device(self, t) -> bool:
        ref = self._device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def mark(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._device[id(t)] = weakref.ref(t)

    def unmark(self, t) -> None:
        self._device.pop(id(t), None)

    def note(self, kind: str) -> None:
        stepper = threading.get_ident() == self.stepper
        where = "" if kind == "unet kernel" else site()  # stacks are slow: only where they are printed
        with self.lock:
            self.events.append((self.step, stepper, kind, where))

    def unet_hooks(self, unet: torch.nn.Module) -> None:
        def before(module, args, kwargs):
            self.stepper = threading.get_ident()
            self.step += 1
            self.in_unet.depth = getattr(self.in_unet, "depth", 0) + 1

        def after(module, args, kwargs, out):
            self.in_unet.depth -= 1

        unet.register_forward_pre_hook(before, with_kwargs=True)
        unet.register_forward_hook(after, with_kwargs=True)
        self.mark([*unet.parameters(), *unet.buffers()])


class Counting(TorchDispatchMode):
    """Marks outputs of operations on device tensors, and counts them (kernels) and host reads."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = tree_flatten((args, kwargs))[0]
        if any(self.tally.on_device(t) for t in inputs):
            self.tally.mark(out)
            name = func.overloadpacket.__name__
            if getattr(self.tally.in_unet, "depth", 0):
                if threading.get_ident() == self.tally.stepper and not func.is_view and name not in NOT_KERNELS:
                    self.tally.note("unet kernel")
            elif not func.is_view and name not in NOT_KERNELS:
                self.tally.note("kernel")
            bool_index = name == "index" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in inputs)
            if name in ("nonzero", "masked_select") or bool_index:
                self.tally.note("sync")  # the result's size is only known once the device has run
        return out


TALLY = Tally()  # the run being counted; the patches below report to it


def patch_sync_points() -> Callable[[], None]:
    """Python-level reads of device tensors, uploads, and factories given a device; returns what
    undoes the patches (a test counts in a process that goes on)."""
    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in (*READS, "to")]
    saved += [(torch, name, getattr(torch, name)) for name in FACTORIES]
    saved += [
        (engine.batching.batch, "to_device", engine.batching.batch.to_device),
        (engine.pipeline, "to_device", engine.pipeline.to_device),
    ]
    saved += [(engine.batching.readback.Readback, "__init__", engine.batching.readback.Readback.__init__)]

    def undo() -> None:
        for owner, name, value in saved:
            setattr(owner, name, value)

    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            if TALLY.on_device(self):
                TALLY.note("sync")
            out = _real(self, *args, **kwargs)
            if _name == "cpu":
                TALLY.unmark(out)  # on the host now (on the CPU it is the same tensor)
            return out

        setattr(torch.Tensor, name, read)

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        tally = TALLY
        out = real_to(self, *args, **kwargs)
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is None:
            return out
        if isinstance(target, str) and target == "cpu":
            if tally.on_device(self):
                tally.note("sync")  # a download
                tally.unmark(out)
            return out
        if not tally.on_device(self) and not getattr(tally.in_unet, "uploading", False):
            tally.note("upload" if kwargs.get("non_blocking") else "sync")  # blocking: waits for the device
        tally.mark(out)
        return out

    torch.Tensor.to = to

    for name in FACTORIES:
        real = getattr(torch, name)

        def factory(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            device = kwargs.get("device")
            if device is not None and not (isinstance(device, str) and device == "cpu"):
                TALLY.mark(out)
                TALLY.note("sync" if _name == "tensor" else "kernel")  # torch.tensor copies host data up
            return out

        setattr(torch, name, factory)

    real_to_device = engine.batching.batch.to_device

    def to_device(t, device):  # counted as its CUDA branch: pinned memory, non_blocking
        TALLY.in_unet.uploading = True
        try:
            out = real_to_device(t, device)
        finally:
            TALLY.in_unet.uploading = False
        TALLY.note("upload")
        TALLY.mark(out)
        return out

    engine.batching.batch.to_device = engine.pipeline.to_device = to_device

    real_readback = engine.batching.readback.Readback.__init__

    def readback(self, tensor):  # counted as its CUDA branch: into pinned memory, non_blocking, an event
        real_readback(self, tensor)
        TALLY.unmark(self.host)  # read by the host only once its event says the copy has landed
        TALLY.note("download")

    engine.batching.readback.Readback.__init__ = readback
    return undo


#: With --loras, job i's LoRA tags (LoRA rows mixed in: none, one, another at 0.5, two).
LORA_TAGS = ("", " <lora:a>", " <lora:b:0.5>", " <lora:c> <lora:a:0.7>")


def requests(loras: bool = False) -> list[GenerationRequest]:
    return [
        GenerationRequest.of(
            i,
            prompt=f"a photo of a fox, number {i}" + (LORA_TAGS[i % len(LORA_TAGS)] if loras else ""),
            seed=i,
            steps=STEPS,
            guidance=7.0,
            width=SIZE,
            height=SIZE,
            sampler="euler_a",
        )
        for i in range(1, JOBS + 1)
    ]


def with_loras(components: dict, model, folder: Path):
    """A copy of ``model`` with the LoRA files ``a``, ``b``, ``c`` (tests/tinylora.py) in ``folder``."""
    import copy

    from safetensors.torch import save_file

    from tinylora import kohya_lora

    for seed, name in enumerate("abc", 1):
        save_file(kohya_lora(components, seed=seed, scale=0.3), folder / f"{name}.safetensors")
    copied = copy.deepcopy(model)
    copied.lora_dir = folder
    return copied


def count_engine(model, loras: bool = False) -> Tally:
    global TALLY
    tally = TALLY = Tally()
    worker = EngineWorker(model, EngineSettings(max_batch=JOBS, preview_every=PREVIEW_EVERY), GenerationSettings())
    tally.unet_hooks(model.unet)
    real_run, real_pool_work = worker._run, engine.serving.finishing._in_inference_mode

    def counted_run():  # dispatch modes are per thread: the engine thread and each pool thread
        with Counting(tally):
            real_run()

    def counted_pool_work(work):
        with Counting(tally):
            return real_pool_work(work)

    worker._run = counted_run
    engine.serving.finishing._in_inference_mode = counted_pool_work

    async def all_jobs():
        tasks = [asyncio.ensure_future(worker.generate(r, lambda p: None)) for r in requests(loras)]
        await asyncio.sleep(0)  # all waiting before the thread starts: one batch
        worker.start()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(all_jobs())
    finally:
        worker.stop()
        engine.serving.finishing._in_inference_mode = real_pool_work
    return tally


def count_diffusers(components: dict) -> Tally:
    parts = {k: v for k, v in components.items() if k in ("unet", "vae", "text_encoder", "tokenizer")}
    pipe = StableDiffusionPipeline(
        **parts,
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    global TALLY
    tally = TALLY = Tally()
    tally.unet_hooks(pipe.unet)
    prompts = [r.params.prompt for r in requests()]
    with torch.inference_mode(), Counting(tally):
        pipe(prompts, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE, width=SIZE, output_type="latent")
    return tally


def report(name: str, tally: Tally) -> dict:
    steady = [e for e in tally.events if e[0] in STEADY]
    steps = len(STEADY)
    per_step = collections.Counter((stepper, kind) for _, stepper, kind, _ in steady)
    row = {
        "kernels outside the UNet": per_step[(True, "kernel")] / steps,
        "kernels, other threads": per_step[(False, "kernel")] / steps,
        "UNet kernels": per_step[(True, "unet kernel")] / steps,
        "syncs, stepping thread": per_step[(True, "sync")] / steps,
        "syncs, other threads": per_step[(False, "sync")] / steps,
        "uploads (non-blocking)": (per_step[(True, "upload")] + per_step[(False, "upload")]) / steps,
        "downloads (non-blocking)": (per_step[(True, "download")] + per_step[(False, "download")]) / steps,
    }
    print(f"\n{name}: per steady step (UNet calls {STEADY.start}-{STEADY.stop - 1} of {tally.step})")
    for key, value in row.items():
        print(f"  {key:<26} {value:7.2f}")
    for kind, label in (("sync", "syncs"), ("kernel", "kernels outside the UNet")):
        sites = collections.Counter((s, stepper) for _, stepper, k, s in steady if k == kind)
        if sites:
            print(f"  {label} by site (per step):")
            for (where, stepper), n in sites.most_common(12):
                print(f"    {n / steps:6.2f}  {where}{'' if stepper else '  (other thread)'}")
    return row


def main() -> None:
    torch.manual_seed(0)
    components = build_components("tiny")
    model = loaded_model(components, "tiny", torch.device("cpu"), torch.float32)
    print(
        f"{JOBS} jobs of {SIZE}x{SIZE}, {STEPS} steps, euler_a, CFG 7; ours with previews every "
        f"{PREVIEW_EVERY} steps; the tests' tiny SD1 UNet, CPU, torch {torch.__version__}"
    )
    loras = "--loras" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as folder:
        lora_model = with_loras(components, model, Path(folder)) if loras else None
        patch_sync_points()
        ours = report("our engine", count_engine(model))
        rows = report("our engine, LoRA rows mixed in", count_engine(lora_model, loras=True)) if loras else None
    theirs = report("diffusers StableDiffusionPipeline", count_diffusers(components))
    print("\n" + " " * 28 + f"{'ours':>8} {'diffusers':>10}" + (f" {'ours, LoRA rows':>16}" if rows else ""))
    for key in ours:
        print(f"  {key:<26} {ours[key]:8.2f} {theirs[key]:10.2f}" + (f" {rows[key]:16.2f}" if rows else ""))


if __name__ == "__main__":
    main()
