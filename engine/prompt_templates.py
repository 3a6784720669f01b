"""Braces in a prompt: Midjourney's permutations and Dynamic Prompts' variants and wildcards.

Torch-free: the bot expands and checks a prompt at the Discord boundary with this module, and
the engine draws each image's variants with the same functions, so both read a prompt alike.

- ``{red, blue, green}`` (commas, Midjourney's permutations): one job per choice. Several groups
  and nested groups multiply; :func:`permutations` lists the jobs' prompts.
- ``{red|blue|green}`` (a ``|`` at the group's top level, Dynamic Prompts' variants): one choice
  per image, drawn by :func:`choose` from a generator seeded with the image's seed, so the same
  seed gives the same choice. ``{2$$a|b|c}`` picks two (different ones), ``{1-3$$a|b|c}`` one to
  three, ``{2$$ and $$a|b|c}`` joins them with `` and `` instead of ``, ``.
- ``__name__``: a line of the wildcard list ``name``, inlined by :func:`with_wildcards` as a
  variant group of its lines (lines may hold variants and wildcards of their own).
- ``\\{`` ``\\}`` ``\\|`` ``\\,`` ``\\_`` write the character itself; every other backslash is
  left for AUTOMATIC1111's emphasis syntax (``\\(``) to read.

Separators split a group only outside AUTOMATIC1111's ``( )``, ``[ ]`` and ``< >``, so
``{(red, shiny:1.2)|blue}`` and ``{<lora:a:0.5>|<lora:b:0.5>}`` keep their emphasis and tags, and
``[cat|dog]`` (A1111's alternation) is not a variant group. Design choice: a group is a variant
group when a ``|`` (or a ``N$$`` count) is at its top level, else a permutation group, as a
member who knows one tool writes it.

Everything is bounded: nesting (:data:`MAX_DEPTH`), the number of jobs (counted without listing
them), wildcard depth and cycles, and the template's length, each refused in a sentence that says
what to write instead (:class:`TemplateError`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

#: Braces nested deeper than this are refused (a prompt is read recursively).
MAX_DEPTH = 8
#: Wildcards naming wildcards: at most this deep (a list that names itself is refused at once).
MAX_WILDCARD_DEPTH = 4
#: The longest template (wildcards inlined) a job keeps; a wildcard list's lines count in full.
MAX_TEMPLATE_CHARS = 200_000
#: A wildcard list's name: letters, digits, ``_`` and ``-`` (no folders), as LoRA names are checked.
WILDCARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
_WILDCARD = re.compile(r"__([A-Za-z0-9][A-Za-z0-9_\-]{0,63}?)__")
_COUNT = re.compile(r"(\d{1,3})(?:-(\d{1,3}))?\$\$(?:([^$|{}]{0,20})\$\$)?")
_ESCAPED = frozenset("{}|,_")
_OPEN, _CLOSE = "([<", ")]>"


class TemplateError(ValueError):
    """A prompt's braces cannot be read; the message says what to write instead."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Group:
    """``{...}``: ``options`` to choose from; ``variant`` (``|``) picks per image, else one job each."""

    options: tuple[tuple[Node, ...], ...]
    variant: bool
    low: int = 1
    high: int = 1
    joiner: str = ", "


@dataclass(frozen=True)
class Wildcard:
    name: str


Node = Text | Group | Wildcard
Seq = tuple[Node, ...]


# ---------------------------------------------------------------------------- reading


def parse(text: str) -> Seq:
    """A prompt's pieces; TemplateError for a brace that does not close or nesting too deep."""
    if not any(c in text for c in "{}\\") and "__" not in text:
        return (Text(text),) if text else ()
    seq, end = _sequence(text, 0, 0, None)
    if end < len(text):  # only a stray "}" stops the top level
        raise TemplateError("A `}` closes no `{`: remove it, or write `\\}` for the character itself.")
    return seq


