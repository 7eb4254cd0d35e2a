"""Packed runs (`hydra/launcher=packed`, `dgm_cli.packing`): jobs trained as one vmapped program
each write what they would have written alone, for every model family."""

import json
import subprocess

import pytest
from omegaconf import OmegaConf

from dgm_cli import loop, packing
from dgm_cli.errors import DgmError
from tests.conftest import QUICK
from tests.test_cli import dgm

LOG_FORMAT = OmegaConf.create({"formatters": {"simple": {"format": "[%(asctime)s] %(message)s", "datefmt": "%H:%M:%S"}}})
TIMINGS = {"seconds", "examples_per_sec"}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(packed, alone, rel=1e-4):
    """Every record and value of metrics.jsonl (of a run directory, or its records), but the
    timings, equal to float tolerance."""
    packed, alone = [records(run) if not isinstance(run, list) else run for run in (packed, alone)]
    assert [(r["split"], r["epoch"], sorted(r)) for r in packed] == [(r["split"], r["epoch"], sorted(r)) for r in alone]
    for one, other in zip(packed, alone):
        numbers = [key for key in one if key not in TIMINGS and key != "split"]
        assert [one[key] for key in numbers] == pytest.approx([other[key] for key in numbers], rel=rel, abs=1e-5), \
            (one, other)


def train_packed(make_config, tmp_path, jobs: list[list[str]], shared: list[str]):
    """The jobs packed, then each alone: -> (outcomes of the group, its run dirs, the lone runs' dirs)."""
    configs = [make_config(*shared, *overrides) for overrides in jobs]
    assert len({packing.group_key(cfg) for cfg in configs}) == 1
    packed = [tmp_path / "packed" / str(index) for index in range(len(jobs))]
    for run_dir in packed:
        run_dir.mkdir(parents=True)
    outcomes = packing.train(configs, packed, LOG_FORMAT)
    alone = [tmp_path / "alone" / str(index) for index in range(len(jobs))]
    for cfg, run_dir, outcome in zip(configs, alone, outcomes):
        if not isinstance(outcome, Exception):
            loop.run(cfg, run_dir)
    return outcomes, packed, alone


