"""An experiment runner's work as a user types it: sweeps and their report, re-running a saved
config, resuming a killed run, eval and sample on a finished run, data parallelism, and the bad
arguments of each."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from dgm_cli import uncertainty
from tests.conftest import QUICK
from tests.test_cli import assert_one_line_error, dgm

TIMING = {"examples_per_sec", "seconds", "wall_seconds", "startup_seconds", "train_examples_per_sec"}


def metrics(run_dir) -> list[dict]:
    """metrics.jsonl less its timings, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(records, expected):
    """The same records, their numbers within floating-point tolerance."""
    assert [(r["epoch"], r["split"]) for r in records] == [(r["epoch"], r["split"]) for r in expected]
    for record, wanted in zip(records, expected):
        numbers = {name: value for name, value in wanted.items() if name != "split"}
        assert {name: record[name] for name in numbers} == pytest.approx(numbers, rel=1e-4, abs=1e-4)


def summary(run_dir) -> dict:
    return {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in TIMING}


@pytest.mark.slow
def test_a_2x2_sweep_and_its_report(tmp_path):
    result = dgm("train", "-m", "dataset=digits", "optimizer.lr=1e-3,3e-3", "seed=0,1", *QUICK,
                 "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    nll = {job: json.loads((sweep / job / "summary.json").read_text())["test_nll"] for job in "0123"}

    result = dgm("report", "sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    # Jobs 0, 1 are lr 1e-3 with seeds 0, 1; jobs 2, 3 are lr 3e-3: each pair is one row.
    means = {"optimizer.lr=0.001": np.mean([nll["0"], nll["1"]]), "optimizer.lr=0.003": np.mean([nll["2"], nll["3"]])}
    assert sorted(means, key=means.get) == [row["config"] for row in rows]  # best first
    for row in rows:
        assert row["runs"] == "2" and row["status"] == "2 finished"
        assert float(row["test_nll"]) == pytest.approx(means[row["config"]])
    assert (sweep / "report.md").read_text() in result.stdout and " ± " in result.stdout
    assert "dataset=digits" in result.stdout  # shared by every run: said once, above the table
    assert Image.open(sweep / "curves.png").size[0] > 400

    # Over the seeds, the t interval of the mean; against the best row, the paired difference.
    summaries = {job: json.loads((sweep / job / "summary.json").read_text()) for job in "0123"}
    nlls = {job: -np.load(sweep / job / s["test_per_image"]).astype(np.float64) for job, s in summaries.items()}
    jobs = {"optimizer.lr=0.001": "01", "optimizer.lr=0.003": "23"}
    best, other = rows[0]["config"], rows[1]["config"]
    for row in rows:
        values = [nll[job] for job in jobs[row["config"]]]
        assert row["n"] == "2" and float(row["test_nll_std"]) == pytest.approx(np.std(values, ddof=1))
        interval = (float(row["test_nll_ci_low"]), float(row["test_nll_ci_high"]))
        assert interval == pytest.approx(uncertainty.mean_interval(values)) and row["compared_with"] == best
    difference = np.mean([nlls[j] for j in jobs[other]], 0) - np.mean([nlls[j] for j in jobs[best]], 0)
    assert float(rows[1]["paired_difference"]) == pytest.approx(difference.mean(), rel=1e-5)
    assert float(rows[1]["paired_difference_stderr"]) == pytest.approx(uncertainty.standard_error(difference))
    # Paired on the same images, the difference is known far better than either figure.
    assert float(rows[1]["paired_difference_stderr"]) < float(rows[1]["test_nll_stderr"]) / 2
    assert rows[0]["paired_difference"] == "" and f"behind {best}: +" in result.stdout and "95% CI" in result.stdout
    assert Image.open(sweep / "convergence.png").size[0] > 400
    latex = dgm("report", "sweep", "--format", "latex", cwd=tmp_path).stdout
    assert "95\\% CI" in latex and "behind" in latex


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    result = dgm("train", "-m", "dataset=bars", "model.latent_dim=0,2", *QUICK, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("dgm: error: 1 job(s) of the sweep failed")
    assert "model.latent_dim must be a positive integer" in (tmp_path / "sweep" / "0" / "FAILED").read_text()
    assert (tmp_path / "sweep" / "1" / "summary.json").is_file()
    report = dgm("report", "sweep", cwd=tmp_path)
    assert report.returncode == 0 and "1 failed" in report.stdout and "1 finished" in report.stdout


@pytest.mark.slow
def test_a_rerun_of_the_saved_config_repeats_every_metric(finished_run, tmp_path):
    assert dgm("rerun", str(finished_run), "hydra.run.dir=again", cwd=tmp_path).returncode == 0
    # Hydra's own spelling of the same.
    result = dgm("train", "--config-path", str(finished_run / ".hydra"), "--config-name", "config",
                 "hydra.run.dir=hydra", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for copy in ("again", "hydra"):
        assert metrics(tmp_path / copy) == metrics(finished_run)
        assert summary(tmp_path / copy) == summary(finished_run)


@pytest.mark.slow
@pytest.mark.parametrize("model_args", [
    ["model=vae", "model.hidden=[200]"],
    ["model=wakesleep", "model.layers=[200]"],
    ["model=loglinear", "model.num_components=200", "trainer.epochs=10"],  # EM: an epoch is an iteration
], ids=["vae", "wakesleep", "loglinear"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_end(tmp_path, model_args):
    # binarized_mnist, so that an epoch lasts long enough to be killed in the middle of.
    args = ["trainer.epochs=3", "trainer.progress=false", "eval.num_samples=2", "trainer.num_pictures=4", *model_args]
    assert dgm("train", *args, "hydra.run.dir=whole", cwd=tmp_path).returncode == 0
    killed = subprocess.Popen(["dgm", "train", *args, "hydra.run.dir=killed"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "1"
    while not first.exists() and killed.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()

    result = dgm("train", "resume=killed", cwd=tmp_path)  # the dead process's lock is no obstacle
    assert result.returncode == 0, result.stderr
    assert "resuming from the checkpoint of epoch" in (tmp_path / "killed" / "train.log").read_text()
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")
    assert summary(tmp_path / "killed") == summary(tmp_path / "whole")
    # Resuming a finished run changes nothing.
    result = dgm("train", "resume=killed", cwd=tmp_path)
    assert result.returncode == 0 and "has finished" in result.stdout


@pytest.mark.slow
def test_eval_and_sample_on_a_finished_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    original = json.loads((run / "summary.json").read_text())

    result = dgm("eval", "run", cwd=tmp_path)  # the run's own settings: the run's own figures
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "summary.json").read_text())["test_nll"] == pytest.approx(original["test_nll"], abs=1e-4)
    result = dgm("eval", "run", "eval.num_samples=200", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    updated = json.loads((run / "summary.json").read_text())
    assert updated["test_nll_samples"] == 200 and updated["test_nll"] < original["test_nll"]  # a tighter bound
    assert updated["best_epoch"] == original["best_epoch"] and metrics(run) == metrics(finished_run)  # no retraining

    result = dgm("sample", "run", "n=25", "seed=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(run / "samples" / "sample-n25-seed3.png"))
    assert grid.std() > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(p.name for p in (finished_run / "checkpoints").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae", "wakesleep"])
def test_data_parallel_over_two_devices_matches_one_device(tmp_path, model):
    args = ["train", f"model={model}", "dataset=digits", *QUICK, "trainer.batch_size=64"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for name, parallel in (("one", "false"), ("two", "true")):
        result = subprocess.run(["dgm", *args, f"trainer.data_parallel={parallel}", f"hydra.run.dir={name}"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    assert "data parallel over 2 devices" in (tmp_path / "two" / "train.log").read_text()
    assert_close(metrics(tmp_path / "two"), metrics(tmp_path / "one"))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["trainer.batch_size", "eval.batch_size"])
def test_data_parallel_needs_batches_the_devices_divide(tmp_path, setting):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(["dgm", "train", "dataset=digits", f"{setting}=63", "trainer.data_parallel=true",
                             "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert_one_line_error(result, f"{setting} 63 must be a multiple of 2")


def damage(run, how: str) -> None:
    """Cut short (truncate) or overwrite (corrupt) every file of the run's checkpoints."""
    for path in (run / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"" if how == "truncated" else b"\x00not a checkpoint" * 8)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_a_damaged_checkpoint_is_one_line(finished_run, tmp_path, how):
    shutil.copytree(finished_run, tmp_path / "run")
    damage(tmp_path / "run", how)
    assert_one_line_error(dgm("eval", "run", cwd=tmp_path), "cannot be read")
    assert_one_line_error(dgm("sample", "run", cwd=tmp_path), "cannot be read")
    (tmp_path / "run" / "summary.json").unlink()  # as if killed: resuming reads the latest checkpoint
    assert_one_line_error(dgm("train", "resume=run", cwd=tmp_path), "cannot be read")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["eval", "nowhere"], ["nowhere does not exist"]),
        (["sample", "nowhere"], ["nowhere does not exist"]),
        (["train", "resume=nowhere"], ["nowhere does not exist"]),
        (["rerun", "nowhere"], ["nowhere does not exist"]),
        (["eval", "empty"], ["empty is not a run directory"]),
        (["train", "resume=empty"], ["empty is not a run directory"]),
        (["report", "empty"], ["no runs under empty"]),
        (["report", "nowhere"], ["nowhere is not a directory"]),
        (["eval"], ["usage: dgm eval RUN"]),
        (["sample", "empty", "n=0"], ["empty is not a run directory"]),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, fragments):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(dgm(*args, cwd=tmp_path), *fragments)


@pytest.mark.slow
def test_bad_options_of_eval_and_sample(finished_run, tmp_path):
    assert_one_line_error(dgm("sample", str(finished_run), "n=0", cwd=tmp_path), "n must be a positive integer")
    assert_one_line_error(dgm("sample", str(finished_run), "count=3", cwd=tmp_path), "n=COUNT and seed=INTEGER")
    assert_one_line_error(dgm("eval", str(finished_run), "trainer.epochs=3", cwd=tmp_path), "eval.")
    assert_one_line_error(dgm("train", f"resume={finished_run}", "seed=3", cwd=tmp_path), "resume=RUN takes no seed=3")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_a_multi_host_run_train_as_one(tmp_path):
    # Two "hosts" on this machine, one CPU device each, joined by jax.distributed.
    args = ["dataset=digits", *QUICK, "trainer.batch_size=64"]
    multi_host = ["trainer.data_parallel=true", f"distributed.coordinator_address=localhost:{free_port()}",
                  "distributed.num_processes=2", "hydra.run.dir=multi"]
    hosts = [subprocess.Popen(["dgm", "train", *args, *multi_host, f"distributed.process_id={index}"], cwd=tmp_path,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for index in (1, 0)]
    for host in hosts:
        assert host.wait(timeout=600) == 0, host.stderr.read()
    assert dgm("train", *args, "hydra.run.dir=single", cwd=tmp_path).returncode == 0
    log = (tmp_path / "multi" / "train.log").read_text()
    assert "data parallel over 2 devices" in log and log.count("computing on 2 device(s)") == 1  # process 0's
    assert_close(metrics(tmp_path / "multi"), metrics(tmp_path / "single"))  # written once, by process 0
    # One process evaluates and samples the run alone, without waiting for the other host.
    for command in ("eval", "sample"):
        result = dgm(command, "multi", cwd=tmp_path)
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_report_over_data_sets_and_families_keeps_them_apart_and_prints_where_it_cannot_write(tmp_path):
    for args in (["dataset=digits", "hydra.run.dir=runs/vae"], ["model=loglinear", "dataset=bars", "hydra.run.dir=runs/em"]):
        assert dgm("train", *args, *QUICK, cwd=tmp_path).returncode == 0
    result = dgm("report", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "runs" / "report.csv").open()))
    assert [row["dataset"] for row in rows] == ["bars", "digits"]
    assert "| bars | " in result.stdout and "(exact)" in result.stdout and "(20 samples" in result.stdout
    assert Image.open(tmp_path / "runs" / "curves.png").size[0] >= 1600  # a panel per data set and metric

    result = dgm("report", "runs", "--format", "latex", cwd=tmp_path)
    assert result.returncode == 0 and r"\toprule" in result.stdout and r"\end{tabular}" in result.stdout
    assert (tmp_path / "runs" / "report.tex").read_text() in result.stdout

    (tmp_path / "runs" / "report.md").unlink()
    (tmp_path / "runs" / "report.md").mkdir()  # a file it cannot write, even as root
    result = dgm("report", "runs", cwd=tmp_path)
    assert result.returncode == 0 and "| digits | " in result.stdout
    assert result.stderr.startswith("dgm: the table is above; no report files written into runs (")
    assert_one_line_error(dgm("report", "runs", "--format", "html", cwd=tmp_path), "usage: dgm report DIR")
