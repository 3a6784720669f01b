"""The bot's shape: registered commands within Discord's limits, commands synced only when they
changed, the layering of the packages, and bugs found in review (each test fails on the old code)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from bot_harness import bot_config, bot_running, help_embeds, new_queue, png
from discord_emulator import Emulator
from discord_emulator.fixtures import emulator  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "db", "engine", "ops")
#: Discord's OpenAPI spec: integer option bounds are safe JavaScript integers.
INT_LIMIT = 2**53 - 1


@pytest.fixture
def setup(tmp_path, emulator: Emulator):
    config = bot_config("unused-model", f"sqlite:///{tmp_path}/bot.sqlite3", emulator.guild.id)
    engine, queue = new_queue(tmp_path / "bot.sqlite3", config)
    yield emulator, config, queue
    engine.dispose()


# -- commands as Discord sees them -----------------------------------------------------------------


def option_problems(option: dict, where: str) -> list[str]:
    problems = []
    for key in ("min_value", "max_value"):
        if key in option and not -INT_LIMIT <= option[key] <= INT_LIMIT:
            problems.append(f"{where}.{key} = {option[key]} is outside ±(2^53 - 1)")
    if "max_length" in option and not 1 <= option["max_length"] <= 6000:
        problems.append(f"{where}.max_length = {option['max_length']}")
    for choice in option.get("choices") or []:
        if not 1 <= len(choice["name"]) <= 100 or len(str(choice["value"])) > 100:
            problems.append(f"{where}: choice {choice['name']!r}")
    for sub in option.get("options") or []:
        problems += option_problems(sub, f"{where} {sub['name']}")
    return problems


def characters(spec: dict) -> int:
    """Discord counts names, descriptions and choice values of a command together (at most 4000)."""
    total = len(spec.get("name", "")) + len(spec.get("description", ""))
    for choice in spec.get("choices") or []:
        total += len(choice["name"]) + len(str(choice["value"]))
    return total + sum(characters(o) for o in spec.get("options") or [])


@pytest.mark.asyncio
async def test_every_registered_command_is_within_discords_limits(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        registered = [c for commands in emu.commands.values() for c in commands]
    assert len(registered) >= 10
    problems = []
    for command in registered:
        problems += option_problems(command, "/" + command["name"])
        if characters(command) > 4000:
            problems.append(f"/{command['name']}: {characters(command)} characters")
    assert problems == []


@pytest.mark.asyncio
async def test_commands_are_synced_only_when_they_change_and_stale_global_ones_are_cleared(setup):
    emu, config, queue = setup
    emu.commands[None] = [{"name": "old", "description": "left by an earlier run", "id": "1"}]

    def puts() -> int:
        return sum(1 for call in emu.calls if call.method == "PUT" and call.path.endswith("/commands"))

    async with bot_running(emu, config, queue, None):
        first = puts()
    assert first == 2 and emu.commands[None] == []  # the server's commands, and the global ones cleared
    async with bot_running(emu, config, queue, None):
        pass
    assert puts() == first  # nothing changed: nothing sent
    async with bot_running(emu, config, queue, None, force_sync=True):
        pass
    assert puts() == first + 2
    from dataclasses import replace

    changed = replace(config, generation=replace(config.generation, max_steps=6))
    async with bot_running(emu, changed, queue, None):
        pass
    assert puts() == first + 3  # only the server's commands changed
    steps = next(o for o in emu.command("imagine")["options"] if o["name"] == "steps")
    assert steps["max_value"] == 6


@pytest.mark.asyncio
async def test_help_says_each_range_once_with_every_digit(setup):
    emu, config, queue = setup
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "help")
        embeds = await help_embeds(emu, ix)
        first = ix.messages[0]
    text = "\n".join(e["description"] for e in embeds)
    seed_line = next(line for line in text.splitlines() if "`seed`" in line)
    assert "4294967295" in seed_line and "e+09" not in text
    steps_line = next(line for line in text.splitlines() if "`steps`" in line)
    assert steps_line.count("1 to 8") == 1 and text.count("1 to 8") == 1
    assert text.rstrip().endswith("jobs waiting at a time.")  # nothing was cut to fit the embeds
    assert first.embeds[0]["title"] and all(not e.get("title") for m in ix.messages[1:] for e in m.embeds)
    for message in ix.messages:  # every message within Discord's limits; what did not fit follows
        assert all(len(e["description"]) <= 4096 for e in message.embeds)
        assert sum(len(e["description"]) + len(e.get("title") or "") for e in message.embeds) <= 6000


# -- bugs at the boundary ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_img2img_keeps_within_the_servers_size_limit(setup):
    """The upload's own shape was never checked against /server limits max_size."""
    from db.community import Community

    emu, config, queue = setup
    Community(queue.engine).update_server(emu.guild.id, emu.alice.id, max_width=64, max_height=64)
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(
            emu.alice,
            "img2img",
            {"prompt": "a cat"},
            attachments={"image": emu.attachment("big.png", png((128, 128)), "image/png")},
        )
        await ix.wait_response(lambda m: "queued" in m.content)
        ix = await emu.slash(
            emu.alice,
            "img2img",
            {"prompt": "a cat", "size": "128x64"},
            attachments={"image": emu.attachment("big.png", png((128, 128)), "image/png")},
        )
        refused = await ix.wait_response(lambda m: m.ephemeral)
    (job,) = queue.pending_for(emu.alice.id)
    assert job.width <= 64 and job.height <= 64
    assert "up to 64x64" in refused.content


