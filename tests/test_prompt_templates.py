"""Prompts as members write them, read at the boundary: Midjourney's ``--parameters`` and
permutations, Dynamic Prompts' variants and wildcards (property-based where a property says more
than examples), and hostile prompts refused in a sentence."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.inputs import BadInput
from bot.policy import Asked, aspect_size
from bot.prompt_params import ALIASES, KNOWN, MAX_ASPECT, read_prompt_params
from bot.prompting import MAX_PERMUTATIONS, permuted, templated
from db.wildcards import MAX_WILDCARD_BYTES, WildcardError, check_name, parse_lines
from engine.config.settings import GenerationSettings
from engine.families.generation import for_family
from engine.params import SEED_MAX, GenerationParams
from engine.prompt_syntax import lora_key, parse_prompt_attention
from engine.prompt_templates import (
    TemplateError,
    count_jobs,
    escape,
    image_prompt,
    parse,
    plain,
    render,
    with_wildcards,
)

WORD = st.text("abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=8).map(str.strip).filter(bool)
#: Text with every character that means something to either syntax, but no backslash.
HOSTILE_TEXT = st.text("ab ,|{}_()[]<>:.-$2", max_size=40)


def read(prompt: str, **options) -> Asked:
    return read_prompt_params(Asked(prompt, **options), max_steps=50, max_guidance=20.0)


# ---------------------------------------------------------------------------- Midjourney's parameters


@settings(max_examples=60)
@given(
    seed=st.integers(0, SEED_MAX),
    steps=st.integers(1, 50),
    cfg=st.floats(0, 20, allow_nan=False).map(lambda x: round(x, 2)),
    ar=st.tuples(st.integers(1, 16), st.integers(1, 16)).filter(lambda r: max(r[0] / r[1], r[1] / r[0]) <= MAX_ASPECT),
    chaos=st.integers(0, 100),
    no=st.lists(WORD, min_size=1, max_size=3),
    order=st.randoms(use_true_random=False),
    dash=st.sampled_from(["--", "\u2014"]),
)
def test_every_documented_parameter_form_lands_in_its_option(seed, steps, cfg, ar, chaos, no, order, dash):
    parts = [
        f"seed {seed}",
        f"steps {steps}",
        f"cfg {cfg:g}",
        f"{order.choice(['ar', 'aspect'])} {ar[0]}:{ar[1]}",
        f"{order.choice(['chaos', 'c'])} {chaos}",
        "no " + ", ".join(no),
        "tile",
    ]
    order.shuffle(parts)
    asked = read("a fox in snow " + " ".join(dash + p for p in parts))
    assert asked.prompt == "a fox in snow"
    assert (asked.seed, asked.steps, asked.guidance, asked.aspect, asked.chaos) == (seed, steps, cfg, ar, chaos)
    assert asked.no == ", ".join(no) and asked.tile is True


@given(name=st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True).filter(lambda n: n not in ALIASES))
def test_an_unknown_parameter_is_refused_with_the_list(name):
    with pytest.raises(BadInput) as refused:
        read(f"a fox --{name} 3")
    if name in ("s", "stylize"):
        assert "--cfg" in str(refused.value)
    else:
        assert all(form in str(refused.value) for form in KNOWN)


@pytest.mark.parametrize(
    ("prompt", "options", "says"),
    [
        ("a fox --seed 7", {"seed": 3}, "`seed` is given twice"),
        ("a fox --ar 16:9", {"size": (512, 512)}, "`size` is given twice"),
        ("a fox --cfg 5", {"guidance": 7.0}, "`guidance` is given twice"),
        ("a fox --steps 5", {"steps": 9}, "`steps` is given twice"),
        ("a fox --seed 1 --seed 2", {}, "given twice"),
        ("a fox --seed", {}, "needs a value"),
        ("a fox --seed -1", {}, "from 0 to"),
        ("a fox --steps 51", {}, "from 1 to 50"),
        ("a fox --cfg nan", {}, "needs a number"),
        ("a fox --cfg 1e999", {}, "needs a number"),
        ("a fox --ar 16/9", {}, "ratio of whole numbers"),
        ("a fox --ar 9:1", {}, "between 1:4 and 4:1"),
        ("a fox --ar 0:1", {}, "between"),
        ("a fox --chaos 101", {}, "0 to 100"),
        ("a fox --tile please", {}, "takes no value"),
        ("a fox --seed 7 and a cat", {}, "one value"),
        ("--ar 1:1", {}, "prompt is empty"),
    ],
)
def test_parameters_are_refused_in_a_sentence_saying_what_to_write(prompt, options, says):
    with pytest.raises(BadInput, match=says):
        read(prompt, **options)


def test_no_is_added_to_the_negative_option_and_dashes_inside_words_are_words():
    asked = read("a half-eaten apple -- still life --no trees,  , people", negative="blurry")
    assert asked.prompt == "a half-eaten apple -- still life"
    assert (asked.negative, asked.no) == ("blurry", "trees, people")
    assert read("x--ar 2:1").aspect is None  # not after a space: part of the prompt


SIZE_TABLES = [
    GenerationSettings(),  # SD 1.x: 512 px, 8-pixel grid
    for_family(GenerationSettings(), "sdxl"),
    for_family(GenerationSettings(), "flux", "distilled"),
    for_family(GenerationSettings(), "sd3"),
]


@settings(max_examples=150)
@given(
    gen=st.sampled_from(SIZE_TABLES),
    ar=st.tuples(st.integers(1, 40), st.integers(1, 40)).filter(lambda r: max(r[0] / r[1], r[1] / r[0]) <= MAX_ASPECT),
    server_max=st.sampled_from([None, 512, 768, 1024]),
)
def test_ar_picks_a_size_on_the_models_grid_within_the_budget(gen, ar, server_max):
    max_width = min(gen.max_width, server_max or gen.max_width)
    max_height = min(gen.max_height, server_max or gen.max_height)
    area = gen.default_width * gen.default_height
    width, height = aspect_size(ar, area, max_width, max_height, gen.pixel_multiple)
    assert width % gen.pixel_multiple == 0 and height % gen.pixel_multiple == 0
    assert width <= max_width and height <= max_height and width * height <= area
    # Near the ratio: within a grid step's rounding of the side that was rounded.
    assert abs(math.log(width / height) - math.log(ar[0] / ar[1])) <= 2 * gen.pixel_multiple / min(width, height)
    # Not needlessly small: at least half the budget, or one side within two grid steps of its limit.
    step = 2 * gen.pixel_multiple
    assert width * height >= area / 2 or width + step >= max_width or height + step >= max_height


def test_ar_examples():
    assert aspect_size((16, 9), 512 * 512, 1024, 1024, 8) == (680, 384)
    assert aspect_size((9, 16), 512 * 512, 1024, 1024, 8) == (384, 680)
    assert aspect_size((1, 1), 1024 * 1024, 1536, 1536, 16) == (1024, 1024)
    assert aspect_size((16, 9), 1024 * 1024, 1536, 1536, 16) == (1360, 768)


# ---------------------------------------------------------------------------- permutations


@given(before=WORD, options=st.lists(WORD, min_size=1, max_size=6), after=WORD)
def test_permutations_make_one_prompt_per_choice_in_order(before, options, after):
    assert permuted(f"{before} {{{', '.join(options)}}} {after}") == (
        [f"{before} {o} {after}" for o in options] if len(options) > 1 else [f"{before} {options[0]} {after}"]
    )


def test_several_and_nested_groups_multiply():
    assert permuted("a {red, blue} {car, bus}") == ["a red car", "a red bus", "a blue car", "a blue bus"]
    assert permuted("a {red, {dark, light} blue} car") == ["a red car", "a dark blue car", "a light blue car"]
    assert permuted("a {big, small} {x|y}") == ["a big {x|y}", "a small {x|y}"]
    assert permuted("a {x|{p, q}}") == ["a {x|p}", "a {x|q}"]
    assert permuted("a {red, blue} car --ar {1:1, 16:9}")[3] == "a blue car --ar 16:9"


def test_braces_keep_emphasis_lora_tags_and_alternation():
    jobs = permuted("(a {red, blue} car:1.2), {(shiny, new:1.1), old} <lora:detail:0.8> [cat|dog]")
    assert len(jobs) == 4
    first = plain(parse(jobs[0]))
    assert first == "(a red car:1.2), (shiny, new:1.1) <lora:detail:0.8> [cat|dog]"
    assert lora_key(first) == (("detail", "0.8"),)
    assert ("a red car", 1.2) in parse_prompt_attention(first)
    assert plain(parse(permuted("{<lora:a:0.5>, <lora:b:1>} fox")[1])) == "<lora:b:1> fox"


@given(text=HOSTILE_TEXT)
def test_escaped_text_reads_back_as_itself(text):
    assert plain(parse(escape(text).replace(",", "\\,"))) == text


def test_escapes_write_the_characters():
    assert permuted(r"a \{red, blue\} car") == [r"a \{red, blue\} car"]
    assert plain(parse(r"a \{red, blue\} car \| \_\_x\_\_ \(b\)")) == r"a {red, blue} car | __x__ \(b\)"
    assert permuted(r"{red\, blue, green} car") == [r"red, blue car", "green car"]


@settings(max_examples=200)
@given(text=HOSTILE_TEXT)
def test_any_text_is_read_or_refused_in_a_sentence(text):
    try:
        jobs = permuted(text)
    except BadInput as e:
        assert str(e).endswith(".")
        return
    assert 1 <= len(jobs) <= MAX_PERMUTATIONS
    for job in jobs:  # each job's template reads back, and draws a prompt
        image_prompt(job, 1) if "__" not in job.replace("\\_", "") else None


def test_hostile_prompts_are_refused_in_a_sentence():
    with pytest.raises(BadInput, match="nest 8 deep"):
        permuted("{" * 10_000 + "}" * 10_000)
    with pytest.raises(BadInput, match="never closed"):
        permuted("a {red, blue")
    with pytest.raises(BadInput, match="closes no"):
        permuted("a red} car")
    with pytest.raises(BadInput, match=f"more than {MAX_PERMUTATIONS} jobs"):
        permuted("{a, b, c, d, e, f, g, h, i, j} " * 4)  # ten thousand
    # Counted without listing them: 2**400 jobs are refused as fast as 41.
    assert count_jobs(parse("{a, b}" * 400), MAX_PERMUTATIONS) == MAX_PERMUTATIONS + 1


# ---------------------------------------------------------------------------- variants and wildcards


@given(seed=st.integers(0, SEED_MAX))
def test_a_seed_always_draws_the_same_variants(seed):
    template = "a {red|green|blue} {2$$ and $$cat|dog|fox} {1-3$$x|y|z}"
    assert image_prompt(template, seed) == image_prompt(template, seed)
    text = image_prompt(template, seed)
    assert text.split()[1] in ("red", "green", "blue") and " and " in text


def test_two_picks_are_two_different_options():
    for seed in range(50):
        picked = image_prompt("{2$$a|b|c}", seed).split(", ")
        assert len(picked) == 2 and len(set(picked)) == 2


def test_variants_differ_across_seeds():
    assert len({image_prompt("{a|b|c|d|e|f}", seed) for seed in range(40)}) == 6


def lists(found: dict[str, list[str]]):
    return lambda names: {n: found[n] for n in names if n in found}


def test_wildcards_are_filled_in_and_the_template_kept():
    found = {"colours": ["red", "{dark|light} blue", "__metal__"], "metal": ["gold", "silver"]}
    params = templated(GenerationParams("a __colours__ car", seed=3), lists(found), lambda: sorted(found))
    assert params.prompt_template is not None and "__" not in params.prompt_template
    assert params.prompt == image_prompt(params.prompt_template, 3)
    drawn = {params.image_prompt(seed) for seed in range(200)}
    assert drawn == {f"a {c} car" for c in ("red", "dark blue", "light blue", "gold", "silver")}
    plain_params = templated(GenerationParams(r"a \{b\} car", seed=3), lists({}), list)
    assert (plain_params.prompt, plain_params.prompt_template) == ("a {b} car", None)


def test_wildcard_refusals():
    with pytest.raises(BadInput, match="no wildcard list `nope`.*`__colours__`"):
        templated(GenerationParams("a __nope__", seed=1), lists({"colours": ["red"]}), lambda: ["colours"])
    with pytest.raises(BadInput, match="names itself"):
        templated(GenerationParams("a __a__", seed=1), lists({"a": ["x", "__b__"], "b": ["__a__"]}), list)
    with pytest.raises(BadInput, match="LoRA tag cannot be inside"):
        templated(GenerationParams("a {<lora:x:1>|y}", seed=1), lists({}), list)
    with pytest.raises(TemplateError, match="4 deep"):
        with_wildcards(parse("__w0__"), {f"w{i}": [f"__w{i + 1}__"] for i in range(10)})
    huge = {"big": [f"entry number {i} " * 5 for i in range(5000)]}
    with pytest.raises(BadInput, match="characters long"):
        templated(GenerationParams("__big__ __big__ __big__", seed=1), lists(huge), list)


def test_wildcard_files_and_names_are_checked():
    assert parse_lines(b"\xef\xbb\xbfred\n# a comment\n\n  blue  \r\ngreen") == ["red", "blue", "green"]
    with pytest.raises(WildcardError, match="KiB at most"):
        parse_lines(b"x\n" * (MAX_WILDCARD_BYTES // 2 + 1))
    with pytest.raises(WildcardError, match="UTF-8"):
        parse_lines(b"\xff\xfe\x00")
    with pytest.raises(WildcardError, match="no entries"):
        parse_lines(b"# only a comment\n")
    assert check_name("__colours__") == "colours"
    for bad in ("../etc", "a/b", "", "x" * 65, "bad name", "_x"):
        with pytest.raises(WildcardError, match="cannot name a wildcard"):
            check_name(bad)


def test_render_reads_back_as_the_same_choices():
    rng = random.Random(5)
    seq = parse(r"a {2$$ & $$x|y\|z|(w, v:1.2)} {1$$only} __q__")
    assert parse(render(seq)) == seq
    assert isinstance(rng, random.Random)


def test_a_reroll_draws_again_and_a_job_from_one_image_keeps_its_pick():
    from bot import jobs
    from db.models import Job
    from engine.params import job_columns

    params = templated(GenerationParams("a {red|blue|green|gold} fox", seed=3, count=4, chaos=30), lists({}), list)
    parent = Job(id=1, **job_columns(params))
    rerolled = jobs.reroll(parent).params
    assert rerolled.prompt_template == params.prompt_template and rerolled.chaos == 30
    assert rerolled.prompt == image_prompt(params.prompt_template, rerolled.seed)
    varied = jobs.variation(parent, 5, "subtle").params  # image 3 of the grid: its own pick, no chaos
    assert (varied.prompt, varied.prompt_template, varied.chaos) == (
        image_prompt(params.prompt_template, 5),
        None,
        None,
    )
    edited = jobs.edit(parent, "a {plain} fox", "").params
    assert (edited.prompt, edited.prompt_template) == ("a {plain} fox", None)
