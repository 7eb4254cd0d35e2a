"""Run directories nobody can spoil by accident: a saved config never overwritten, one writer at a
time, every evaluation kept with how it was measured, and the small breaks of the commands
around them."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from dgm_cli import cli, interrupts, loop, report, rundir, steps
from dgm_cli.errors import DgmError
from tests.conftest import QUICK
from tests.test_cli import assert_one_line_error, dgm


def snapshot(run) -> dict:
    """Every file of a run, its lock aside (which names its latest holder): bytes and modification time."""
    return {str(path.relative_to(run)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(run.rglob("*")) if path.is_file() and path.name != rundir.LOCK}


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("killed", [False, True])
def test_a_command_with_another_config_is_refused_and_changes_nothing(run_copy, tmp_path, killed):
    if killed:  # as if killed before its end: no summary.json
        (run_copy / "summary.json").unlink()
    before = snapshot(run_copy)
    result = dgm("train", "dataset=digits", *QUICK, "optimizer.lr=0.01", "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(result, "holds a run of another config", "optimizer.lr 0.001 in the run, 0.01 here",
                          "dgm train resume=")
    assert snapshot(run_copy) == before  # .hydra/, train.log and the rest as they were
    if killed:  # and the advice works
        result = dgm("train", "resume=run", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads((run_copy / "summary.json").read_text())["test_nll"] > 0


def test_the_same_config_into_a_finished_run_does_nothing(run_copy, tmp_path):
    before = snapshot(run_copy)
    # The progress bar and the cache are where and how a run runs, not what it trains.
    result = dgm("train", "dataset=digits", *QUICK, "trainer.progress=true", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0 and "has finished already; nothing to do" in result.stdout
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    args = ["dgm", "train", "dataset=digits", "trainer.epochs=6", "trainer.progress=false", "eval.num_samples=20",
            "hydra.run.dir=run"]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / rundir.LOCK
    while first.poll() is None and not (lock.is_file() and f"process {first.pid}" in lock.read_text()):
        time.sleep(0.05)  # until the first holds the run, however slowly a loaded machine starts it
    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert_one_line_error(second, f"run is in use by process {first.pid} (dgm train dataset=digits")
    run = tmp_path / "run"
    assert not (run / "FAILED").exists() and (run / "summary.json").is_file()
    assert (run / "train.log").read_text().count("computing on 1 device(s)") == 1  # one writer's log
    report = dgm("report", "run", cwd=tmp_path)
    assert report.returncode == 0 and "1 finished" in report.stdout and "failed" not in report.stdout


@pytest.mark.slow
def test_eval_and_sample_wait_for_no_one_and_touch_nothing_while_a_run_trains(run_copy, tmp_path):
    before = snapshot(run_copy)
    with rundir.exclusive(run_copy, "dgm train"):  # as a training process holds it
        for command in ("eval", "sample"):
            assert_one_line_error(dgm(command, "run", cwd=tmp_path), f"is in use by process {os.getpid()} (dgm train")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_two_identical_commands_started_together_get_two_run_directories(tmp_path):
    command = ["dgm", "train", "dataset=digits", *QUICK, "trainer.epochs=1"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()
    assert len(list((tmp_path / "outputs").glob("*/*-vae/summary.json"))) == 2


@pytest.mark.slow
def test_every_evaluation_is_kept_and_the_best_measured_is_the_headline(run_copy, tmp_path):
    original = json.loads((run_copy / "summary.json").read_text())
    assert original["test_nll_samples"] == 20 and original["test_nll_seed"] == 0
    result = dgm("eval", "run", "eval.num_samples=5", "seed=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reports test NLL" in result.stdout
    assert json.loads((run_copy / "summary.json").read_text()) == original  # 5 samples measure worse than 20

    assert dgm("eval", "run", "eval.num_samples=5", "headline=true", cwd=tmp_path).returncode == 0
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["test_nll_samples"] == 5 and summary["test_nll"] != original["test_nll"]

    evaluations = [json.loads(line) for line in (run_copy / "evaluations.jsonl").read_text().splitlines()]
    assert [(e["command"], e["num_samples"], e["seed"]) for e in evaluations] == [
        ("dgm train", 20, 0), ("dgm eval", 5, 4), ("dgm eval", 5, 0)]
    assert evaluations[0]["nll"] == original["test_nll"] and all(e["seconds"] > 0 for e in evaluations)
    report = dgm("report", "run", cwd=tmp_path)
    assert "(5 samples, not converged)" in report.stdout  # no tenfold step of k to judge convergence by


@pytest.mark.slow
def test_an_old_runs_summary_counts_as_its_first_evaluation(run_copy, tmp_path):
    (run_copy / "evaluations.jsonl").unlink()  # a run from before evaluations were kept
    original = json.loads((run_copy / "summary.json").read_text())
    assert dgm("eval", "run", "eval.num_samples=5", cwd=tmp_path).returncode == 0
    assert json.loads((run_copy / "summary.json").read_text())["test_nll"] == original["test_nll"]


@pytest.mark.slow
def test_the_report_marks_exact_figures(tmp_path):
    result = dgm("train", "model=loglinear", "dataset=digits", *QUICK, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(exact)" in dgm("report", "run", cwd=tmp_path).stdout


def test_the_test_pass_logs_its_progress_and_the_devices(make_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(steps, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(steps, "COMPILE_NOTICE_SECONDS", 0.0)  # as if every program took long to compile
    with caplog.at_level("INFO"):
        summary = loop.run(make_config("dataset=digits", *QUICK, "eval.num_samples=200", "eval.sample_batch=1000"),
                            tmp_path)
    assert "computing on 1 device(s): cpu" in caplog.text and summary["devices"] == ["cpu"]
    progress = [line for line in caplog.text.splitlines() if "test log-likelihood:" in line]
    assert len(progress) >= 5 and "left" in progress[-1]  # 60 batches of 5 examples in 20 calls
    assert "compiling the training epoch for these shapes (" in caplog.text


def test_eval_logs_its_test_pass_as_a_training_does(run_copy, monkeypatch, capsys):
    monkeypatch.setattr(steps, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(steps, "COMPILE_NOTICE_SECONDS", 0.0)
    # The handler of Python's default format that absl gives the root logger when it first logs.
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(sys.stderr)])
    cli.evaluate([str(run_copy), "eval.num_samples=200", "eval.sample_batch=1000"])
    out, err = capsys.readouterr()
    assert "INFO:" not in err
    assert re.search(r"^\[\d\d:\d\d:\d\d\] testing epoch \d+ with 200 importance samples per example$", err, re.M)
    assert "compiling the test pass for these shapes (" in err
    progress = [line for line in err.splitlines() if "test log-likelihood:" in line]
    assert len(progress) >= 5 and re.search(r"\d+% after \d+ s, about \d+ s left$", progress[-1])
    assert f"kept in {run_copy / 'evaluations.jsonl'}" in out  # the figure and where it went, on stdout


@pytest.mark.slow
def test_a_terminated_run_names_its_directory_and_the_resume_command(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(["dgm", "train", "dataset=digits", "trainer.epochs=100000", "trainer.progress=false",
                                "hydra.run.dir=run"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    while process.poll() is None and not ((run / "metrics.jsonl").is_file() and
                                          (run / "metrics.jsonl").read_text().count('"validation"') >= 2):
        time.sleep(0.05)
    process.terminate()  # SIGTERM, as `kill` and Slurm's time limit send it
    assert process.wait(timeout=120) == 143
    err = process.stderr.read()
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]  # the last word: on a loaded machine XLA may warn of a slow compile before it
    assert re.fullmatch(rf"dgm: terminated; {run} keeps its checkpoint of epoch \d+; go on with: "
                        rf"dgm train resume={run}", line), line
    assert (run / "train.log").read_text().splitlines()[-1].endswith(line)


@pytest.mark.parametrize("signum, exception", [(signal.SIGTERM, interrupts.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_inside_a_checkpoint_write_is_raised_when_the_write_ends(signum, exception):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    finished = []
    try:
        with pytest.raises(exception):
            with interrupts.uninterruptible():
                with interrupts.uninterruptible():  # nested, as a save inside a close would be
                    os.kill(os.getpid(), signum)
                    time.sleep(0.01)  # the handler runs here, and must not raise
                    finished.append("inner")
                finished.append("outer")
        assert finished == ["inner", "outer"]
        with pytest.raises(exception):  # outside a block, at once
            os.kill(os.getpid(), signum)
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_an_interrupted_sweep_says_how_the_same_command_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_in_progress", [(tmp_path / "sweep" / "3", tmp_path / "sweep")])
    monkeypatch.setattr(cli, "_command", ["-m", "seed=0,1,2,3", "model.hidden=[200, 200]"])
    assert cli._interrupted("train", KeyboardInterrupt()) == (
        f"interrupted; {tmp_path}/sweep/3 had finished no epoch; go on with: dgm train resume={tmp_path}/sweep/3; "
        f"the whole sweep goes on with: dgm train -m seed=0,1,2,3 'model.hidden=[200, 200]' hydra.sweep.dir={tmp_path}/sweep")
    assert cli._interrupted("eval", interrupts.Terminated()) == "terminated; nothing of this dgm eval was kept, and the runs are as they were"


def test_the_data_a_killed_run_goes_on_with_must_be_its_own(make_config, tmp_path):
    path = tmp_path / "data.npz"
    images = (np.random.default_rng(0).random((300, 16)) < 0.3).astype(np.uint8)
    np.savez(path, train=images[:200], validation=images[200:250], test=images[250:])
    config = make_config("dataset=numpy", f"dataset.path={path}", *QUICK)
    loop.run(config, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # as if killed before its end
    images[0] = 1 - images[0]
    np.savez(path, train=images[:200], validation=images[200:250], test=images[250:])
    with pytest.raises(DgmError, match="the data of numpy changed since the checkpoint of epoch 2"):
        loop.run(config, tmp_path / "run")


@pytest.mark.slow
def test_a_run_refused_before_its_first_epoch_leaves_nothing_and_a_failed_one_its_reason(tmp_path):
    result = dgm("train", "dataset=digits", "model.latent_dim=0", "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(result, "model.latent_dim must be a positive integer")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")  # a folder of the user's own keeps what it had
    assert_one_line_error(dgm("train", "dataset=digits", "trainer.batch_size=0", "hydra.run.dir=mine", cwd=tmp_path))
    assert sorted(path.name for path in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    # A run that began to train keeps its reason, in FAILED and in train.log.
    result = dgm("train", "dataset=digits", "optimizer.lr=1e30", "trainer.progress=false", "hydra.run.dir=run",
                 cwd=tmp_path)
    assert_one_line_error(result, "training diverged")
    assert (tmp_path / "run" / "FAILED").read_text().strip() in result.stderr
    assert "dgm: error: training diverged" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_one_picture_and_a_bad_seed(tmp_path):
    result = dgm("train", "dataset=digits", *QUICK, "trainer.num_pictures=1", "hydra.run.dir=one", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "one" / "FAILED").exists()
    assert_one_line_error(dgm("train", "dataset=digits", "seed=abc", "hydra.run.dir=bad", cwd=tmp_path),
                          "seed must be an integer, got 'abc'")


def test_a_closed_pipe_ends_quietly(tmp_path):
    reader = subprocess.Popen(["dgm", "train", "--cfg", "job"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    reader.stdout.close()  # as `| head` does once it has its lines
    assert reader.wait(timeout=120) != 0
    assert reader.stderr.read() == ""


@pytest.mark.slow
def test_a_rerun_can_choose_another_config_group(finished_run, tmp_path):
    result = dgm("rerun", str(finished_run), "optimizer=sgd", "hydra.run.dir=sgd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "sgd" / ".hydra" / "config.yaml").read_text()
    assert "name: sgd" in config and "num_samples: 20" in config  # the run's own overrides, and the new group
    # A rerun of the saved config records the run's overrides, then its own: what it ran with.
    assert dgm("rerun", str(finished_run), "seed=1", "hydra.run.dir=again", cwd=tmp_path).returncode == 0
    overrides = OmegaConf.load(finished_run / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(tmp_path / "again" / ".hydra" / "overrides.yaml") == [*overrides, "seed=1"]
    [row] = report.table(report.find_runs(tmp_path / "again"))
    assert row["config"] == " ".join(sorted(overrides)) and row["config"] != "(defaults)"
    # Overrides that no longer compose a run's config (the configs changed since): say so.
    (tmp_path / "again" / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["dataset=digits", "seed=1"]))
    assert_one_line_error(dgm("rerun", "again", "optimizer=sgd", cwd=tmp_path),
                          "dgm rerun cannot apply optimizer=sgd", "start it afresh with dgm train")


def test_a_report_row_aggregates_finished_runs_one_per_seed_and_counts_every_status(finished_run, tmp_path):
    for name in ("a", "rerun", "unfinished", "failed"):
        shutil.copytree(finished_run, tmp_path / "runs" / name)
    (tmp_path / "runs" / "unfinished" / "summary.json").unlink()  # as if killed
    (tmp_path / "runs" / "failed" / "summary.json").unlink()
    (tmp_path / "runs" / "failed" / "FAILED").write_text("training diverged\n")
    [row] = report.table(report.find_runs(tmp_path / "runs"))
    summary = json.loads((finished_run / "summary.json").read_text())
    assert row["runs"] == 4 and row["n"] == 1 and row["status"] == "2 finished, 1 failed, 1 unfinished"
    assert row["test_nll"] == pytest.approx(summary["test_nll"]) and row["test_nll_std"] is None  # one seed
    assert row["test_nll_stderr"] == pytest.approx(summary["test_nll_stderr"], rel=1e-4)  # over images, not 0.00
    assert row["config"] == "(the shared overrides)"


def test_resume_takes_where_and_how_it_runs_and_nothing_else(finished_run):
    run = str(finished_run.absolute())
    (finished_run / "summary.json").rename(finished_run / "summary.json.kept")
    try:
        arguments = cli._train_arguments([f"resume={finished_run}", "distributed.process_id=1",
                                          "trainer.progress=false"])
        assert f"hydra.run.dir='{run}'" in arguments and "distributed.process_id=1" in arguments
        with pytest.raises(DgmError, match="resume=RUN takes no seed=3"):
            cli._train_arguments([f"resume={finished_run}", "seed=3"])
    finally:
        (finished_run / "summary.json.kept").rename(finished_run / "summary.json")


@pytest.mark.slow
def test_a_finished_run_goes_on_to_more_epochs_and_ends_as_one_trained_that_long(tmp_path):
    def records(run):  # every value but the timings
        return [{k: v for k, v in json.loads(line).items() if k not in ("examples_per_sec", "seconds")}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    constant = ["dataset=digits", *QUICK, "schedule=constant"]  # two epochs
    assert dgm("train", *constant, "hydra.run.dir=short", cwd=tmp_path).returncode == 0
    result = dgm("train", "resume=short", "trainer.epochs=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert dgm("train", *constant, "trainer.epochs=4", "hydra.run.dir=long", cwd=tmp_path).returncode == 0
    assert records("short") == records("long")
    log = (tmp_path / "short" / "train.log").read_text()
    assert "epoch 4/4" in log and "][dgm_cli" not in log  # the resumed part logs as the first did
    short, long = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("short", "long"))
    assert short["test_nll"] == long["test_nll"] and short["epochs"] == short["epochs_trained"] == 4
    evaluations = [json.loads(line) for line in (tmp_path / "short" / "evaluations.jsonl").read_text().splitlines()]
    assert len(evaluations) == 2 and evaluations[-1]["nll"] == long["test_nll"]  # the two-epoch figure is kept
    assert "epochs: 4" in (tmp_path / "short" / ".hydra" / "config.yaml").read_text()
    assert (tmp_path / "short" / ".hydra" / "overrides.yaml").read_text().strip().endswith("- trainer.epochs=4")
    result = dgm("train", *constant, "trainer.epochs=4", "hydra.run.dir=short", cwd=tmp_path)
    assert "has finished already; nothing to do" in result.stdout  # it is a four-epoch run now

    assert dgm("train", "dataset=digits", *QUICK, "schedule=cosine", "hydra.run.dir=cosine", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "cosine")
    assert_one_line_error(dgm("train", "resume=cosine", "trainer.epochs=4", cwd=tmp_path),
                          "cannot go on to trainer.epochs=4: its schedule.name=cosine is shaped by its 2 epochs")
    assert_one_line_error(dgm("train", "resume=short", "trainer.epochs=3", cwd=tmp_path),
                          'trainer.epochs 4 in the run, 3 here')
    assert snapshot(tmp_path / "cosine") == before


def test_more_epochs_only_by_resume_a_command_aimed_at_the_run_is_refused(run_copy, tmp_path):
    # `hydra.run.dir=RUN` must ask for the run's own config; going on to more epochs is asked for
    # by name (`resume=RUN`), so that a command with one setting changed cannot grow a run.
    hydra_files = {name: (run_copy / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml")}
    before = snapshot(run_copy)
    result = dgm("train", "dataset=digits", *QUICK, "trainer.epochs=3", "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(result, "holds a run of another config", "trainer.epochs 2 in the run, 3 here",
                          f"`dgm train resume={run_copy} trainer.epochs=3`")
    assert {name: (run_copy / ".hydra" / name).read_bytes() for name in hydra_files} == hydra_files
    assert (run_copy / "summary.json").is_file() and snapshot(run_copy) == before


def as_saved_before_new_settings(run, settings):
    """Strip `settings` ({group: [key, …]}) from the run's saved config, as a dgm that had not
    gained them yet would have written it."""
    import yaml

    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for group, keys in settings.items():
        for key in keys:
            config[group].pop(key)
    path.write_text(yaml.safe_dump(config))


def test_a_run_saved_before_a_setting_existed_reads_as_run_with_its_default(run_copy, tmp_path):
    as_saved_before_new_settings(run_copy, {"model": ["prior", "num_pseudo_inputs", "kl_warmup_epochs", "free_bits"],
                                            "trainer": ["diagnostics_every", "diagnostics_estimates", "patience", "min_delta"]})
    result = dgm("train", "dataset=digits", *QUICK, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0 and "has finished already; nothing to do" in result.stdout
    result = dgm("train", "dataset=digits", *QUICK, "model.prior=vamp", "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(result, "holds a run of another config", 'model.prior "standard" in the run, "vamp" here')
    result = dgm("eval", "run", "eval.num_samples=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