def _sequence(text: str, i: int, depth: int, separator: str | None) -> tuple[Seq, int]:
    """Read from ``i`` up to ``}`` or a top-level ``separator`` (within a group), or the end."""
    nodes: list[Node] = []
    plain: list[str] = []
    brackets = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPED:
            plain.append(text[i + 1])
            i += 2
            continue
        if c == "\\" and i + 1 < len(text):  # A1111's escape: kept as it is, and no bracket
            plain.append(text[i : i + 2])
            i += 2
            continue
        if c == "}":
            break
        if separator is not None and c == separator and brackets == 0:
            break
        if c == "{":
            if plain:
                nodes.append(Text("".join(plain)))
                plain = []
            group, i = _group(text, i, depth + 1)
            nodes.append(group)
            continue
        if c == "_" and text.startswith("__", i):
            match = _WILDCARD.match(text, i)
            if match is not None:
                if plain:
                    nodes.append(Text("".join(plain)))
                    plain = []
                nodes.append(Wildcard(match.group(1)))
                i = match.end()
                continue
        if c in _OPEN:
            brackets += 1
        elif c in _CLOSE and brackets > 0:
            brackets -= 1
        plain.append(c)
        i += 1
    if plain:
        nodes.append(Text("".join(plain)))
    return tuple(nodes), i


def _group(text: str, start: int, depth: int) -> tuple[Group, int]:
    if depth > MAX_DEPTH:
        raise TemplateError(f"Braces `{{...}}` may nest {MAX_DEPTH} deep at most; flatten the prompt.")
    i = start + 1
    low = high = 1
    joiner = ", "
    counted = _COUNT.match(text, i)
    if counted is not None:
        low = int(counted.group(1))
        high = int(counted.group(2) or low)
        if high < low:
            raise TemplateError(f"`{{{counted.group(0)}...}}`: write the smaller count first, e.g. `{{1-2$$a|b|c}}`.")
        joiner = counted.group(3) if counted.group(3) is not None else joiner
        i = counted.end()
    variant = counted is not None or _top_level_pipe(text, i)
    separator = "|" if variant else ","
    options: list[Seq] = []
    while True:
        option, i = _sequence(text, i, depth, separator)
        options.append(option)
        if i >= len(text):
            raise TemplateError("A `{` is never closed: add its `}`, or write `\\{` for the character itself.")
        if text[i] == "}":
            return Group(tuple(_trimmed(o) for o in options), variant, low, high, joiner), i + 1
        i += 1  # the separator


def _top_level_pipe(text: str, i: int) -> bool:
    """Whether the group from ``i`` has a ``|`` outside nested braces and A1111's brackets."""
    braces = brackets = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            braces += 1
        elif c == "}":
            if braces == 0:
                return False
            braces -= 1
        elif c in _OPEN:
            brackets += 1
        elif c in _CLOSE and brackets > 0:
            brackets -= 1
        elif c == "|" and braces == 0 and brackets == 0:
            return True
        i += 1
    return False


def _trimmed(option: Seq) -> Seq:
    """An option without the spaces around its separators (``{red, blue}`` -> ``red``, ``blue``)."""
    if not option:
        return option
    nodes = list(option)
    if isinstance(nodes[0], Text):
        nodes[0] = Text(nodes[0].text.lstrip())
    if isinstance(nodes[-1], Text):
        nodes[-1] = Text(nodes[-1].text.rstrip())
    return tuple(n for n in nodes if not (isinstance(n, Text) and not n.text))


# ---------------------------------------------------------------------------- permutations


def count_jobs(seq: Seq, cap: int) -> int:
    """How many jobs the permutation groups make, counted without listing them; stops above ``cap``."""
    total = 1
    for node in seq:
        if isinstance(node, Group):
            counts = [count_jobs(option, cap) for option in node.options]
            n = 1
            if node.variant:  # each option's permutations, independently, within one job's choices
                for c in counts:
                    n = min(n * c, cap + 1)
            else:
                n = min(sum(counts), cap + 1)
            total = min(total * n, cap + 1)
    return total


def permutations(seq: Seq) -> list[Seq]:
    """One template per job: each permutation group replaced by one of its options, in order
    (``a {red, blue} {car, bus}``: red car, red bus, blue car, blue bus). Call :func:`count_jobs`
    first: this lists them all."""
    results: list[list[Node]] = [[]]
    for node in seq:
        if isinstance(node, Group) and not node.variant:
            choices = [p for option in node.options for p in permutations(option)]
            results = [[*done, *choice] for done in results for choice in choices]
        elif isinstance(node, Group):
            option_lists = [permutations(option) for option in node.options]
            groups: list[list[Seq]] = [[]]
            for listed in option_lists:
                groups = [[*g, o] for g in groups for o in listed]
            variants = [Group(tuple(g), True, node.low, node.high, node.joiner) for g in groups]
            results = [[*done, v] for done in results for v in variants]
        else:
            results = [[*done, node] for done in results]
    return [tuple(r) for r in results]


