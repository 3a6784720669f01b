"""AUTOMATIC1111 prompts: emphasis parsing, 75-token chunks, weights, embeddings, batching."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.batching.batch import Batch
from engine.families.sd.denoiser import Conditioning, PromptEncoder
from engine.families.sd.prompts import chunk_prompt, chunks_needed, count_tokens, parse_prompt_attention
from engine.families.sd.tokenizer import clip_tokenizer
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from engine_harness import denoise_alone
from tolerance import assert_same_latents

# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # The examples in A1111's parse_prompt_attention docstring.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        # The rest of the syntax people use.
        ("((word))", [("word", 1.2100000000000002)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word: 1.3 )", [("word", 1.3)]),
        ("(word:0)", [("word", 0.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("unopened) and ]", [("unopened) and ]", 1.0)]),
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parser_gives_a1111_results(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


# ---------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)  # "cat" is one token


def test_a_200_token_prompt_takes_3_chunks_and_nothing_is_cut(tokenizer):
    chunked = chunk_prompt(words(200), tokenizer)
    assert [len(chunk.tokens) for chunk in chunked.chunks] == [75, 75, 50]
    assert chunked.token_count == 200 and chunks_needed(chunked.token_count) == 3
    assert count_tokens(words(200)) == 200
    ids = chunked.chunks[2].input_ids(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[51] == tokenizer.eos_token_id


def test_break_starts_a_new_chunk(tokenizer):
    chunked = chunk_prompt("a cat BREAK a dog", tokenizer)
    assert [len(chunk.tokens) for chunk in chunked.chunks] == [2, 2]
    assert chunked.token_count == 75 + 2  # as A1111 counts: a BREAK fills its chunk


def test_a_full_chunk_moves_the_words_after_a_nearby_comma_to_the_next(tokenizer):
    # 70 words, a comma, 10 more words: the chunk fills up 5 tokens after the comma.
    chunked = chunk_prompt(words(70) + ", " + words(10, "dog"), tokenizer)
    comma = tokenizer(",", add_special_tokens=False).input_ids[0]
    dog = tokenizer("dog", add_special_tokens=False).input_ids[0]
    first, second = chunked.chunks
    assert first.tokens[-1] == comma and len(first.tokens) == 71
    assert second.tokens == [dog] * 10


def test_weights_follow_their_tokens(tokenizer):
    chunk = chunk_prompt("a (red:1.5) [fox]", tokenizer).chunks[0]
    assert chunk.weights == [1.0, 1.5, pytest.approx(1 / 1.1)]
    assert chunk.full_weights()[:5] == [1.0, 1.0, 1.5, pytest.approx(1 / 1.1), 1.0]


# ---------------------------------------------------------------------------- encoding


def encoder_for(model, **kwargs) -> PromptEncoder:
    return PromptEncoder(model.text_encoders, model.tokenizers, model.device, model.dtype, **kwargs)


@torch.inference_mode()
def truncated_encoding(model, prompt: str):
    """What the engine did before A1111 prompts: one 77-token window, the rest cut."""
    hiddens, pooled = [], None
    sdxl = len(model.text_encoders) == 2
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=False):
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=sdxl)
        hiddens.append(out.hidden_states[-2] if sdxl else out[0])
        pooled = out[0][0] if sdxl else None
    return torch.cat(hiddens, dim=-1)[0], pooled


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("prompt", ["a red fox, sitting in the snow", "", "ratio 16:9"])
def test_a_plain_prompt_encodes_exactly_as_before(request, family, prompt):
    model = request.getfixturevalue({"sd1": "tiny_model", "sd2": "tiny_sd2_model", "sdxl": "tiny_sdxl_model"}[family])
    hidden, pooled = truncated_encoding(model, prompt)
    encoded = encoder_for(model)(prompt)
    assert torch.equal(encoded.hidden, hidden)
    assert (pooled is None and encoded.pooled is None) or torch.equal(encoded.pooled, pooled)


def test_weights_change_the_encoding_and_keep_its_mean(tiny_model):
    prompts = encoder_for(tiny_model)
    plain = prompts("a red fox").hidden
    weighted = prompts("a (red:1.5) fox").hidden
    assert not torch.allclose(weighted, plain)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert not torch.allclose(prompts("a [red] fox").hidden, plain)
    assert torch.equal(prompts("a (red:1) fox").hidden, plain)  # weight 1 is no emphasis at all


def test_a_long_prompt_is_encoded_in_chunks_not_cut(tiny_model):
    prompts = encoder_for(tiny_model)
    long = prompts(words(200)).hidden
    assert long.shape == (3 * 77, 32)
    # Changing a word past token 77 changes only the chunk it falls in (token 180: the third).
    changed = prompts(words(180) + " dog " + words(19)).hidden
    assert torch.equal(changed[:154], long[:154])
    assert not torch.allclose(changed[154:], long[154:])
    # Each chunk is encoded like a prompt of its own.
    assert torch.equal(long[:77], prompts(words(75)).hidden)


def test_sdxl_prompts_are_chunked_for_both_encoders_with_the_first_chunks_pooled(tiny_sdxl_model):
    prompts = encoder_for(tiny_sdxl_model)
    long = prompts(words(100))
    assert long.hidden.shape == (2 * 77, 32 + 64)
    first_chunk = prompts(words(75))
    assert torch.equal(long.hidden[:77], first_chunk.hidden)
    torch.testing.assert_close(long.pooled, first_chunk.pooled)  # a batch of 2 chunks may round differently
    assert not torch.allclose(long.pooled, prompts(words(25)).pooled)
    weighted = prompts("a (red:1.4) fox")
    assert not torch.allclose(weighted.hidden, prompts("a red fox").hidden)


# ---------------------------------------------------------------------------- embeddings


def test_an_embedding_by_name_changes_the_encoding_and_a_missing_one_is_text(tiny_model, tmp_path):
    torch.manual_seed(1)
    save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "fancystyle.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "name": "old"}, tmp_path / "oldstyle.pt")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xlstyle.safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    plain, with_embeddings = encoder_for(tiny_model), encoder_for(tiny_model, embeddings_dir=tmp_path)
    assert sorted(with_embeddings.embeddings.names) == ["fancystyle", "oldstyle"]  # xlstyle: other widths

    for name in ("fancystyle", "oldstyle"):
        prompt = f"a fox, {name}"
        assert not torch.allclose(with_embeddings(prompt).hidden, plain(prompt).hidden)
    # A name without a file, and a file for another model family, are plain words.
    for prompt in ("a fox, otherstyle", "a fox, xlstyle"):
        assert torch.equal(with_embeddings(prompt).hidden, plain(prompt).hidden)
    # The embedding counts as its vectors, not as the tokens of its name.
    name_tokens = len(tiny_model.tokenizers[0]("fancystyle", add_special_tokens=False).input_ids)
    assert with_embeddings.count_tokens("fancystyle") == 3
    assert plain.count_tokens("fancystyle") == count_tokens("fancystyle") == name_tokens


def test_embeddings_put_their_vectors_at_the_token_embedding_layer(tiny_model, tmp_path):
    tokenizer, encoder = tiny_model.tokenizers[0], tiny_model.text_encoders[0]
    table = encoder.get_input_embeddings().weight
    dog = tokenizer("dog", add_special_tokens=False).input_ids[0]
    save_file({"emb_params": table[dog][None].detach().clone()}, tmp_path / "mydog.safetensors")
    prompts = encoder_for(tiny_model, embeddings_dir=tmp_path)
    # An embedding holding the token vector of "dog" encodes exactly as the word "dog".
    torch.testing.assert_close(prompts("a mydog in the snow").hidden, prompts("a dog in the snow").hidden)
    assert prompts.chunked("a mydog").chunks[0].fixes[0][0] == 1


def test_sdxl_embeddings_feed_each_encoder_its_own_vectors(tiny_sdxl_model, tmp_path):
    torch.manual_seed(2)
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, tmp_path / "xlstyle.safetensors")
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "sd1style.safetensors")
    plain, prompts = encoder_for(tiny_sdxl_model), encoder_for(tiny_sdxl_model, embeddings_dir=tmp_path)
    assert prompts.embeddings.names == ["xlstyle"]
    with_style, without = prompts("a fox, xlstyle").hidden, plain("a fox, xlstyle").hidden
    assert not torch.allclose(with_style[:, :32], without[:, :32])
    assert not torch.allclose(with_style[:, 32:], without[:, 32:])


def test_an_embedding_added_later_is_picked_up(tiny_model, tmp_path):
    prompts = encoder_for(tiny_model, embeddings_dir=tmp_path)
    before = prompts("a fox, newstyle").hidden
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "newstyle.safetensors")
    assert not torch.allclose(prompts("a fox, newstyle").hidden, before)


# ---------------------------------------------------------------------------- batching


def test_rows_of_different_lengths_attend_only_to_their_own_tokens(tiny_model):
    """The padded, masked batch equals running each row at its own length (A1111's default)."""
    pipeline = Pipeline(tiny_model)
    cond = pipeline.prompts.conditioning(words(100), "blurry", rows=1, guidance=5.0, width=64, height=64)
    assert cond.embeds.shape[1] == 154 and cond.mask[1, 77:].any().item() is False
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0])
    unet, t = tiny_model.unet, torch.tensor([500.0])
    with torch.inference_mode():
        batched = unet(
            torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask
        ).sample
        positive = unet(x, t, encoder_hidden_states=cond.embeds[:1]).sample
        negative = unet(x, t, encoder_hidden_states=cond.embeds[1:, :77]).sample
    torch.testing.assert_close(batched, torch.cat([positive, negative]), rtol=1e-5, atol=1e-5)
    assert pipeline.denoiser(x, sigma, cond).isfinite().all()


