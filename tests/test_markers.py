"""Every test that starts a process is marked ``slow``, so ``pytest -m "not slow"`` is a quick loop.

Read from the tests' source: a test starts a process when it, or a function of its module that
it calls (directly or through others), names ``subprocess``, ``sys.executable``, ``BotProcess``
or another way of starting one.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Names whose use means a child process: the modules and helpers that start them.
SPAWNERS = {
    "subprocess",
    "Popen",
    "executable",
    "BotProcess",
    "start_logged",
    "multiprocessing",
    "fork",
    "create_subprocess_exec",
    "create_subprocess_shell",
}


def names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def is_slow_mark(node: ast.AST) -> bool:
    """``pytest.mark.slow``, also inside a list of marks."""
    return any(
        isinstance(n, ast.Attribute)
        and n.attr == "slow"
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "mark"
        for n in ast.walk(node)
    )


def process_starting_tests_not_marked_slow(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    module_slow = any(
        isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
        and is_slow_mark(node.value)
        for node in tree.body
    )
    functions = {
        node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    starts = {name for name, node in functions.items() if names_in(node) & SPAWNERS}
    while True:  # a function that calls one that starts a process starts one too
        more = {name for name, node in functions.items() if name not in starts and names_in(node) & starts}
        if not more:
            break
        starts |= more
    return [
        f"{path.name}::{name}"
        for name in sorted(starts)
        if name.startswith("test")
        and not module_slow
        and not any(is_slow_mark(d) for d in functions[name].decorator_list)
    ]


def test_every_test_that_starts_a_process_is_marked_slow():
    unmarked = [
        test for path in sorted(TESTS.glob("test_*.py")) for test in process_starting_tests_not_marked_slow(path)
    ]
    assert not unmarked, f"these tests start processes: mark them @pytest.mark.slow: {unmarked}"


def test_the_check_finds_a_test_that_starts_a_process_through_a_helper(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import subprocess, sys, pytest\n"
        "def run(): return subprocess.run([sys.executable, '-c', ''])\n"
        "def helper(): return run()\n"
        "def test_unmarked(): helper()\n"
        "@pytest.mark.slow\ndef test_marked(): run()\n"
        "def test_pure(): assert 1 + 1 == 2\n"
    )
    assert process_starting_tests_not_marked_slow(sample) == ["test_sample.py::test_unmarked"]
