"""The `dgm` command as a user types it, in a fresh process each time."""

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUICK


def dgm(*args, cwd):
    return subprocess.run(["dgm", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dgm: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_commands(tmp_path):
    result = dgm("--help", cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout
    result = dgm("train", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "model: loglinear, sbn, vae, wakesleep" in result.stdout and "dataset: bars, binarized_mnist" in result.stdout


def test_train_help_describes_each_option_of_the_chosen_groups_from_the_configs_comments(tmp_path):
    from dgm_cli import settings

    result = dgm("train", "model=sbn", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    configs = Path(settings.__file__).parent.parent / "configs"
    for path, key, line in [("model/sbn.yaml", "estimator", "  model.estimator=nvil "),
                            ("trainer/default.yaml", "patience", "  trainer.patience=0 "),
                            ("train.yaml", "eval.num_samples", "  eval.num_samples=5000 ")]:
        comment = settings.comments((configs / path).read_text())[key]  # one source: the config's own comment
        assert any(text.startswith(line) and text.endswith(comment) for text in lines), (line, comment)
    assert "model=sbn: Sigmoid belief net + recognition net" in result.stdout and "model.hidden" not in result.stdout
    assert "dgm train model=sbn --help" in result.stdout  # how to see another family's


@pytest.mark.parametrize("command", ["train", "rerun", "eval", "sample", "report"])
def test_every_command_has_help_that_exits_zero(tmp_path, command):
    result = dgm(command, "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "" and result.stdout.startswith(("usage: dgm", "dgm train:"))


def test_dgm_version_is_the_installed_version(tmp_path):
    result = dgm("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(f"dgm {importlib.metadata.version('dgm')} (jax ")


def test_hydra_flags_pass_through(tmp_path):
    result = dgm("train", "--cfg", "job", "model.latent_dim=7", cwd=tmp_path)
    assert result.returncode == 0 and "latent_dim: 7" in result.stdout
    result = dgm("train", "model.latent_dim=7", "--cfg", "job", cwd=tmp_path)  # the flag after the overrides
    assert result.returncode == 0 and "latent_dim: 7" in result.stdout
    result = dgm("train", "--info", "searchpath", cwd=tmp_path)
    assert result.returncode == 0 and "pkg://dgm_cli.configs" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_train_on_digits_writes_a_run_under_outputs(tmp_path):
    result = dgm("train", "dataset=digits", *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run_dir] = list((tmp_path / "outputs").glob("*/*-vae"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["test_nll_samples"] == 20
    assert summary["dgm_version"] == importlib.metadata.version("dgm")
    for path in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "train.log",
                 "samples/samples.png", "samples/reconstructions.png"):
        assert (run_dir / path).is_file(), path


@pytest.mark.slow
def test_train_on_the_prepared_binarized_mnist(tmp_path):
    result = dgm("train", "trainer.epochs=1", "trainer.progress=false", "eval.num_samples=2",
                 "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "binarized_mnist" and 80 < summary["test_nll"] < 200


@pytest.mark.slow
def test_multirun_writes_one_directory_per_job(tmp_path):
    result = dgm("train", "-m", "dataset=bars", "seed=0,1", *QUICK, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = [json.loads((tmp_path / "sweep" / job / "summary.json").read_text()) for job in ("0", "1")]
    assert summaries[0]["test_nll"] != summaries[1]["test_nll"]
    # It ends saying where the runs are and how to tabulate them.
    assert result.stdout.splitlines()[-1] == "dgm: the sweep's 2 run directories are in sweep; tabulate them with: dgm report sweep"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragments",
    [
        (["model=nope"], ["unknown model 'nope'", "vae"]),
        (["dataset=mnist3"], ["unknown dataset 'mnist3'", "bars, binarized_mnist, digits, fashion_mnist_dynamic, mnist_dynamic, numpy, omniglot_dynamic, tfds"]),
        (["optimizer=adamax"], ["unknown optimizer 'adamax'", "adam, adamw, rmsprop, sgd"]),
        (["trainer.epochs=0", "dataset=digits"], ["trainer.epochs must be a positive integer, got 0"]),
        (["model.latent_dim=-3", "dataset=digits"], ["model.latent_dim must be a positive integer"]),
        (["eval.num_samples=0", "dataset=digits"], ["eval.num_samples must be a positive integer"]),
        (["model.hiden=[3]"], ["model.hiden"]),
        (["dataset=numpy"], ["dataset.path=FILE.npz"]),
        (["dataset=numpy", "dataset.path=missing.npz"], ["data file not found", "missing.npz"]),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, args, fragments):
    assert_one_line_error(dgm("train", *args, "hydra.run.dir=run", cwd=tmp_path), *fragments)
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(
    "arrays,fragment",
    [
        (None, "cannot read"),
        ({"train": np.zeros((0, 4)), "test": np.zeros((2, 4))}, "is empty"),
        ({"train": np.full((3, 4), 2), "test": np.zeros((2, 4))}, "is not binary (it has values such as 2): choose how to binarise it with dataset.binarize"),
        ({"train": np.full((3, 4), np.nan), "test": np.zeros((2, 4))}, "contains NaN"),
        ({"train": np.zeros((3, 4)), "validation": np.zeros((3, 4)), "test": np.zeros((2, 3))}, "different widths"),
    ],
)
def test_bad_data_files_are_one_line_and_a_non_zero_exit(tmp_path, arrays, fragment):
    path = tmp_path / "data.npz"
    if arrays is None:
        path.write_bytes(b"\x00garbage")
    else:
        np.savez(path, **arrays)
    result = dgm("train", "dataset=numpy", f"dataset.path={path}", "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()  # refused before its first epoch: no run directory left behind


def test_unknown_command(tmp_path):
    assert_one_line_error(dgm("trian", cwd=tmp_path), "unknown command 'trian'", "train")
