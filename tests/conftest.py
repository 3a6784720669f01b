# --- db fixtures (helper "db"): SQLite + PostgreSQL databases and queues, see tests/db_fixtures.py ---
# --- end db fixtures ---
# --- tiny model fixtures (helper "loading"): random SD1/SD2/SDXL models, see tests/tinymodel.py ---
import os

import pytest

from db_fixtures import clock, db_engine, db_url, pg_admin_url, pg_url, queue  # noqa: F401
from engine.torch_builds import torchvision_importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub are imported
torchvision_importable()  # before the test helpers import diffusers (see engine/torch_builds.py)

# torch/diffusers are imported inside the fixtures, so test runs that need no model stay fast.


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """One folder per test session where the tiny model files are written (once each)."""
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_sd_folder(tiny_models_dir):
    """A tiny SD1-shaped model as a diffusers folder (seed 0)."""
    from tinymodel import save_diffusers_folder

    return save_diffusers_folder(tiny_models_dir / "sd1_folder", "sd1")


@pytest.fixture(scope="session")
def tiny_sd_single_file(tiny_models_dir):
    """The same tiny SD1 model (seed 0) as an LDM-layout .safetensors (+ config folder beside it)."""
    from tinymodel import save_single_file

    return save_single_file(tiny_models_dir / "sd1.safetensors", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_single_file(tiny_models_dir):
    """A tiny SD2-shaped (open_clip text encoder, v_prediction) single file."""
    from tinymodel import save_single_file

    return save_single_file(tiny_models_dir / "sd2.safetensors", "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_single_file(tiny_models_dir):
    """A tiny SDXL-shaped (two text encoders) single file."""
    from tinymodel import save_single_file

    return save_single_file(tiny_models_dir / "sdxl.safetensors", "sdxl")


@pytest.fixture(scope="session")
def tiny_model(tiny_sd_folder):
    """The tiny SD1 model loaded on CPU in float32 (a LoadedModel; do not modify it)."""
    import torch

    from engine.families.loading import load_model

    return load_model(str(tiny_sd_folder), device="cpu", dtype=torch.float32, name="tiny-sd1", progress=False)


@pytest.fixture(scope="session")
def tiny_sd2_model(tiny_sd2_single_file):
    """The tiny SD2 (v_prediction) model loaded on CPU in float32."""
    import torch

    from engine.families.loading import load_model

    return load_model(str(tiny_sd2_single_file), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tiny_sdxl_single_file):
    """The tiny SDXL model (two text encoders) loaded on CPU in float32."""
    import torch

    from engine.families.loading import load_model

    return load_model(str(tiny_sdxl_single_file), device="cpu", dtype=torch.float32, progress=False)


# --- end tiny model fixtures ---

# --- hypothesis: a fixed seed in CI, so a submission's CI run cannot fail on an example no
# local run has seen; local runs keep exploring new random examples (and print how to replay).
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("dev", print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(items) -> None:
    """The slow tests (bot and worker processes, whole compiles) first: pytest-xdist hands tests
    out in this order, so the short ones fill the gaps at the end instead of one long test
    running alone while the other process waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