def test_jobs_with_different_chunk_counts_share_a_batch_and_match_running_alone(tiny_model):
    pipeline = Pipeline(tiny_model)
    requests = [
        GenerationRequest.of(
            job_id=1,
            prompt="a red fox",
            negative_prompt="blurry",
            seed=1,
            steps=4,
            width=64,
            height=64,
            sampler="euler",
        ),
        GenerationRequest.of(
            job_id=2,
            prompt=words(160),
            negative_prompt="blurry",
            seed=2,
            steps=4,
            width=64,
            height=64,
            sampler="euler",
            count=2,
        ),
        GenerationRequest.of(
            job_id=3,
            prompt="a (red:1.3) fox BREAK snow",
            negative_prompt=words(90),
            seed=3,
            steps=4,
            width=64,
            height=64,
            sampler="euler",
        ),
    ]
    alone = denoise_alone(pipeline, requests)

    batch, together = Batch(pipeline.denoiser), {}
    for job in [pipeline.prepare(request) for request in requests]:
        batch.add(job)
    assert batch.cond.embeds.shape[1] == 3 * 77 and batch.cond.mask is not None
    while batch.entries:
        batch.step()
        for entry in [e for e in batch.entries if e.done]:
            together[entry.job.request.job_id] = batch.remove(entry.job)
    for job_id, latents in alone.items():
        assert_same_latents(together[job_id], latents)


def test_equal_lengths_need_no_mask(tiny_model):
    prompts = encoder_for(tiny_model)
    parts = [prompts.conditioning(p, "blurry", rows=1, guidance=5.0, width=64, height=64) for p in ("a", "b")]
    assert Conditioning.cat(parts).mask is None
