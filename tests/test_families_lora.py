"""``<lora:NAME:WEIGHT>`` on Flux.1 and SD 3.5 against diffusers (issue 21, point 5): tiny random
LoRAs in diffusers' layout and in kohya's Flux layout give our engine the latents that
FluxPipeline / StableDiffusion3Pipeline give with ``load_lora_weights`` and ``set_adapters`` on
the same weights, noise and steps; a job without the tag afterwards is the model itself again; a
LoRA made for another family is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import save_file

from engine.batching.batch import Batch
from engine.errors import GenerationError
from engine.families.flux import pack, unpack
from engine.families.loading import load_model
from engine.pipeline import Pipeline
from engine.prompt_syntax import strip_lora_tags
from engine.types import GenerationRequest
from tinyflow import save_flux_folder, save_sd3_folder

SIZE = 64
PROMPT = "a photo of a red cat in the forest"
ATOL = 2e-4  # our float32 arithmetic against diffusers' on the same values (tests/test_families_flow.py)
RANK = 4
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ---------------------------------------------------------------------------- tiny LoRA files


def _pair(generator: torch.Generator, inputs: int, outputs: int, scale: float = 0.3) -> tuple:
    down = torch.randn(RANK, inputs, generator=generator) * scale
    return down, torch.randn(outputs, RANK, generator=generator) * scale


def diffusers_lora(modules: dict[str, torch.nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """diffusers' layout (``save_lora_weights``): ``<component>.<layer>.lora_A/B.weight`` for every
    Linear of each component given by its prefix; a CLIP's layers keep ``text_model.`` as files
    made with transformers 4 do."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for prefix, module in modules.items():
        for layer, linear in module.named_modules():
            clip = prefix.startswith("text_encoder")
            if not isinstance(linear, torch.nn.Linear) or (clip and not layer.endswith(CLIP_TARGETS)):
                continue
            if clip:  # transformers 5's CLIPTextModel has no ``text_model.`` level (its WithProjection has)
                layer = "text_model." + layer.removeprefix("text_model.")
            key = f"{prefix}.{layer}"
            down, up = _pair(generator, linear.in_features, linear.out_features)
            state |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    return state


def kohya_flux_lora(
    transformer, clip, seed: int, alpha: float = RANK / 2, comfy: bool = False, embedders: bool = False
) -> dict:
    """kohya's Flux layout: BFL's layer names (``double_blocks_0_img_attn_qkv``: to_q, to_k and to_v
    fused) with dots as underscores, ``lora_down``/``lora_up``/``alpha``, ``lora_te1_`` for CLIP-L;
    ``comfy``: the same as ComfyUI saves it (``diffusion_model.double_blocks.0.img_attn.qkv``,
    ``text_encoders.clip_l.transformer.text_model...``); ``embedders``: also the input embedders and
    the final layer (:data:`FLUX_EDGES`), which diffusers' converter leaves out of its transformer.

    Not ``single_blocks_N_linear1``: diffusers' converter splits it at FLUX.1's widths (3072, 12288)
    whatever the file, so a tiny one cannot be converted (real files are unaffected)."""
    generator, state = torch.Generator().manual_seed(seed), {}

    def add(layer: str, inputs: int, outputs: int, clip_layer: bool = False) -> None:
        if comfy:
            name = ("text_encoders.clip_l.transformer.text_model." if clip_layer else "diffusion_model.") + layer
        else:
            name = ("lora_te1_text_model_" if clip_layer else "lora_unet_") + layer.replace(".", "_")
        down, up = _pair(generator, inputs, outputs)
        state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        state[f"{name}.alpha"] = torch.tensor(alpha)

    def linear(module) -> tuple[int, int]:
        return module.in_features, module.out_features

    for i, block in enumerate(transformer.transformer_blocks):
        width = block.attn.to_q.in_features
        for side, attn_out, ff, norm in (
            ("img", block.attn.to_out[0], block.ff, block.norm1),
            ("txt", block.attn.to_add_out, block.ff_context, block.norm1_context),
        ):
            add(f"double_blocks.{i}.{side}_attn.qkv", width, 3 * width)
            add(f"double_blocks.{i}.{side}_attn.proj", *linear(attn_out))
            add(f"double_blocks.{i}.{side}_mlp.0", *linear(ff.net[0].proj))
            add(f"double_blocks.{i}.{side}_mlp.2", *linear(ff.net[2]))
            add(f"double_blocks.{i}.{side}_mod.lin", *linear(norm.linear))
    for i, block in enumerate(transformer.single_transformer_blocks):
        add(f"single_blocks.{i}.linear2", *linear(block.proj_out))
        add(f"single_blocks.{i}.modulation.lin", *linear(block.norm.linear))
    for layer, module in clip.named_modules():
        if isinstance(module, torch.nn.Linear) and layer.endswith(CLIP_TARGETS):
            add(layer, *linear(module), clip_layer=True)
    if embedders:
        for bfl, layer in FLUX_EDGES.items():
            add(bfl, *linear(transformer.get_submodule(layer)))
    return state


