"""What installing sdbot gives: declared dependencies, one lock of every version, console scripts.

The README's set-up installs with ``-c requirements.lock``, so two installs a month apart get the
same versions. These tests keep the three places that name versions (the code's imports,
``pyproject.toml``, ``requirements.lock``) and the environment the tests run in agreeing.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from processes import START_BUDGET

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "requirements.lock"
SCRIPTS = ("sdbot", "sdbot-worker", "sdbot-generate")
# Our packages, as pyproject.toml has setuptools find them ("bot*" -> bot).
PACKAGES = [pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them (``discord.py`` == ``discord-py``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    """``{"psycopg": "==3.3.9"}`` from ``["psycopg[binary]==3.3.9"]``: the name and its specifier."""
    parsed = (re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)", r.split(";")[0].strip()) for r in requirements)
    return {normalized(m[1]): m[2] for m in parsed}


def locked() -> dict[str, set[str]]:
    """Every name in the lock with its versions (one per environment marker)."""
    versions: dict[str, set[str]] = {}
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line):
            versions.setdefault(normalized(m[1]), set()).add(m[2])
    return versions


def runtime_requirements() -> dict[str, str]:
    return pins(PYPROJECT["project"]["dependencies"])


def test_requirements_are_pinned_exactly_as_the_lock_has_them():
    declared = {
        **runtime_requirements(),
        **pins(PYPROJECT["project"]["optional-dependencies"]["test"]),
    }
    lock = locked()
    for name, specifier in declared.items():
        assert specifier.startswith("==") and "*" not in specifier, f"{name}{specifier}: pin it exactly (==)"
        assert lock.get(name) == {specifier[2:]}, (
            f"{name}{specifier} but requirements.lock has {lock.get(name)}: refresh the lock (README)"
        )


def test_the_lock_keeps_torch_open_to_cpu_and_cuda_builds():
    """No local version such as ``2.13.0+cpu``: as a constraint ``torch==2.13.0`` lets pip take
    the CPU wheel where one is offered and PyPI's CUDA build (with its nvidia-* wheels) elsewhere."""
    local = {name: v for name, versions in locked().items() for v in versions if "+" in v}
    assert not local, f"requirements.lock pins local builds {local}: compile it against PyPI alone"
    assert locked()["torch"] == {"2.13.0"}


def test_this_environment_has_the_locked_versions():
    """The README's set-up installed every package at the lock's version (a local build such as
    torch's ``+cpu`` counts as its public version)."""
    lock = locked()
    wrong = {}
    for dist in metadata.distributions():
        name, version = normalized(dist.metadata["Name"]), dist.version.split("+")[0]
        if name in lock and version not in lock[name]:
            wrong[name] = f"{version} installed, {sorted(lock[name])} locked"
    assert not wrong, f"install with the README's set-up command (pip install -c requirements.lock): {wrong}"


def imported_modules(folders: list[str]) -> dict[str, str]:
    """Top-level modules imported anywhere in ``folders`` (in functions too) -> one file doing it."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def our_modules() -> set[str]:
    """Our packages, and the helper modules the tests and benchmarks import from their folders."""
    helpers = {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).glob("*.py")}
    return {*PACKAGES, "discord_emulator", "kdiffusion_ref", *helpers}


def undeclared(folders: list[str], declared: set[str]) -> dict[str, str]:
    providers = metadata.packages_distributions()
    missing = {}
    for module, where in imported_modules(folders).items():
        if module in sys.stdlib_module_names or module in our_modules():
            continue
        distributions = {normalized(d) for d in providers.get(module, [module])}
        if not distributions & declared:
            missing[module] = f"{where} (distribution {sorted(distributions)})"
    return missing


def optional_requirements(*, test: bool) -> set[str]:
    """The extras' packages: an optional feature's own (NudeNet's), and the test extra's when asked."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    return {name for extra, pinned in extras.items() if test or extra != "test" for name in pins(pinned)}


def test_every_package_the_code_imports_is_a_declared_dependency():
    missing = undeclared(PACKAGES, {*runtime_requirements(), *optional_requirements(test=False)})
    assert not missing, f"imported but not in [project] dependencies or an extra of pyproject.toml: {missing}"


def test_every_package_the_tests_and_benchmarks_import_is_declared():
    declared = {*runtime_requirements(), *optional_requirements(test=True)}
    missing = undeclared(["tests", "bench"], declared)
    assert not missing, f"imported but in neither the dependencies nor the test extra: {missing}"


def readme_command(title: str) -> str:
    """The shell block under the README's bold ``title`` in the Quick start."""
    block = re.search(rf"\*\*{re.escape(title)}\*\*.*?```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block, f"README.md has no **{title}** command"
    return block[1]


def test_the_readme_installs_from_the_lock_and_ci_runs_its_test_command():
    for title in ("Run the bot", "Run the tests"):
        assert "pip install -c requirements.lock " in readme_command(title), title
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_command("Run the tests") in ci, ".ci/run must run the README's test command unchanged"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_are_installed_and_answer_help(script):
    path = Path(sys.executable).parent / script
    assert path.exists(), f"{path} is missing: install the project (pip install -e .) as the README says"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=START_BUDGET)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "--config" in result.stdout


@pytest.mark.slow
def test_a_fresh_process_loads_the_model_classes_and_spandrel_with_the_installed_torchvision():
    """What a ``python -m bot`` or a worker imports, in an interpreter that never saw conftest:
    the installed torchvision may be a build of torch other than the installed one (PyPI's CUDA
    wheel beside the CPU-only torch here), and transformers and spandrel import it."""
    code = (
        "import engine.families.loading, engine.features.upscalers\n"
        "from transformers import CLIPTextModel\n"
        "engine.features.upscalers.torchvision_importable()\n"
        "import spandrel\n"
        "from spandrel.architectures.Compact import Compact\n"
        "print('loaded', spandrel.__version__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=START_BUDGET, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"loaded {metadata.version('spandrel')}"
