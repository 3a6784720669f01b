"""config.toml: the shipped file is valid, wrong values give one clear line, the token is env-only."""

from pathlib import Path

import pytest

from bot.config import ConfigError, load_config
from engine.config.settings import load_settings, parse_size

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid():
    config = load_config(ROOT / "config.toml", env={"DISCORD_TOKEN": "abc"})
    assert config.token == "abc"
    assert config.generation.default_sampler in config.generation.samplers
    assert config.queue.database_url.startswith("sqlite:///")
    assert load_settings(ROOT / "config.toml").model == config.model
    assert config.engine.process == "worker"  # the run command starts the engine as the bot's child


def test_missing_token_says_what_to_do():
    with pytest.raises(ConfigError, match="DISCORD_TOKEN is not set"):
        load_config(ROOT / "config.toml", env={})


def test_token_in_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="discord.token"):
        load_config(write(tmp_path, '[discord]\ntoken = "secret"\n'), env={"DISCORD_TOKEN": "x"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[engine]\ndevice = 'tpu'\n", "engine.device = 'tpu'"),
        ("[engine]\nmax_batch = 'many'\n", "engine.max_batch = 'many': expected int"),
        ("[engine]\novertake_window = -1\n", "engine.overtake_window = -1"),
        ("[engine]\ncompile = 'fast'\n", "engine.compile = 'fast'"),
        ("[engine]\nprocess = 'thread'\n", "engine.process = 'thread'"),
        ("[generation]\ndefault_steps = 80\n", "generation.default_steps = 80"),
        ("[generation]\nsizes = ['500x500']\n", "generation.sizes = '500x500'"),
        ("[generation]\nsamplers = ['plms']\n", "generation.samplers = 'plms'"),
        ("[generation]\ndefault_sampler = 'ddim'\nsamplers = ['euler']\n", "generation.default_sampler"),
        ("[generation]\nschedules = ['beta']\n", "generation.schedules = 'beta'"),
        ("[generation]\nschedules = []\n", "generation.schedules = []"),
        ("[generation]\ndefault_schedule = 'karras'\nschedules = ['automatic']\n", "generation.default_schedule"),
        ("[queue]\npending_limit = 0\n", "queue.pending_limit = 0"),
        ("[queue]\ndatabase_url = 'mysql://x'\n", "queue.database_url"),
        ("[model]\nfamily = 'sd4'\n", "model.family = 'sd4'"),
        ("[model]\nweights = 'float16'\n", "model.weights = 'float16'"),
        ("[model]\nencoders = '/etc/passwd'\n", "model.encoders = '/etc/passwd'"),
        ("[engine]\ntext_encoders = 'gpu'\n", "engine.text_encoders = 'gpu'"),
        ("[model]\nsorce = 'x'\n", "model.sorce: unknown key"),
        ("[discord]\nguild_ids = [-1]\n", "discord.guild_ids = -1"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_wrong_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"DISCORD_TOKEN": "x"})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={"DISCORD_TOKEN": "x"})


def test_parse_size():
    assert parse_size("512x768") == (512, 768)
    assert parse_size("513x512") == (None, None)
    assert parse_size("big") == (None, None)
