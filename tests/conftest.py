import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

SHARED_TFDS = Path(__file__).resolve().parents[2] / "shared" / "tensorflow_datasets"

# The prepared binarized_mnist sits beside the project on development machines and on CI.
if "TFDS_DATA_DIR" not in os.environ and SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(SHARED_TFDS)

# Small, quick settings for runs on the built-in data sets.
QUICK = ["trainer.epochs=2", "trainer.progress=false", "eval.num_samples=20", "trainer.num_pictures=16"]


@pytest.fixture
def make_config():
    def make(*overrides):
        with initialize_config_module("dgm_cli.configs", version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return make


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run on digits, for the commands that work on one (which must not change it)."""
    from tests.test_cli import dgm

    cwd = tmp_path_factory.mktemp("finished")
    result = dgm("train", "dataset=digits", *QUICK, "hydra.run.dir=run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "run"
