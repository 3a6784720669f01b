"""A member's prompt read at the boundary: permutations into jobs, templates into a job's prompt.

:mod:`engine.prompt_templates` reads the braces; this module turns what it finds into what the
bot queues, and its errors into :class:`~bot.inputs.BadInput`:

1. :func:`permuted` lists one prompt per job for Midjourney's ``{a, b}`` permutations (bounded by
   :data:`MAX_PERMUTATIONS`; Dynamic Prompts' ``{a|b}`` groups stay in each job's prompt);
2. :func:`templated` fills a job's wildcards from the server's lists and, when variants remain,
   keeps the template on the job (``prompt_template``) and draws the first image's prompt, so
   the engine draws each image's with its seed and a reroll draws again. Its prompts are checked
   image by image (token chunks, LoRA names) as a plain prompt is.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from bot.inputs import BadInput
from engine.params import GenerationParams
from engine.prompt_templates import (
    MAX_TEMPLATE_CHARS,
    Group,
    Seq,
    TemplateError,
    choose,
    count_jobs,
    has_variants,
    parse,
    permutations,
    plain,
    render,
    wildcard_names,
    with_wildcards,
)

#: The most jobs one prompt's permutations may make (Midjourney's own limit is 40 too); over the
#: server's images-per-job limit the member confirms first (bot.permutations).
MAX_PERMUTATIONS = 40


def _read(prompt: str) -> Seq:
    try:
        return parse(prompt)
    except TemplateError as e:
        raise BadInput(str(e)) from None


def permuted(prompt: str) -> list[str]:
    """The prompt of each job ``prompt``'s permutations make (one: itself), in order."""
    seq = _read(prompt)
    count = count_jobs(seq, MAX_PERMUTATIONS)
    if count > MAX_PERMUTATIONS:
        raise BadInput(
            f"This prompt's `{{a, b}}` permutations make more than {MAX_PERMUTATIONS} jobs; "
            "use fewer choices, or `{a|b}` to pick one per image instead."
        )
    if count == 1 and not any(isinstance(node, Group) and not node.variant for node in seq):
        return [prompt]
    return [render(p) for p in permutations(seq)]


def templated(
    params: GenerationParams,
    lists: Callable[[Iterable[str]], dict[str, list[str]]],
    known: Callable[[], list[str]],
) -> GenerationParams:
    """``params`` with its prompt's wildcards filled in and its variants drawn for the first image
    (the template kept for the others); BadInput for a wildcard the server does not have, a list
    that names itself, or a template too long. ``lists``: the server's lists by name (read once
    for all the names a prompt uses, and again for those its lists name)."""
    seq = _read(params.prompt)
    if not has_variants(seq):
        return params.but(prompt=plain(seq), prompt_template=None)
    seq = _filled(seq, lists, known)
    if not has_variants(seq):
        return params.but(prompt=plain(seq), prompt_template=None)
    template = render(seq)
    if len(template) > MAX_TEMPLATE_CHARS:
        raise BadInput(
            f"With its wildcards filled in this prompt is {len(template):,} characters long, over "
            f"{MAX_TEMPLATE_CHARS:,}: use fewer or shorter lists."
        )
    if _lora_in_variant(seq):
        raise BadInput(
            "A LoRA tag cannot be inside `{a|b}` or a wildcard: a job applies one set of LoRAs to all "
            "its images. Use a permutation `{<lora:a:0.8>, <lora:b:0.8>}` to make a job for each."
        )
    return params.but(prompt=choose(seq, random.Random(params.seed)), prompt_template=template)


def _filled(seq: Seq, lists: Callable[[Iterable[str]], dict[str, list[str]]], known: Callable[[], list[str]]) -> Seq:
    found: dict[str, list[str]] = {}
    wanted = wildcard_names(seq)
    for _ in range(8):  # lists naming lists: read level by level (the template module bounds the depth)
        missing = wanted - set(found)
        if not missing:
            break
        found |= lists(missing)
        unknown = missing - set(found)
        if unknown:
            name = sorted(unknown)[0]
            names = known()
            listed = ", ".join(f"`__{n}__`" for n in names[:25]) or "none yet (`/server wildcards add`)"
            raise BadInput(f"This server has no wildcard list `{name}`; its lists: {listed}.")
        wanted = set().union(*(wildcard_names(_read(line)) for name in missing for line in found[name]))
    try:
        return with_wildcards(seq, found)
    except TemplateError as e:
        raise BadInput(str(e)) from None


def _lora_in_variant(seq: Seq) -> bool:
    return any(isinstance(node, Group) and "<lora:" in render((node,)).lower() for node in seq)


def image_prompts(params: GenerationParams) -> list[str]:
    """Each image's prompt (the first ``count`` seeds' picks), for the checks a prompt passes."""
    if params.prompt_template is None:
        return [params.prompt]
    return [params.image_prompt(params.seed + i) for i in range(params.count)]
