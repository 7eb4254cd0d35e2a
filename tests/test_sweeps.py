"""Sweeps beyond the grid: an Optuna search through Hydra's sweeper, and jobs launched as
processes of their own through Hydra's submitit launcher (the code path of submitit_slurm)."""

import json

import pytest
import yaml

from tests.test_cli import dgm

QUICK_TRIAL = ["dataset=digits", "trainer.epochs=1", "trainer.progress=false", "eval.num_samples=5",
               "trainer.num_pictures=4"]


@pytest.mark.slow
def test_an_optuna_search_minimises_the_validation_value_and_its_failed_trials_do_not_stop_it(tmp_path):
    result = dgm("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=8", "hydra.sweeper.sampler.seed=1",
                 "optimizer.lr=tag(log, interval(1e-4, 1e-1))", "model.latent_dim=choice(4, 0)", *QUICK_TRIAL,
                 "hydra.sweep.dir=search", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = sorted((tmp_path / "search").glob("[0-9]*"), key=lambda path: int(path.name))
    failed = [trial for trial in trials if (trial / "FAILED").is_file()]
    assert len(trials) == 8 and 0 < len(failed) < 8  # latent_dim=0 is refused: a failed trial, not a crash
    assert all("model.latent_dim=0" in (trial / ".hydra" / "overrides.yaml").read_text() for trial in failed)
    assert result.stderr.count("dgm: a failed trial: ") == len(failed)

    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    finished = {trial: json.loads((trial / "summary.json").read_text()) for trial in trials if trial not in failed}
    best_trial = min(finished, key=lambda trial: finished[trial]["best_validation_loss"])
    assert best["best_value"] == pytest.approx(finished[best_trial]["best_validation_loss"])

    report = dgm("report", "search", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    first = report.stdout.splitlines()[0]
    assert first.startswith("Optuna's best trial: `") and f"({tmp_path.name}" not in first
    assert f"search/{best_trial.name})" in first and "; 8 trials" in first
    assert report.stdout.count("| 1 failed |") == len(failed)  # each trial its own row


@pytest.mark.slow
def test_jobs_run_as_processes_of_their_own_through_the_submitit_launcher(tmp_path):
    result = dgm("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 "model.latent_dim=4,0", *QUICK_TRIAL, "hydra.sweep.dir=local", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("dgm: error: 1 job(s) of the sweep failed, the others ran: "
                                                      "local/1: model.latent_dim must be a positive integer, got 0")
    assert (tmp_path / "local" / "0" / "summary.json").is_file()
    assert (tmp_path / "local" / ".submitit").is_dir()  # submitit ran them, each in a process of its own
