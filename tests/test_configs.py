"""Every config composes, and the override names users and benchmarks rely on exist."""

import re
from importlib.resources import files

import pytest

GROUPS = ["model", "dataset", "optimizer", "schedule", "trainer", "experiment"]


def options(group):
    return sorted(p.name.removesuffix(".yaml") for p in files("dgm_cli.configs").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(make_config, group, option):
    cfg = make_config(f"{group}={option}")
    if group in ("model", "dataset", "optimizer", "schedule"):
        assert cfg[group].name == option


def test_defaults(make_config):
    cfg = make_config()
    assert (cfg.model.name, cfg.dataset.name, cfg.optimizer.name) == ("vae", "binarized_mnist", "adam")


def test_documented_overrides_compose(make_config):
    cfg = make_config(
        "model.hidden=[400]", "model.latent_dim=20", "model.activation=relu", "model.num_samples=1",
        "trainer.epochs=3", "trainer.batch_size=128", "seed=0", "optimizer=adam",
        "optimizer.lr=1e-3", "eval.num_samples=5000", "dataset=numpy", "dataset.path=FILE.npz",
    )
    assert list(cfg.model.hidden) == [400] and cfg.eval.num_samples == 5000
    assert cfg.dataset.path == "FILE.npz" and cfg.trainer.epochs == 3


def test_every_experiment_says_how_to_run_it():
    for option in options("experiment"):
        header = files("dgm_cli.configs").joinpath("experiment", f"{option}.yaml").read_text()
        assert header.startswith("#") and f"experiment={option}" in header
        assert re.search(r"run time \d+ (minutes|seconds)", header) and "test_nll" in header
        assert "# Settings chosen: " in header  # how: none chosen on a test figure
