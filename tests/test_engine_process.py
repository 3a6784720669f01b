"""The bot's end of its engine process (bot/engine_process.py), against a stand-in child that
speaks the link's protocol (engine/serving/bot_link.py): no torch, no model, a second each."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from bot.engine_process import EngineProcess, EngineStartError
from engine.types import Progress

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # each starts a (small) child process

BUDGET = 120  # s for anything this waits on

CHILD = """
import base64, json, os, sys
out = os.fdopen(int(sys.argv[sys.argv.index("--bot-link") + 1]), "w", buffering=1)
def send(message):
    out.write(json.dumps(message) + "\\n")
if sys.argv[1] == "fail":
    print("error: model.safetensors: no such file", file=sys.stderr)
    sys.exit(3)
send({"ready": "sdxl"})
send({"progress": [7, 1, 4], "preview": base64.b64encode(b"PNG").decode()})
send({"rows": 3, "gpu": {"cuda:0": [10, 20]}, "graphs": {"unet": [2, 1], "sampler": [3, 0]}})
for line in sys.stdin:  # what the bot says, answered so that the test sees it arrived
    command, _, argument = line.strip().partition(" ")
    if command == "cancel":
        send({"finished": int(argument)})
    elif command == "wake":
        send({"rows": 5, "gpu": {}})
    elif command == "exit":
        sys.exit(0)
sys.exit(4)  # end of input: the bot is gone
"""


@pytest.fixture
def child(tmp_path: Path) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script)]


async def until(condition, what: str) -> None:
    async with asyncio.timeout(BUDGET):
        while not condition():
            await asyncio.sleep(0.01)


async def test_reports_come_back_and_commands_reach_the_child(child, tmp_path):
    engine = EngineProcess(tmp_path / "config.toml", command=[*child, "serve"])
    progress: list[Progress] = []
    finished: list[int] = []
    engine.on_progress = lambda job_id, p: progress.append(p)
    engine.on_finished = finished.append
    assert await engine.start() == "sdxl"  # the default model's family
    running = asyncio.create_task(engine.run())
    try:
        await until(lambda: engine.batch_rows == 3, "the stats line")
        assert progress == [Progress(7, 1, 4, b"PNG")] and engine.gpu_memory == {"cuda:0": (10, 20)}
        assert engine.graphs == {"unet": (2, 1), "sampler": (3, 0)}
        engine.cancel(12)
        await until(lambda: finished == [12], "the cancel to reach the child")
        engine.wake()
        await until(lambda: engine.batch_rows == 5, "the wake-up to reach the child")
        engine._tell("exit")  # it exits by itself (a crash, the OOM killer): run() says so, to be restarted
        with pytest.raises(RuntimeError, match="exited with status 0"):
            await asyncio.wait_for(running, BUDGET)
    finally:
        running.cancel()
        await engine.stop()


async def test_a_child_that_exits_while_the_bot_stops_is_not_started_again(child, tmp_path):
    asked: list[bool] = []  # run() asked whether the bot is stopping: the child has exited

    def stopping() -> bool:
        asked.append(True)
        return True

    engine = EngineProcess(tmp_path / "config.toml", command=[*child, "serve"], stopping=stopping)
    await engine.start()
    running = asyncio.create_task(engine.run())
    engine._tell("exit")  # as systemd's SIGTERM reaches the child beside the bot
    await until(lambda: asked, "run() to see the child's exit")
    await asyncio.sleep(0)  # one more turn of the loop: a run() that raised would be done now
    assert not running.done()  # waiting to be cancelled by the bot's closing, not failing
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_child_that_fails_before_its_model_is_ready_stops_the_start(child, tmp_path, capfd):
    engine = EngineProcess(tmp_path / "config.toml", command=[*child, "fail"])
    with pytest.raises(EngineStartError) as info:
        await engine.start()
    assert info.value.status == 3 and "before its model was loaded" in str(info.value)
    assert "no such file" in capfd.readouterr().err  # the child's own line, on the bot's stderr


async def test_stopping_the_bot_stops_the_child(child, tmp_path):
    engine = EngineProcess(tmp_path / "config.toml", command=[*child, "serve"])
    await engine.start()
    running = asyncio.create_task(engine.run())
    await until(lambda: engine.batch_rows == 3, "the child to report")
    running.cancel()  # what the bot's closing does: SIGTERM, and wait for it
    with pytest.raises(asyncio.CancelledError):
        await running
    assert engine._process.returncode is not None