#: BFL's input embedders and final layer -> diffusers' layers (kohya names them ``lora_unet_img_in``...).
FLUX_EDGES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # BFL's (shift, scale) is diffusers' (scale, shift)
}


def xlabs_flux_lora(transformer, seed: int) -> dict[str, torch.Tensor]:
    """XLabs' layout: each block's attention processor's ``qkv_lora1``/``proj_lora1`` (image) and
    ``qkv_lora2``/``proj_lora2`` (text) as ``down``/``up`` pairs, no alpha."""
    generator, state = torch.Generator().manual_seed(seed), {}
    width = transformer.transformer_blocks[0].attn.to_q.in_features
    for i in range(len(transformer.transformer_blocks)):
        for lora, outputs in (("qkv_lora1", 3 * width), ("proj_lora1", width), ("qkv_lora2", 3 * width)):
            down, up = _pair(generator, width, outputs)
            name = f"double_blocks.{i}.processor.{lora}"
            state |= {f"{name}.down.weight": down, f"{name}.up.weight": up}
    return state


def kohya_sd3_lora(seed: int) -> dict[str, torch.Tensor]:
    """kohya's SD 3.5 layout (MMDiT names), which diffusers does not convert."""
    down, up = _pair(torch.Generator().manual_seed(seed), 32, 96)
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}


# ---------------------------------------------------------------------------- models and LoRAs


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-lora")
    return {
        "flux": save_flux_folder(root / "flux-dev"),
        "sd3": save_sd3_folder(root / "sd3"),
        "flux-schnell": save_flux_folder(root / "flux-schnell", guidance_embeds=False),
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, folders) -> Path:
    from tinylora import save_tiny_lora

    folder = tmp_path_factory.mktemp("flow-loras")
    flux = FluxPipeline.from_pretrained(folders["flux"], local_files_only=True)
    sd3 = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], local_files_only=True)
    files = {
        "flux-diffusers": diffusers_lora({"transformer": flux.transformer, "text_encoder": flux.text_encoder}, 1),
        "flux-kohya": kohya_flux_lora(flux.transformer, flux.text_encoder, 2),
        "flux-comfy": kohya_flux_lora(flux.transformer, flux.text_encoder, 6, comfy=True),
        "flux-kohya-full": kohya_flux_lora(flux.transformer, flux.text_encoder, 8, embedders=True),
        "flux-xlabs": xlabs_flux_lora(flux.transformer, 7),
        "sd3-diffusers": diffusers_lora(
            {"transformer": sd3.transformer, "text_encoder": sd3.text_encoder, "text_encoder_2": sd3.text_encoder_2}, 3
        ),
        "sd3-style": diffusers_lora({"transformer": sd3.transformer}, 4),
        "sd3-kohya": kohya_sd3_lora(5),
    }
    for name, state in files.items():
        save_file(state, folder / f"{name}.safetensors")
    save_tiny_lora(folder / "sd1-detail.safetensors", family="sd1", seed=1)
    return folder


@pytest.fixture(scope="module")
def pipelines(folders, lora_dir) -> dict[str, Pipeline]:
    out = {}
    for family, folder in folders.items():
        if family == "flux-schnell":
            continue  # only test_kohya_s_embedders_and_final_layer_apply_too uses it
        model = load_model(str(folder), device="cpu", dtype=torch.float32, name=f"tiny-{family}")
        model.lora_dir = lora_dir
        out[family] = Pipeline(model)
    return out


@pytest.fixture(scope="module")
def plain(pipelines) -> dict[str, torch.Tensor]:
    """Each model's latents without a LoRA, made before any LoRA is loaded."""
    return {family: ours(pipeline, PROMPT) for family, pipeline in pipelines.items()}