@pytest.mark.asyncio
async def test_info_names_the_jobs_own_model(setup):
    from dataclasses import replace

    from engine.config.settings import ModelSettings

    emu, config, queue = setup
    config = replace(config, models=(ModelSettings(source="elsewhere", name="anime"),))
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox", "model": "anime"})
        await ix.wait_response(lambda m: "queued" in m.content)
        (job,) = queue.pending_for(emu.alice.id)
        info = await (await emu.slash(emu.alice, "info", {"job": job.id})).wait_response(lambda m: m.ephemeral)
    assert "**Model:** anime" in info.content


@pytest.mark.asyncio
async def test_upscale_resizes_off_the_event_loop(setup, monkeypatch):
    import bot.jobs

    emu, config, queue = setup
    threads = []
    real = bot.jobs.upscale

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(bot.jobs, "upscale", recording)
    async with bot_running(emu, config, queue, None):
        ix = await emu.slash(emu.alice, "imagine", {"prompt": "a fox"})
        await ix.wait_response(lambda m: "queued" in m.content)
        job = queue.claim("remote-gpu")
        assert queue.complete(job.id, "remote-gpu", [(png((64, 64)), job.seed)])
        creative = f"sd:up:{job.id}:0:creative"
        result = await emu.wait_for_message(emu.general, lambda m: creative in m.custom_ids, timeout=60)
        loop_thread = threading.current_thread()
        press = await emu.click(emu.bob, result, creative)
        await press.wait_response(lambda m: "queued" in m.content)
    assert threads and all(t is not loop_thread for t in threads)
    assert [j.kind.value for j in queue.pending_for(emu.bob.id)] == ["upscale"]


# -- layering ------------------------------------------------------------------------------------


def imports_of(path: Path, *, types: bool = False) -> set[str]:
    """Modules ``path`` imports at run time (``types``: also those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if not types and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_graph(packages: tuple[str, ...] = PACKAGES, *, types: bool = False) -> dict[str, set[str]]:
    modules = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return {name: {m for m in imports_of(path, types=types) if m in modules} for name, path in modules.items()}


def test_packages_keep_their_layers_and_the_client_is_imported_only_by_the_wiring():
    graph = module_graph()
    for module, deps in graph.items():
        if module.startswith("db"):
            assert not {d for d in deps if d.split(".")[0] in ("bot", "engine", "ops")}, module
        if module.startswith("engine"):
            assert not {d for d in deps if d.split(".")[0] in ("bot",)}, module
        if module.startswith("ops"):
            assert not {d for d in deps if d.split(".")[0] in ("bot", "engine")}, module
        if module.startswith("bot") and module not in ("bot.wiring", "bot.client"):
            assert "bot.client" not in deps, f"{module} imports the client"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert find_cycles(module_graph()) == []


def test_no_import_cycles_even_for_types_and_delivery_and_buttons_take_narrow_protocols():
    """Not even ``if TYPE_CHECKING:`` closes a circle in bot, db and ops: delivery types its
    client as ``bot.delivery.ports.DiscordClient``, the buttons their service as
    ``bot.reach.ButtonService`` (engine's own type-only imports are the engine's refactor's)."""
    graph = module_graph(("bot", "db", "ops"), types=True)
    assert find_cycles(graph) == []
    for module, deps in graph.items():
        if module.startswith("bot.delivery"):
            assert not {d for d in deps if d in ("bot.client", "bot.service", "bot.wiring")}, module
    sources = "\n".join(p.read_text() for p in (ROOT / "bot").rglob("*.py"))
    assert "client.service  # type: ignore" not in sources
    assert "class JobEvents" not in sources


def test_modules_stay_small():
    too_long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 450
    }
    assert too_long == {}


def test_the_run_loop_of_the_tests_is_the_production_wiring():
    """tests/bot_harness builds the bot with bot.wiring.build_bot, as python -m bot does."""
    harness = (ROOT / "tests" / "bot_harness.py").read_text()
    main = (ROOT / "bot" / "__main__.py").read_text()
    assert "build_bot(" in harness and "build_bot(" in main and "SDBot(" not in harness + main


# -- a bot without an engine -----------------------------------------------------------------------

NO_ENGINE = r"""
import asyncio, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from bot_harness import bot_config, bot_running, new_queue
from discord_emulator import Emulator, patch_discord
from pathlib import Path

async def main():
    async with Emulator() as emu:
        with patch_discord(emu):
            config = bot_config("unused-model", f"sqlite:///{sys.argv[2]}/bot.sqlite3", emu.guild.id)
            engine, queue = new_queue(Path(sys.argv[2]) / "bot.sqlite3", config)
            async with bot_running(emu, config, queue, None):
                ix = await emu.slash(emu.alice, "imagine", {"prompt": "a (red:1.2) fox <lora:x:0.5> BREAK snow"})
                await ix.wait_response()
                ix = await emu.slash(emu.alice, "imagine", {"prompt": "(a:1.2.3)"})
                print("REFUSAL", (await ix.wait_response(lambda m: m.ephemeral)).content)
            loaded = sorted(m for m in ("torch", "diffusers") if m in sys.modules)
            print("LOADED", loaded)
            import resource
            print("RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_bot_without_an_engine_never_imports_torch_or_diffusers(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "no_engine.py"
    script.write_text(NO_ENGINE)
    out = subprocess.run(
        [sys.executable, str(script), str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout
    assert "REFUSAL" in out.stdout and "1.2.3" in out.stdout
