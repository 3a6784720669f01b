"""The project's licence and its dependencies': every package of requirements.lock that is
installed here must be under a licence that allows our Apache-2.0, or be one of the exceptions
that NOTICE names and explains.

A package's licence is read from its installed metadata: the SPDX ``License-Expression`` where
it has one, else the ``License ::`` classifiers, else the old free-text ``License`` field.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Licences that allow use from Apache-2.0 code, as metadata spells them.
PERMISSIVE = re.compile(
    r"^(MIT|MIT-CMU|MIT License|The MIT License \(MIT\)|BSD|BSD-2-Clause|BSD-3-Clause|BSD License|0BSD|ISC|"
    r"ISC License|ISC License \(ISCL\)|Apache|Apache 2\.0|Apache-2\.0|Apache 2\.0 License|Apache Software License|"
    r"Apache-2\.0 WITH LLVM-exception|PSF-2\.0|Python Software Foundation License|Zlib|CC0-1\.0|BSL-1\.0|"
    r"CNRI-Python|3-Clause BSD License)$"
)
#: Not permissive, but allowed as NOTICE explains: the package, and the word NOTICE must say of it.
EXCEPTIONS = {
    "psycopg": "LGPL",
    "psycopg-binary": "LGPL",
    "certifi": "MPL",
    "tqdm": "MPL",
    "hypothesis": "MPL",
    "nudenet": "AGPL",  # the optional nudenet extra only
}
#: Packages whose metadata misstates the licence of their own LICENSE file: what that file says.
MISLABELLED = {"nudenet": "AGPL-3.0"}  # metadata: MIT


def _lock_names() -> list[str]:
    names = []
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==", line)
        if match:
            names.append(match[1].lower().replace("_", "-"))
    return sorted(set(names))


def _licences(dist: importlib.metadata.Distribution) -> list[str]:
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return [part.strip("() ") for part in re.split(r"\s+(?:AND|OR)\s+", expression)]
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    classifiers = [c for c in classifiers if c != "OSI Approved"]
    if classifiers:
        return classifiers
    text = (meta.get("License") or "").strip()
    if text.startswith("Copyright") and "Redistribution and use in source and binary forms" in text:
        return ["BSD-3-Clause" if "Neither the name" in text else "BSD-2-Clause"]  # scipy writes out its text
    return [text.splitlines()[0] if text else "(none stated)"]


def test_nudenets_licence_file_is_the_agpl_whatever_its_metadata_says():
    """Where the extra is installed, the reason it is only an extra is still true."""
    try:
        dist = importlib.metadata.distribution("nudenet")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the optional nudenet extra is not installed")
    licence = next(f for f in dist.files or [] if f.name in ("LICENSE", "LICENSE.md"))
    assert "GNU AFFERO GENERAL PUBLIC LICENSE" in licence.read_text()
    assert "nudenet" in _lock_names() and "NudeNet" in (ROOT / "NOTICE").read_text()


def test_the_project_is_apache_2():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert set(project["license-files"]) == {"LICENSE", "NOTICE"}


def test_every_installed_dependency_allows_it():
    notice = (ROOT / "NOTICE").read_text()
    checked, refused = [], []
    for name in _lock_names():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # another platform's (colorama on Windows, CUDA's on a GPU machine)
        checked.append(name)
        licences = [MISLABELLED[name]] if name in MISLABELLED else _licences(dist)
        if name in EXCEPTIONS:
            assert name in notice and EXCEPTIONS[name] in notice, f"NOTICE must explain {name} ({licences})"
            continue
        refused += [f"{name}: {lic}" for lic in licences if not PERMISSIVE.match(lic)]
    assert len(checked) > 50, checked  # the lock was read and the packages found
    assert not refused, "licences not known to allow Apache-2.0 (add them to NOTICE and EXCEPTIONS):\n" + "\n".join(
        refused
    )


@pytest.mark.parametrize("shipped", ["engine/data/bpe_simple_vocab_16e6.txt.gz", "tests/kdiffusion_ref/sampling.py"])
def test_notice_names_what_we_ship_from_others(shipped):
    assert (ROOT / shipped).exists()
    assert shipped in (ROOT / "NOTICE").read_text()
