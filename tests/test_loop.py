"""Short real training runs through `loop.run`, in a temporary run directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dgm_cli import data as data_lib
from dgm_cli import loop
from dgm_cli.checkpoints import Checkpoints
from dgm_cli.errors import DgmError
from tests.conftest import QUICK

SUMMARY_KEYS = {"test_nll", "test_nll_samples", "test_neg_elbo", "best_epoch", "epochs",
                "train_examples_per_sec", "wall_seconds"}


def test_two_epochs_on_digits_fill_the_run_directory(make_config, tmp_path):
    summary = loop.run(make_config("dataset=digits", *QUICK), tmp_path)

    assert SUMMARY_KEYS <= set(summary) and summary["epochs"] == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert 10 < summary["test_nll"] < summary["test_neg_elbo"] < 60  # 64 binary pixels: < 44 nats
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in records] == [
        (1, "train"), (1, "validation"), (2, "train"), (2, "validation"), (summary["best_epoch"], "test")
    ]
    assert {"loss", "neg_elbo", "recon", "kl", "examples_per_sec"} <= set(records[0])
    assert records[0]["step"] == 1197 // 128
    kept = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert kept == {"2", str(summary["best_epoch"])}  # the latest and the best
    assert any((tmp_path / "tensorboard").iterdir())
    for name in ("samples.png", "reconstructions.png"):
        picture = np.asarray(Image.open(tmp_path / "samples" / name))
        assert picture.shape[1] >= 256 and picture.std() > 0


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_iwae_bound_trains_a_better_model(make_config, tmp_path):
    overrides = ["dataset=digits", "trainer.progress=false", "trainer.epochs=8", "eval.num_samples=200"]
    elbo = loop.run(make_config(*overrides), tmp_path / "elbo")
    iwae = loop.run(make_config(*overrides, "model.num_samples=5"), tmp_path / "iwae")
    records = [json.loads(line) for line in (tmp_path / "elbo" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0] - 5
    # Trained on the IWAE bound (k = 5), the same network with the same seed and epochs reaches a
    # better test log-likelihood (Burda et al. 2016): by 0.8 to 1.3 nats for seeds 0 to 4 here.
    assert iwae["test_nll"] < elbo["test_nll"] - 0.3, (iwae["test_nll"], elbo["test_nll"])


def metric_values(run_dir):
    timing = {"examples_per_sec", "seconds"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(make_config, tmp_path):
    first = loop.run(make_config("dataset=bars", *QUICK), tmp_path / "a")
    again = loop.run(make_config("dataset=bars", *QUICK), tmp_path / "b")
    other = loop.run(make_config("dataset=bars", *QUICK, "seed=1"), tmp_path / "c")
    assert metric_values(tmp_path / "a") == metric_values(tmp_path / "b")
    assert first["test_nll"] == again["test_nll"] != other["test_nll"]
    assert first["true_test_nll"] == other["true_test_nll"]  # the data seed is the data set's own


@pytest.mark.parametrize("count", [1, 3])
def test_a_run_with_fewer_pictures_than_a_row(make_config, tmp_path, count):
    """One picture leaves no test image to reconstruct (the runner shows count // 2 of them)."""
    loop.run(make_config("model=loglinear", "dataset=bars", *QUICK, f"trainer.num_pictures={count}"), tmp_path)
    for name in ("samples.png", "reconstructions.png", "components.png"):
        assert Image.open(tmp_path / "samples" / name).size[0] >= 256


def test_divergence_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(make_config, tmp_path):
    # The learning rate grows a thousand-fold each epoch: epoch 1 survives, epoch 2 blows up.
    overrides = ["dataset=digits", "optimizer=sgd", "optimizer.lr=1e-3", "schedule=exponential",
                 "schedule.decay_rate=1e3", "schedule.decay_epochs=1", "trainer.epochs=5", "trainer.progress=false"]
    with pytest.raises(DgmError, match=r"diverged: .* at epoch 2, step 1\d; the last good checkpoint \(epoch 1\)"):
        loop.run(make_config(*overrides), tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.epochs=0", "trainer.epochs must be a positive integer, got 0"),
        ("trainer.batch_size=-4", "trainer.batch_size must be a positive integer"),
        ("trainer.batch_size=5000", "exceeds the 1197 training examples"),
        ("eval.num_samples=0", "eval.num_samples must be a positive integer"),
        ("model.latent_dim=0", "model.latent_dim must be a positive integer"),
        ("model.hidden=[400,0]", "every entry of model.hidden must be a positive integer"),
        ("model.hidden=400", "model.hidden must be a list of positive integers"),
        ("model.num_samples=0", "model.num_samples must be a positive integer"),
        ("model.activation=swish3", "unknown model.activation 'swish3'; choose from: elu, gelu"),
        ("optimizer.lr=-1", "optimizer.lr must be a positive number"),
        ("trainer.patience=-1", "trainer.patience must be a non-negative integer, got -1"),
        ("trainer.min_delta=-0.1", "trainer.min_delta must be a non-negative number, got -0.1"),
        ("+optimizer.foo=1", "optimizer adam: .*foo"),
    ],
)
def test_bad_settings_are_refused_before_training(make_config, tmp_path, override, message):
    with pytest.raises(DgmError, match=message):
        loop.run(make_config("dataset=digits", *QUICK, override), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_resumes_where_it_runs_from_but_not_with_another_config(make_config, tmp_path):
    first = loop.run(make_config("dataset=digits", *QUICK), tmp_path)
    (tmp_path / "summary.json").unlink()  # as if killed before its end
    # Another cache directory and a progress bar: where and how it runs, not what it trains.
    again = loop.run(make_config("dataset=digits", *QUICK, f"cache_dir={tmp_path / 'cache'}",
                                  "trainer.progress=true"), tmp_path)
    assert again["test_nll"] == first["test_nll"]
    (tmp_path / "summary.json").unlink()
    with pytest.raises(DgmError, match="holds checkpoints of another config"):
        loop.run(make_config("dataset=digits", *QUICK, "optimizer.lr=0.01"), tmp_path)


@pytest.mark.slow
def test_the_test_figures_are_those_of_the_best_epochs_parameters(make_config, tmp_path):
    # 100 classes for 1197 digits: EM overfits, so validation is best early and the last epoch is worse.
    config = make_config("model=loglinear", "dataset=digits", "model.num_components=100", "trainer.epochs=15",
                         "trainer.progress=false")
    summary = loop.run(config, tmp_path)
    assert summary["best_epoch"] < 15
    settings = loop.Settings.from_config(config)
    data = data_lib.load(config.dataset)
    model = loop.build_model(config, data.spec, settings)
    test_images = jnp.asarray(data.test, jnp.float32)
    with Checkpoints(tmp_path / "checkpoints") as checkpoints:
        exact = {epoch: -float(jnp.mean(model.log_likelihood(
                     checkpoints.restore(epoch, like=jax.eval_shape(model.init, jax.random.key(0))), test_images, None, 0)))
                 for epoch in (summary["best_epoch"], 15)}
    assert summary["test_nll"] == pytest.approx(exact[summary["best_epoch"]], abs=1e-4)
    assert abs(exact[15] - exact[summary["best_epoch"]]) > 0.1


@pytest.mark.slow
def test_patience_stops_after_epochs_without_a_better_validation_value_and_tests_the_best(make_config, tmp_path):
    # As above: EM overfits 1197 digits with 100 classes, so validation stops improving early.
    config = make_config("model=loglinear", "dataset=digits", "model.num_components=100", "trainer.epochs=15",
                         "trainer.progress=false", "trainer.patience=2")
    summary = loop.run(config, tmp_path)
    assert summary["epochs_trained"] == summary["best_epoch"] + 2 < 15
    assert summary["stop_reason"] == (f"trainer.patience=2: no better validation value in the 2 epochs after "
                                      f"epoch {summary['best_epoch']}")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in records if r["split"] == "train") == summary["epochs_trained"]
    (tmp_path / "summary.json").unlink()  # killed after it stopped, before its test: it stops again at once
    assert loop.run(config, tmp_path) == {**summary, "wall_seconds": pytest.approx(0, abs=1e9),
                                          "startup_seconds": pytest.approx(0, abs=1e9),
                                          "test_per_image": "evaluations/0001.npy"}  # kept beside the first


@pytest.mark.slow
def test_min_delta_decides_what_counts_as_better(make_config, tmp_path):
    summary = loop.run(make_config("dataset=digits", *QUICK, "trainer.epochs=5", "trainer.patience=1",
                                   "trainer.min_delta=1000"), tmp_path)
    assert (summary["best_epoch"], summary["epochs_trained"], summary["epochs"]) == (1, 2, 5)
    assert loop.run(make_config("dataset=digits", *QUICK), tmp_path / "plain")["stop_reason"] == "trainer.epochs=2 reached"


@pytest.mark.slow
def test_a_dynamically_binarised_run_trains_on_fresh_draws_and_tests_on_the_fixed_one(make_config, tmp_path):
    runs = {protocol: loop.run(make_config("dataset=digits", f"dataset.binarize={protocol}", *QUICK), tmp_path / protocol)
            for protocol in ("static", "dynamic")}
    train = {protocol: [json.loads(line) for line in (tmp_path / protocol / "metrics.jsonl").read_text().splitlines()]
             for protocol in runs}
    assert train["static"][0]["loss"] != train["dynamic"][0]["loss"]  # other training images
    assert all(np.isfinite(summary["test_nll"]) for summary in runs.values())
