"""logger=mlflow and logger=wandb for real, offline: MLflow's file store and W&B's offline run
directory, read back with their own clients and formats."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import QUICK
from tests.test_cli import assert_one_line_error, dgm

WANDB_BLOCK = 32 * 1024  # W&B's run file is a LevelDB-style log of protobuf records in 32 KiB blocks


def wandb_records(path):
    """The protobuf Records of a W&B .wandb file."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    records, pending, position = [], b"", 7  # after the file header
    while position + 7 <= len(raw):
        if WANDB_BLOCK - position % WANDB_BLOCK < 7:  # a block's tail too short for a header: padding
            position += WANDB_BLOCK - position % WANDB_BLOCK
            continue
        length, kind = int.from_bytes(raw[position + 4:position + 6], "little"), raw[position + 6]
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def name(item) -> str:
    """A W&B record item's key: plain, or nested as ["validation/loss"] or ["samples/x", "path"]."""
    return item.key or ".".join(item.nested_key)


@pytest.mark.slow
def test_mlflow_gets_the_config_every_metric_the_summary_and_the_pictures(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks it of a file store's readers too
    store = f"file:{tmp_path / 'mlruns'}"
    result = dgm("train", "dataset=digits", *QUICK, "logger=mlflow", f"logger.tracking_uri={store}",
                 "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("dgm").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "vae" and run.data.params["dataset.name"] == "digits"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation/loss")] == [9, 18]
    assert run.data.metrics["summary/test_nll"] == pytest.approx(summary["test_nll"])
    assert run.data.metrics["test/nll"] == pytest.approx(summary["test_nll"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "samples"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png",
                                                                                   "samples/reconstructions.png"}
    # The README's `MLFLOW_ALLOW_FILE_STORE=true mlflow ui`, beside ./mlruns, serves the run.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["mlflow", "ui", "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        page = None
        for _ in range(600):  # it starts in about 10 s on 2 busy cores
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        assert page is not None and "<html" in page.lower()
        served = MlflowClient(f"http://127.0.0.1:{port}")
        [shown] = served.search_runs([served.get_experiment_by_name("dgm").experiment_id])
        assert shown.info.run_id == run.info.run_id and shown.data.metrics["test/nll"] == run.data.metrics["test/nll"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=60)


@pytest.mark.slow
def test_wandb_offline_keeps_the_config_every_metric_the_summary_and_the_pictures_in_the_run(tmp_path):
    result = dgm("train", "dataset=digits", *QUICK, "logger=wandb", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    [offline] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    run_id = (tmp_path / "run" / ".wandb-run").read_text().strip()
    records = wandb_records(offline / f"run-{run_id}.wandb")
    config = {item.key: json.loads(item.value_json) for r in records if r.HasField("run") for item in r.run.config.update}
    assert config["model"]["name"] == "vae" and config["dataset"]["name"] == "digits"
    history = [{name(item): json.loads(item.value_json) for item in r.history.item} for r in records if r.HasField("history")]
    assert [(h["epoch"], round(h["validation/loss"], 4)) for h in history if "validation/loss" in h] == [
        (json.loads(line)["epoch"], round(json.loads(line)["loss"], 4))
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"validation"' in line]
    summaries = {name(item): json.loads(item.value_json) for r in records if r.HasField("summary") for item in r.summary.update}
    assert summaries["test_nll"] == pytest.approx(summary["test_nll"])
    assert {path.name.split("_")[0] for path in (offline / "files" / "media" / "images" / "samples").iterdir()} == {
        "samples", "reconstructions"}


def test_an_unknown_tracker_is_named_in_one_line(tmp_path):
    assert_one_line_error(dgm("train", "dataset=digits", "logger=neptune", cwd=tmp_path),
                          "unknown logger 'neptune'; choose from: mlflow, tensorboard, wandb")