# ---------------------------------------------------------------------------- wildcards


def wildcard_names(seq: Seq) -> set[str]:
    names: set[str] = set()
    for node in seq:
        if isinstance(node, Wildcard):
            names.add(node.name)
        elif isinstance(node, Group):
            for option in node.options:
                names |= wildcard_names(option)
    return names


def with_wildcards(seq: Seq, lists: dict[str, list[str]], _stack: tuple[str, ...] = ()) -> Seq:
    """``seq`` with every ``__name__`` replaced by a variant group of the list's lines (each line
    read as a template). TemplateError for a list not in ``lists``, one that names itself, or too deep."""
    out: list[Node] = []
    for node in seq:
        if isinstance(node, Wildcard):
            if node.name in _stack:
                path = " → ".join(f"__{n}__" for n in (*_stack, node.name))
                raise TemplateError(f"The wildcard list `{node.name}` names itself ({path}); edit the list.")
            if len(_stack) >= MAX_WILDCARD_DEPTH:
                raise TemplateError(f"Wildcards may name other wildcards {MAX_WILDCARD_DEPTH} deep at most.")
            lines = lists.get(node.name)
            if lines is None:
                raise TemplateError(f"unknown wildcard:{node.name}")  # the caller names the lists there are
            options = tuple(with_wildcards(parse(line), lists, (*_stack, node.name)) for line in lines)
            out.append(Group(options, True))
        elif isinstance(node, Group):
            options = tuple(with_wildcards(option, lists, _stack) for option in node.options)
            out.append(Group(options, node.variant, node.low, node.high, node.joiner))
        else:
            out.append(node)
    return tuple(out)


# ---------------------------------------------------------------------------- writing and drawing


def has_variants(seq: Seq) -> bool:
    return any(isinstance(n, Group | Wildcard) for n in seq)


def render(seq: Seq) -> str:
    """The template as text again (what a job keeps), escaped so that :func:`parse` reads it back."""
    parts = []
    for node in seq:
        if isinstance(node, Text):
            parts.append(escape(node.text))
        elif isinstance(node, Wildcard):
            parts.append(f"__{node.name}__")
        else:
            count = "" if (node.low, node.high, node.joiner) == (1, 1, ", ") else _count_text(node)
            separator = "|" if node.variant else ", "
            if node.variant and len(node.options) == 1 and not count:
                count = "1$$"  # one option: still a variant group when read back
            parts.append("{" + count + separator.join(render(option) for option in node.options) + "}")
    return "".join(parts)


def _count_text(group: Group) -> str:
    span = str(group.low) if group.low == group.high else f"{group.low}-{group.high}"
    return f"{span}$$" + (f"{group.joiner}$$" if group.joiner != ", " else "")


def escape(text: str) -> str:
    """``text`` as a template that reads back as itself (its braces, bars and ``__`` literal)."""
    for c in "{}|":
        text = text.replace(c, "\\" + c)
    return text.replace("__", "\\_\\_")


def choose(seq: Seq, rng: random.Random) -> str:
    """The text of one image: each variant group's pick from ``rng``, in reading order."""
    parts = []
    for node in seq:
        if isinstance(node, Text):
            parts.append(node.text)
        elif isinstance(node, Group):
            parts.append(_pick(node, rng))
        else:
            raise TemplateError(f"The wildcard `__{node.name}__` was not filled in.")
    return "".join(parts)


def _pick(group: Group, rng: random.Random) -> str:
    if not group.variant:  # a permutation group left in: the first choice (callers expand them)
        return choose(group.options[0], rng) if group.options else ""
    n = len(group.options)
    k = min(n, group.low if group.low == group.high else group.low + rng.randrange(group.high - group.low + 1))
    order = list(range(n))
    for j in range(k):  # a partial Fisher-Yates shuffle: k different options
        swap = j + rng.randrange(n - j)
        order[j], order[swap] = order[swap], order[j]
    return group.joiner.join(choose(group.options[i], rng) for i in order[:k])


def image_prompt(template: str, seed: int) -> str:
    """The prompt of the image made with ``seed``: the template's variants drawn from a generator
    seeded with it (the same seed, the same text, alone or in any batch)."""
    return choose(parse(template), random.Random(seed))


def plain(seq: Seq) -> str:
    """A template without variants as the prompt's text (escapes resolved)."""
    return choose(seq, random.Random(0))