@pytest.fixture(scope="module")
def references(folders, lora_dir) -> dict:
    """diffusers' pipelines with every LoRA of their family loaded, named as the files."""
    out = {}
    for family, cls, names in (
        ("flux", FluxPipeline, ["flux-diffusers", "flux-kohya", "flux-comfy", "flux-xlabs"]),
        ("sd3", StableDiffusion3Pipeline, ["sd3-diffusers", "sd3-style"]),
    ):
        pipe = cls.from_pretrained(folders[family], torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for name in names:
            pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
        out[family] = pipe
    return out


def request(prompt: str, family: str = "flux") -> GenerationRequest:
    negative = "blurry" if family == "sd3" else ""  # SD 3.5 runs CFG with it; Flux takes none
    return GenerationRequest.of(
        1,
        prompt=prompt,
        negative_prompt=negative,
        seed=7,
        steps=4,
        width=SIZE,
        height=SIZE,
        sampler="euler",
        guidance=3.5,
    )


def start_noise() -> torch.Tensor:
    return torch.randn((16, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(7))[None]


def ours(pipeline: Pipeline, prompt: str) -> torch.Tensor:
    job = pipeline.prepare(request(prompt, pipeline.family))
    batch = Batch(pipeline.denoiser)
    batch.add(job)
    while not batch.entries[0].done:
        batch.step()
    return batch.remove(job)


def theirs(pipe, prompt: str, adapters: dict[str, float]) -> torch.Tensor:
    """diffusers with ``adapters`` set at their weights (none: every adapter disabled)."""
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters(list(adapters), list(adapters.values()))
    else:
        pipe.disable_lora()
    call = dict(prompt=strip_lora_tags(prompt), height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=3.5)
    if isinstance(pipe, FluxPipeline):
        call |= dict(latents=pack(start_noise()), max_sequence_length=pipe.tokenizer_2.model_max_length)
        return unpack(pipe(output_type="latent", **call).images, SIZE // 8, SIZE // 8)
    call |= dict(latents=start_noise(), negative_prompt="blurry", max_sequence_length=256)
    return pipe(output_type="latent", **call).images


# ---------------------------------------------------------------------------- against diffusers


CASES = [
    ("flux", "<lora:flux-diffusers:0.8>", {"flux-diffusers": 0.8}),
    ("flux", "<lora:flux-kohya:0.8>", {"flux-kohya": 0.8}),
    ("flux", "<lora:flux-diffusers:0.8> <lora:flux-kohya:0.5>", {"flux-diffusers": 0.8, "flux-kohya": 0.5}),
    ("flux", "<lora:flux-comfy:0.8>", {"flux-comfy": 0.8}),
    ("flux", "<lora:flux-xlabs:0.8>", {"flux-xlabs": 0.8}),
    ("sd3", "<lora:sd3-diffusers:0.8>", {"sd3-diffusers": 0.8}),
    ("sd3", "<lora:sd3-diffusers:0.8> <lora:sd3-style:-0.6>", {"sd3-diffusers": 0.8, "sd3-style": -0.6}),
]


@pytest.mark.parametrize(("family", "tags", "adapters"), CASES)
def test_a_lora_job_matches_diffusers_and_the_next_plain_job_is_the_model_again(
    pipelines, plain, references, family, tags, adapters
):
    pipeline, prompt = pipelines[family], f"{PROMPT} {tags}"
    with_lora = ours(pipeline, prompt)
    torch.testing.assert_close(with_lora, theirs(references[family], prompt, adapters), atol=ATOL, rtol=0)
    assert (with_lora - plain[family]).abs().max() > 100 * ATOL  # the LoRA did change the image
    # The same prompt without the tag: adapters off and no encoding cached under the LoRA set.
    assert torch.equal(ours(pipeline, PROMPT), plain[family])


def test_the_plain_latents_are_diffusers_without_adapters(plain, references):
    for family, pipe in references.items():
        torch.testing.assert_close(plain[family], theirs(pipe, PROMPT, {}), atol=ATOL, rtol=0)


def test_a_flux_lora_with_clip_weights_changes_the_cached_prompt_encoding(pipelines):
    """CLIP-L carries part of the LoRA: the prompt cache keys encodings by the LoRA set."""
    pipeline = pipelines["flux"]
    pipeline.use_loras(request(PROMPT))
    before = pipeline.prompts(PROMPT).pooled
    pipeline.use_loras(request(f"{PROMPT} <lora:flux-diffusers:1>"))
    changed = pipeline.prompts(PROMPT).pooled
    pipeline.use_loras(request(PROMPT))
    assert not torch.equal(before, changed) and torch.equal(pipeline.prompts(PROMPT).pooled, before)


def effective(layer, adapter: str) -> torch.Tensor:
    """What the adapter adds to the layer's weight: ``scaling * B @ A``."""
    return layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight


def kohya_delta(file: dict, name: str) -> torch.Tensor:
    """What kohya's pair ``name`` adds to its layer's weight: ``alpha / rank * up @ down``."""
    return file[f"{name}.alpha"].item() / RANK * file[f"{name}.lora_up.weight"] @ file[f"{name}.lora_down.weight"]


def test_kohya_s_fused_qkv_becomes_the_three_projections(pipelines, lora_dir):
    """Independent of diffusers' converter: BFL's ``img_attn_qkv`` at alpha / rank is to_q, to_k and
    to_v stacked (each a third of the rows)."""
    from safetensors.torch import load_file

    pipeline = pipelines["flux"]
    pipeline.use_loras(request(f"{PROMPT} <lora:flux-kohya:1>"))
    adapter = pipeline.loras._loaded["flux-kohya"][0]
    fused = kohya_delta(load_file(lora_dir / "flux-kohya.safetensors"), "lora_unet_double_blocks_0_img_attn_qkv")
    attn = pipeline.model.unet.transformer_blocks[0].attn
    parts = [effective(layer, adapter) for layer in (attn.to_q, attn.to_k, attn.to_v)]
    torch.testing.assert_close(torch.cat(parts), fused, atol=1e-6, rtol=1e-5)
    pipeline.use_loras(request(PROMPT))


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell"])
def test_kohya_s_embedders_and_final_layer_apply_too(folders, lora_dir, model):
    """diffusers' converter names these layers without ``transformer.`` (so its loader drops them)
    and drops the final layer's alpha; kohya, ComfyUI and Forge apply them at alpha / rank, and so do
    we. On schnell, which has no guidance embedding, the file's guidance layers are left out."""
    from safetensors.torch import load_file

    folder = folders["flux" if model == "flux-dev" else model]
    loaded = load_model(str(folder), device="cpu", dtype=torch.float32, name=model)
    loaded.lora_dir = lora_dir
    pipeline = Pipeline(loaded)
    plain = ours(pipeline, PROMPT)
    changed = ours(pipeline, f"{PROMPT} <lora:flux-kohya-full:1>")
    assert (changed - plain).abs().max() > 100 * ATOL
    adapter, file = pipeline.loras._loaded["flux-kohya-full"][0], load_file(lora_dir / "flux-kohya-full.safetensors")
    transformer = pipeline.model.unet
    for bfl, layer_name in FLUX_EDGES.items():
        if "guidance" in bfl and model == "flux-schnell":
            assert not hasattr(transformer.time_text_embed, "guidance_embedder")
            continue
        expected = kohya_delta(file, "lora_unet_" + bfl.replace(".", "_"))
        if bfl.startswith("final_layer.adaLN"):
            expected = torch.cat(expected.chunk(2)[::-1])
        torch.testing.assert_close(effective(transformer.get_submodule(layer_name), adapter), expected)


def test_a_lora_on_fp8_weights_is_the_lora_on_those_weights_upcast(folders, lora_dir):
    """``model.weights = "float8_e4m3fn"``: the adapters hold the file's weights in the compute
    dtype (fp8 has no matmul, and would round them), so a LoRA job is the same LoRA on a float32
    model whose fp8-stored layers hold the same rounded weights."""
    fp8 = load_model(str(folders["flux"]), device="cpu", dtype=torch.float32, weights="float8_e4m3fn", name="fp8")
    rounded = load_model(str(folders["flux"]), device="cpu", dtype=torch.float32, name="rounded")
    networks = zip([fp8.unet, *fp8.text_encoders], [rounded.unet, *rounded.text_encoders], strict=True)
    with torch.no_grad():
        for stored, reference in networks:
            layers = dict(reference.named_modules())
            for name, layer in stored.named_modules():
                for param_name, param in layer.named_parameters(recurse=False):
                    if param.dtype == torch.float8_e4m3fn:
                        getattr(layers[name], param_name).copy_(param.float())
    fp8.lora_dir = rounded.lora_dir = lora_dir
    prompt = f"{PROMPT} <lora:flux-kohya:0.8>"
    latents = ours(Pipeline(fp8), prompt)
    to_q = fp8.unet.transformer_blocks[0].attn.to_q
    assert to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert {layer.weight.dtype for layer in (*to_q.lora_A.values(), *to_q.lora_B.values())} == {torch.float32}
    torch.testing.assert_close(latents, ours(Pipeline(rounded), prompt), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("family", "tag", "words"),
    [
        ("flux", "<lora:sd1-detail:1>", r"'sd1-detail' does not fit model 'tiny-flux': it is made for SD 1\.x"),
        ("sd3", "<lora:sd1-detail:1>", r"does not fit model 'tiny-sd3': it is made for SD 1\.x, 2\.x or XL"),
        ("sd3", "<lora:sd3-kohya:1>", r"'sd3-kohya' is in kohya's or ComfyUI's key layout"),
        ("sd3", "<lora:flux-kohya:1>", r"does not fit model 'tiny-sd3': it is made for Flux\.1"),
        ("flux", "<lora:sd3-diffusers:1>", r"'tiny-flux': it changes '.+', which a Flux\.1 model does not"),
        ("flux", "<lora:nope:1>", r"No LoRA named 'nope'; available: flux-comfy, flux-diffusers, flux-kohya, "),
    ],
)
def test_a_lora_of_another_family_is_refused_and_changes_nothing(pipelines, plain, family, tag, words):
    pipeline = pipelines[family]
    with pytest.raises(GenerationError, match=words):
        pipeline.prepare(request(f"{PROMPT} {tag}", family))
    assert torch.equal(ours(pipeline, PROMPT), plain[family])


@pytest.fixture(scope="module")
def sd1_pipeline(tiny_sd_folder, lora_dir) -> Pipeline:
    """Its own copy of the tiny SD 1.x model (the session's stays without adapters)."""
    model = load_model(str(tiny_sd_folder), device="cpu", dtype=torch.float32, name="tiny-sd1", progress=False)
    model.lora_dir = lora_dir
    return Pipeline(model)


@pytest.mark.parametrize(
    ("name", "made_for"),
    [
        ("flux-diffusers", r"Flux\.1"),
        ("flux-kohya", r"Flux\.1"),
        ("sd3-diffusers", r"Flux\.1 or SD 3\.5"),
        ("sd3-kohya", r"SD 3\.5"),
    ],
)
def test_a_flow_lora_on_an_sd_model_is_refused_not_half_applied(sd1_pipeline, name, made_for):
    """diffusers' SD loader would apply such a file's CLIP weights and skip its transformer's."""
    with pytest.raises(GenerationError, match=rf"'{name}' does not fit model 'tiny-sd1': it is made for {made_for}"):
        sd1_pipeline.prepare(request(f"{PROMPT} <lora:{name}:1>", "sd1"))
    model = sd1_pipeline.model
    assert not any(getattr(module, "peft_config", None) for module in (model.unet, *model.text_encoders))


def test_lora_sets_switch_on_a_compiled_transformer(folders, lora_dir, pipelines):
    """``engine.compile``: adapters added and switched after the transformer was compiled give the
    eager latents (dynamo's eager backend, as tests/test_families_compile.py; inductor is the GPU's)."""
    import functools

    torch._dynamo.reset()
    model = load_model(str(folders["flux"]), device="cpu", dtype=torch.float32, name="compiled", progress=False)
    model.lora_dir = lora_dir
    compiled = Pipeline(model)
    compiled.denoiser.compile(functools.partial(torch.compile, backend="eager", dynamic=False))
    for tags in ("", "<lora:flux-diffusers:0.8> <lora:flux-kohya:0.5>", ""):
        prompt = f"{PROMPT} {tags}".strip()
        torch.testing.assert_close(ours(compiled, prompt), ours(pipelines["flux"], prompt), atol=1e-6, rtol=0)
    assert compiled.denoiser.graphs and not compiled.denoiser.eager_calls