FAMILIES = {  # each with per-job numbers that enter its program, beside the seed
    "vae": (["model=vae", "model.kl_warmup_epochs=1"], [["seed=0"], ["seed=1", "optimizer.lr=3e-3",
                                                                   "model.kl_warmup_epochs=2"]]),
    "sbn": (["method=vimco"], [["seed=0"], ["seed=1", "optimizer.lr=3e-3"]]),
    "wakesleep": (["model=wakesleep"], [["seed=0"], ["seed=1", "optimizer.lr=3e-3"]]),
    "loglinear": (["model=loglinear", "model.num_components=20"], [["seed=0"], ["seed=1"]]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_job_writes_what_it_would_write_alone(family, make_config, tmp_path):
    shared, jobs = FAMILIES[family]
    outcomes, packed, alone = train_packed(make_config, tmp_path, jobs, ["dataset=digits", *QUICK, *shared])
    for outcome, packed_dir, alone_dir in zip(outcomes, packed, alone):
        assert_same_metrics(packed_dir, alone_dir)
        lone = json.loads((alone_dir / "summary.json").read_text())
        assert outcome["packed_jobs"] == 2 and outcome["test_nll"] == pytest.approx(lone["test_nll"], rel=1e-4)
        assert (packed_dir / "samples" / "samples.png").is_file() and (packed_dir / "evaluations.jsonl").is_file()
        assert "testing epoch" in (packed_dir / "train.log").read_text()
    assert records(packed[0]) != records(packed[1])  # two jobs, not one twice


@pytest.mark.slow
def test_early_stopping_and_a_divergence_end_their_own_job_only(make_config, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    shared = ["dataset=digits", *QUICK, "trainer.epochs=4", "optimizer=sgd", "optimizer.lr=1e-2",
              "logger=mlflow", f"logger.tracking_uri={store}"]
    jobs = [["seed=0"], ["seed=1", "trainer.patience=1", "trainer.min_delta=1000"], ["seed=2", "optimizer.lr=1e9"]]
    outcomes, packed, alone = train_packed(make_config, tmp_path, jobs, shared)
    assert outcomes[0]["epochs_trained"] == 4
    assert (outcomes[1]["best_epoch"], outcomes[1]["epochs_trained"]) == (1, 2)  # masked from epoch 3 on
    assert isinstance(outcomes[2], DgmError) and "training diverged" in str(outcomes[2])
    assert_same_metrics(packed[0], alone[0])
    assert_same_metrics(packed[1], alone[1])
    assert not (packed[2] / "summary.json").exists()
    own = (packed[1] / "train.log").read_text()
    assert "stopped at epoch 2: trainer.patience=1" in own and "training diverged" not in own
    client = MlflowClient(store)
    status = {run.data.tags["dgm.run_dir"]: run.info.status
              for run in client.search_runs([client.get_experiment_by_name("dgm").experiment_id])}
    assert [status[str(run_dir.absolute())] for run_dir in packed] == ["FINISHED", "FINISHED", "FAILED"]


def test_jobs_pack_when_they_differ_only_in_numbers_that_keep_the_program(make_config):
    def grouped(*jobs, shared=("dataset=digits",)):
        return packing.groups([make_config(*shared, *job) for job in jobs])

    assert grouped(["seed=0"], ["seed=1", "optimizer.lr=1e-2"], ["trainer.patience=3"]) == [[0, 1, 2]]
    assert grouped(["model.kl_warmup_epochs=0"], ["model.kl_warmup_epochs=5"], ["model.kl_warmup_epochs=9"]) == [[0], [1, 2]]
    assert grouped(["model.latent_dim=4"], ["model.latent_dim=8"], ["model.latent_dim=4", "seed=1"]) == [[0, 2], [1]]
    assert grouped(*[[f"seed={seed}"] for seed in range(5)], shared=("trainer.pack_size=2",)) == [[0, 1], [2, 3], [4]]
    assert grouped(["seed=0"], ["seed=1"], shared=("trainer.pack_size=1",)) == [[0], [1]]
    assert grouped(["seed=0"], ["seed=1"], shared=("trainer.data_parallel=true",)) == [[0], [1]]


@pytest.mark.slow
def test_the_packed_launcher_leaves_runs_that_report_resume_and_rerun_as_any(tmp_path):
    sweep = ["train", "-m", "hydra/launcher=packed", "seed=0,1,2,3", "dataset=digits", "trainer.epochs=5",
             "trainer.progress=false", "eval.num_samples=20", "hydra.sweep.dir=sweep"]
    result = dgm(*sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Launching 4 jobs in 1 group(s)" in result.stdout
    runs = [tmp_path / "sweep" / str(job) for job in range(4)]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert all(summary["packed_jobs"] == 4 for summary in summaries)
    report = dgm("report", "sweep", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| digits | (the shared overrides) | 4 |" in report.stdout and "4 finished" in report.stdout

    # Killed: job 1 lost everything but its saved config, job 2 its summary (it had trained all
    # its epochs): the same command trains job 1 from the start and tests job 2 from its checkpoint.
    before = {run: records(run) for run in runs}
    for path in ["1/checkpoints", "1/metrics.jsonl", "1/summary.json", "1/evaluations.jsonl", "2/summary.json"]:
        subprocess.run(["rm", "-r", str(tmp_path / "sweep" / path)], check=True)
    again = dgm(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("has finished already") == 2
    for run in runs:  # job 1 trained again packed with job 2 alone: equal to float tolerance
        assert_same_metrics(run, before[run])

    (runs[3] / "summary.json").unlink()  # one job of the group resumed alone, by name
    resumed = dgm("train", "resume=sweep/3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of epoch 5" in (runs[3] / "train.log").read_text()
    assert json.loads((runs[3] / "summary.json").read_text())["test_nll"] == summaries[3]["test_nll"]

    rerun = dgm("rerun", "sweep/3", "hydra.run.dir=alone", cwd=tmp_path)  # alone, as any run
    assert rerun.returncode == 0, rerun.stderr
    assert "packed_jobs" not in json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert_same_metrics(runs[3], tmp_path / "alone")


@pytest.mark.slow
def test_a_group_runs_as_one_submitit_job(tmp_path):
    result = dgm("train", "-m", "hydra/launcher=packed_submitit_local", "hydra.launcher.timeout_min=10",
                 "seed=0,1", "model.latent_dim=4,0", "dataset=digits", "trainer.epochs=1", "trainer.progress=false",
                 "eval.num_samples=5", "trainer.num_pictures=4", "hydra.sweep.dir=local", cwd=tmp_path)
    assert result.returncode == 1  # latent_dim=0 is refused, in its own group of two
    assert result.stderr.count("model.latent_dim must be a positive integer, got 0") >= 2
    finished = sorted(path.parent.name for path in (tmp_path / "local").glob("*/summary.json"))
    assert finished == ["0", "2"]  # seed 0 and 1 of latent_dim=4: jobs 0 and 2
    assert json.loads((tmp_path / "local" / "0" / "summary.json").read_text())["packed_jobs"] == 2
    submitted = list((tmp_path / "local" / ".submitit").glob("*/*_submitted.pkl"))
    assert len(submitted) == 2  # one submitit job per group
