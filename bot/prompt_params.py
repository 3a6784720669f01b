"""Midjourney's ``--parameters`` at the end of a prompt, read into the command's own options.

``/imagine a fox in snow --ar 16:9 --no trees, people --seed 7`` asks what the options
``size``, ``negative``, ``seed`` ask: :func:`read_prompt_params` takes the parameters off the
prompt and returns the :class:`~bot.policy.Asked` the options would have made, so one typed value
goes on from the boundary whichever way the member wrote it. Design choices:

- ``--ar W:H`` is kept as an aspect ratio (not a size) until the job's model is known: the size
  is its family's (:func:`aspect_size`, within the server's limits, on the model's grid).
- ``--no`` is added to the negative prompt (the option's, else the member's default), as
  Midjourney adds it to its own; so it may come with the ``negative`` option.
- ``--stylize``/``--s`` is refused, not mapped: it scales Midjourney's own aesthetic training,
  which a Stable Diffusion checkpoint does not have; the refusal points at ``--cfg``.
- ``--chaos N`` (0-100): the images of one job start from one seed's noise, each mixed with its
  own variation seed at strength N/100 (0: near copies, 100: unrelated images).
- A parameter given as an option too is refused, naming both, rather than one silently winning.

Macs and phones turn ``--`` into an em dash as one types; ``—ar`` is read as ``--ar``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from bot.inputs import BadInput
from bot.policy import Asked
from engine.params import SEED_MAX

#: ``--name`` (or ``—name``) after a space or at the start: where the parameters begin.
_PARAM = re.compile(r"(?:(?<=\s)|^)(?:--|\u2014)([A-Za-z][A-Za-z0-9_]*)")
#: The parameters we read, their aliases, and what each option is called.
ALIASES = {"ar": "ar", "aspect": "ar", "no": "no", "seed": "seed", "steps": "steps", "cfg": "cfg",
           "chaos": "chaos", "c": "chaos", "tile": "tile"}  # fmt: skip
KNOWN = ("--ar W:H", "--no a, b", "--seed N", "--steps N", "--cfg N", "--chaos 0-100", "--tile")
_OPTION_OF = {"ar": "size", "seed": "seed", "steps": "steps", "cfg": "guidance"}
#: Aspect ratios as far as 4:1 either way (Stable Diffusion models draw poorly beyond).
MAX_ASPECT = 4.0


def read_prompt_params(asked: Asked, *, max_steps: int, max_guidance: float) -> Asked:
    """``asked`` with the prompt's ``--parameters`` moved into its options; BadInput, saying what
    to write, for an unknown parameter, a bad value, or one also given as an option."""
    found = list(_PARAM.finditer(asked.prompt))
    if not found:
        return asked
    prompt = asked.prompt[: found[0].start()].rstrip()
    if not prompt:
        raise BadInput("The prompt is empty before its `--parameters`: write what to draw first.")
    given: dict[str, str] = {}
    for n, match in enumerate(found):
        written = match.group(1)
        name = ALIASES.get(written.lower())
        if name is None:
            stylize = written.lower() in ("s", "stylize")
            if stylize:
                raise BadInput(
                    "`--stylize` scales Midjourney's own style, which these models do not have: "
                    "use `--cfg N` (how closely to follow the prompt) instead."
                )
            raise BadInput(f"`--{written[:20]}` is not a parameter here; these are: {', '.join(KNOWN)}.")
        if name in given:
            raise BadInput(f"`--{name}` is given twice; keep one.")
        end = found[n + 1].start() if n + 1 < len(found) else len(asked.prompt)
        given[name] = asked.prompt[match.end() : end].strip()
    changes: dict = {"prompt": prompt}
    for name, value in given.items():
        option = _OPTION_OF.get(name)
        if option is not None and getattr(asked, option) is not None:
            raise BadInput(f"`{option}` is given twice, as an option and as `--{name}` in the prompt: keep one.")
        changes |= _value(name, value, max_steps=max_steps, max_guidance=max_guidance)
    return replace(asked, **changes)


def _value(name: str, value: str, *, max_steps: int, max_guidance: float) -> dict:
    if name == "tile":
        if value:
            raise BadInput("`--tile` takes no value: put the prompt's words before the `--parameters`.")
        return {"tile": True}
    if not value:
        raise BadInput(f"`--{name}` needs a value, e.g. {_example(name)}.")
    if name == "no":
        words = ", ".join(w.strip() for w in value.split(",") if w.strip())
        return {"no": words}
    if name == "ar":
        return {"aspect": _aspect(value)}
    if name == "cfg":
        number = _number(value, name, float)
        if not 0 <= number <= max_guidance:
            raise BadInput(f"`--cfg` must be from 0 to {max_guidance:g} (you gave {value[:12]}).")
        return {"guidance": number}
    low, high, option = {"seed": (0, SEED_MAX, "seed"), "steps": (1, max_steps, "steps"), "chaos": (0, 100, "chaos")}[
        name
    ]
    number = _number(value, name, int)
    if not low <= number <= high:
        raise BadInput(f"`--{name}` must be a whole number from {low} to {high} (you gave {value[:24]}).")
    return {option: number}


def _example(name: str) -> str:
    return {"ar": "`--ar 16:9`", "no": "`--no trees, people`", "seed": "`--seed 7`", "steps": "`--steps 30`",
            "cfg": "`--cfg 6.5`", "chaos": "`--chaos 40`"}[name]  # fmt: skip


def _number(value: str, name: str, kind: type) -> float:
    text = value.split()[0] if value.split() else value
    if len(value.split()) > 1:
        raise BadInput(f"`--{name}` takes one value ({_example(name)}): put the prompt's words before the parameters.")
    try:
        number = float(text) if kind is float else int(text)
    except ValueError:
        raise BadInput(f"`--{name}` needs a number, e.g. {_example(name)} (you gave {text[:24]}).") from None
    if not math.isfinite(number):
        raise BadInput(f"`--{name}` needs a number, e.g. {_example(name)}.")
    return number


def _aspect(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,4})\s*:\s*(\d{1,4})", value)
    if match is None:
        raise BadInput(
            f"`--ar` takes a ratio of whole numbers such as `--ar 16:9` or `--ar 2:3` (you gave {value[:24]})."
        )
    width, height = int(match.group(1)), int(match.group(2))
    if width == 0 or height == 0 or max(width / height, height / width) > MAX_ASPECT:
        raise BadInput(f"`--ar` must be between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1 (you gave {width}:{height}).")
    return width, height


def prompt_help() -> str:
    """/help's line on what a prompt may hold besides words, each with an example (README: more)."""
    return (
        "`--ar 16:9 --no a --seed --steps --cfg --chaos --tile` · `{a, b}`: a job each · "
        "`{a|b}`: one per image · `__list__`: a list's line"
    )
