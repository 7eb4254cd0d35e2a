"""The data loaders: the real prepared binarized_mnist, TFDS through its mock, built-in sets, files."""

import dataclasses
import itertools
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from omegaconf import OmegaConf

from dgm_cli import data, steps
from dgm_cli.errors import DgmError


def tfds_config(**overrides):
    config = {"name": "binarized_mnist", "loader": "tfds", "tfds_name": "binarized_mnist", "image_key": "image", "data_dir": None}
    return OmegaConf.create({**config, **overrides})


def tfds_metadata(data_dir, name, sizes) -> str:
    """`data_dir` with the dataset_info.json of a prepared `name` whose splits have these sizes.
    With it mock_data mocks from files (MockPolicy.USE_FILES): the builder knows which splits
    exist, as a prepared one does, while the mock source stands in for the records."""
    version = str(tfds.builder_cls(name).VERSION)
    folder = data_dir / name / version
    folder.mkdir(parents=True)
    splits = [{"name": split, "shardLengths": [str(size)], "numBytes": "0"} for split, size in sizes.items()]
    info = {"name": name, "version": version, "fileFormat": "array_record", "splits": splits}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return str(data_dir)


def numpy_config(path, **overrides):
    config = {"name": "numpy", "loader": "numpy", "path": str(path), "image_shape": None, "validation_fraction": 0.1, "seed": 0}
    return OmegaConf.create({**config, **overrides})


@pytest.mark.slow
def test_reads_the_prepared_binarized_mnist_and_keeps_a_decoded_copy(tmp_path):
    mnist = data.load(tfds_config(), tmp_path)  # decoding the PNGs is most of this test's time: once
    assert (mnist.train.shape, mnist.validation.shape, mnist.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert mnist.train.dtype == np.uint8 and set(np.unique(mnist.test)) == {0, 1}
    assert mnist.image_shape == (28, 28)
    # Same images as the original files, whatever order TFDS keeps them in: ~13% of pixels are on.
    assert 0.12 < mnist.test.mean() < 0.14
    [cached] = list(tmp_path.glob("binarized_mnist-*.npz"))
    again = data.load(tfds_config(), tmp_path)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(again, split), getattr(mnist, split))
    assert again.spec == mnist.spec
    json.dumps(dataclasses.asdict(again.spec))  # checkpoints record it as JSON


def seven_random_images(builder, split, **kwargs):
    """A mock TFDS source: seven random binary 28x28 records per split, the same for a split each time."""
    rng = np.random.default_rng(len(split))
    return [{"image": rng.integers(0, 2, (28, 28, 1), dtype=np.uint8)} for _ in range(7)]


def test_a_damaged_decoded_copy_is_decoded_afresh_and_replaced(tmp_path):
    data_dir = tfds_metadata(tmp_path, "binarized_mnist", {"train": 7, "validation": 7, "test": 7})
    with tfds.testing.mock_data(as_data_source_fn=seven_random_images, data_dir=data_dir):
        decoded = data.load(tfds_config(data_dir=data_dir), tmp_path / "cache")
        [cached] = list((tmp_path / "cache").glob("binarized_mnist-*.npz"))
        cached.write_bytes(b"damaged")
        again = data.load(tfds_config(data_dir=data_dir), tmp_path / "cache")
    np.testing.assert_array_equal(again.test, decoded.test)
    with np.load(cached) as replaced:
        np.testing.assert_array_equal(replaced["test"][..., 0], decoded.test.reshape(7, 28, 28))


def test_tfds_code_path_on_mock_data(tmp_path):
    data_dir = tfds_metadata(tmp_path, "binarized_mnist", {"train": 50000, "validation": 10000, "test": 10000})
    with tfds.testing.mock_data(as_data_source_fn=seven_random_images, data_dir=data_dir):
        mock = data.load(tfds_config(data_dir=data_dir))
    assert mock.train.shape == mock.validation.shape == (7, 784) and mock.image_shape == (28, 28)
    assert set(np.unique(mock.train)) == {0, 1}


@pytest.mark.parametrize("error", [ValueError("shard 3 of 4 is truncated"), KeyError("validation"), OSError("disk I/O")])
def test_a_tfds_validation_split_that_fails_to_load_stops_the_run_instead_of_a_hold_out(tmp_path, error):
    def mock_source(builder, split, **kwargs):
        if split == "validation":
            raise error
        return [{"image": np.zeros((28, 28, 1), np.uint8)}] * 10

    # binarized_mnist has a validation split of its own: 45k / 5k of train would be another benchmark.
    data_dir = tfds_metadata(tmp_path, "binarized_mnist", {"train": 50000, "validation": 10000, "test": 10000})
    with tfds.testing.mock_data(as_data_source_fn=mock_source, data_dir=data_dir):
        with pytest.raises(DgmError) as raised:
            data.load(tfds_config(data_dir=data_dir))
    message = str(raised.value)
    assert message.startswith("cannot read the validation split of TFDS binarized_mnist in ") and "\n" not in message
    assert message.endswith(f"{type(error).__name__}: {data._first_line(error)}")


def test_a_tfds_set_without_its_train_split_says_which_splits_it_has(tmp_path):
    data_dir = tfds_metadata(tmp_path, "mnist", {"test": 10, "extra": 10})
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kwargs: [], data_dir=data_dir):
        with pytest.raises(DgmError, match=r"TFDS mnist in .* has no train split \(it has: test, extra\)"):
            data.load(tfds_config(tfds_name="mnist", data_dir=data_dir))


def test_missing_tfds_data_offline_names_the_way_out(tmp_path):
    with pytest.raises(DgmError, match="TFDS_DATA_DIR.*dataset=digits"):
        data.load(tfds_config(data_dir=str(tmp_path)))


def test_unknown_tfds_name():
    with pytest.raises(DgmError, match="no data set"):
        data.load(tfds_config(tfds_name="no_such_data_set_here"))


def test_digits_are_binary_8x8_and_split_apart():
    config = OmegaConf.create({"name": "digits", "loader": "digits", "threshold": 8, "validation_size": 300, "test_size": 300, "seed": 0})
    digits = data.load(config)
    assert (len(digits.train), len(digits.validation), len(digits.test)) == (1197, 300, 300)
    assert digits.image_shape == (8, 8) and set(np.unique(digits.train)) == {0, 1}
    assert digits.spec.num_classes == 10 and len(digits.labels["test"]) == 300
    batches = digits.batches()
    assert batches["validation"]["x"].shape == (300, 64) and batches["validation"]["labels"].dtype == np.int32


def test_digits_kept_in_the_cache_read_as_scikit_learn_gives_them(tmp_path):
    config = OmegaConf.create({"name": "digits", "loader": "digits", "binarize": "threshold", "threshold": 0.5,
                               "validation_size": 300, "test_size": 300, "seed": 0})
    fresh = data.load(config)
    first = data.load(config, tmp_path)  # reads scikit-learn's copy and keeps it
    [kept] = tmp_path.glob("digits-scikit-learn-*.npz")
    kept_at = kept.stat().st_mtime_ns
    again = data.load(config, tmp_path)  # from the kept copy, which stays as it was
    assert kept.stat().st_mtime_ns == kept_at
    kept.write_bytes(b"damaged")
    repaired = data.load(config, tmp_path)  # read afresh, and kept again
    for loaded in (first, again, repaired):
        for split in ("train", "validation", "test"):
            np.testing.assert_array_equal(getattr(loaded, split), getattr(fresh, split))
            np.testing.assert_array_equal(loaded.labels[split], fresh.labels[split])
    assert kept_at < kept.stat().st_mtime_ns and np.load(kept)["images"].shape == (1797, 8, 8)


BARS = dict(size=3, bar_prob=0.3, vertical_prob=0.7)


def test_bars_log_prob_is_a_distribution_over_all_images():
    images = np.array(list(itertools.product([0, 1], repeat=9)))  # every 3×3 image
    log_p = data.bars_log_prob(images, **BARS)
    assert np.isclose(np.exp(log_p).sum(), 1.0)
    # all-off and all-on images arise from both orientations, every other bar image from one
    assert np.isclose(np.exp(log_p[0]), 0.7**3)
    assert np.count_nonzero(np.isfinite(log_p)) == 2 * 2**3 - 2


def test_bars_samples_follow_their_log_prob():
    samples = data.sample_bars(np.random.default_rng(0), 100_000, **BARS)
    images, counts = np.unique(samples, axis=0, return_counts=True)
    np.testing.assert_allclose(counts / len(samples), np.exp(data.bars_log_prob(images, **BARS)), atol=0.005)


def test_bars_data_set_knows_its_true_nll():
    config = OmegaConf.create({"name": "bars", "loader": "bars", "size": 4, "bar_prob": 0.2, "vertical_prob": 0.5,
                               "train_size": 100, "validation_size": 50, "test_size": 2000, "seed": 0})
    bars = data.load(config)
    all_images = np.array(list(itertools.product([0, 1], repeat=16)))
    p = np.exp(data.bars_log_prob(all_images, 4, 0.2, 0.5))
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    assert bars.image_shape == (4, 4) and abs(bars.true_test_nll - entropy) < 0.1


def test_numpy_file_with_images_and_no_validation(tmp_path):
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, train=rng.integers(0, 2, (50, 5, 6)), test=rng.integers(0, 2, (10, 5, 6)).astype(bool))
    loaded = data.load(numpy_config(path))
    assert (len(loaded.train), len(loaded.validation), loaded.dim, loaded.image_shape) == (45, 5, 30, (5, 6))


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"train": np.zeros((0, 4)), "test": np.zeros((3, 4))}, "train split .* is empty"),
        ({"train": np.full((3, 4), 0.5), "test": np.zeros((3, 4))},
         "train split .* is not binary \\(it has values such as 0.5\\): choose how to binarise it with "
         "dataset.binarize=threshold\\|static\\|dynamic"),
        ({"train": np.full((3, 4), 300), "test": np.zeros((3, 4))}, "not binary"),
        ({"train": np.array([[0, 1], [np.nan, 1]]), "test": np.zeros((3, 2))}, "contains NaN"),
        ({"train": np.zeros((3, 4)), "validation": np.zeros((2, 4)), "test": np.zeros((3, 5))},
         "different widths: train 4, validation 4, test 5"),
        ({"train": np.zeros((3, 4))}, "no 'test' array \\(found: train\\)"),
        ({"train": np.zeros((3, 4, 2, 2)), "test": np.zeros((3, 4))}, "shape \\(3, 4, 2, 2\\)"),
        ({"train": np.array([["a", "b"]]), "test": np.zeros((3, 4))}, "not numeric"),
    ],
)
def test_bad_numpy_files_are_refused_with_the_reason(tmp_path, arrays, message):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(DgmError, match=message):
        data.load(numpy_config(path))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DgmError, match="not found"):
        data.load(numpy_config(tmp_path / "nowhere.npz"))
    (tmp_path / "junk.npz").write_text("not a zip file")
    with pytest.raises(DgmError, match="cannot read"):
        data.load(numpy_config(tmp_path / "junk.npz"))
    with pytest.raises(DgmError, match="dataset.path=FILE.npz"):
        data.load(numpy_config(""))


def grey_npz(path, rng=np.random.default_rng(0)):
    np.savez(path, train=rng.integers(0, 256, (40, 4, 4), dtype=np.uint8),
             validation=rng.random((10, 4, 4)), test=rng.integers(0, 256, (20, 16)))
    return path


def test_grayscale_files_binarise_as_asked_and_refuse_other_values(tmp_path):
    path = grey_npz(tmp_path / "grey.npz")
    with pytest.raises(DgmError, match="choose how to binarise it with dataset.binarize"):
        data.load(numpy_config(path))
    with np.load(path) as file:
        raw = {split: file[split].reshape(len(file[split]), -1) for split in file.files}
    threshold = data.load(numpy_config(path, binarize="threshold", threshold=0.5))
    np.testing.assert_array_equal(threshold.train, raw["train"] > 127.5)  # 0–255 read as intensities
    np.testing.assert_array_equal(threshold.validation, raw["validation"] > 0.5)  # [0, 1] as they are
    with pytest.raises(DgmError, match="unknown dataset.binarize 'stochastic'; choose from: dynamic, static, threshold"):
        data.load(numpy_config(path, binarize="stochastic"))
    np.savez(tmp_path / "bad.npz", train=np.array([[0.0, 300.0, 1.0, 0.5]] * 3), test=np.zeros((3, 4)))
    with pytest.raises(DgmError, match=r"values in \[0, 300\]; grayscale data must lie in \[0, 1\] or 0–255"):
        data.load(numpy_config(tmp_path / "bad.npz", binarize="static"))


@pytest.mark.parametrize("protocol", data.BINARIZE)
def test_binary_data_refuse_a_binarisation_in_one_line(tmp_path, protocol):
    # dataset.binarize says how grey levels become binary: on binary data a run would be recorded
    # under a protocol it did not follow (dynamic draws of 0s and 1s are no draws at all).
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "binary.npz", train=rng.integers(0, 2, (20, 16)), test=rng.integers(0, 2, (5, 16)))
    with pytest.raises(DgmError) as error:
        data.load(numpy_config(tmp_path / "binary.npz", binarize=protocol))
    assert f"is binary already: drop dataset.binarize={protocol} (or set it to null)" in str(error.value)
    assert "\n" not in str(error.value)


def test_static_draws_once_and_dynamic_leaves_train_to_the_epochs_with_the_same_test_set(tmp_path):
    path = grey_npz(tmp_path / "grey.npz")
    static = data.load(numpy_config(path, binarize="static", binarize_seed=0))
    again = data.load(numpy_config(path, binarize="static", binarize_seed=0))
    other = data.load(numpy_config(path, binarize="static", binarize_seed=1))
    dynamic = data.load(numpy_config(path, binarize="dynamic", binarize_seed=0))
    assert set(np.unique(static.train)) == {0, 1} and not static.dynamic and dynamic.dynamic
    assert static.fingerprint() == again.fingerprint() != other.fingerprint()
    np.testing.assert_array_equal(dynamic.test, static.test)  # test figures compare between protocols
    np.testing.assert_array_equal(dynamic.validation, static.validation)
    with np.load(path) as file:
        np.testing.assert_array_equal(dynamic.train, file["train"].reshape(40, -1))  # the grey levels


def test_a_dynamic_draw_turns_each_pixel_on_with_its_intensity():
    levels = jnp.asarray(np.array([[0, 51, 128, 255]] * 20000, np.uint8))
    drawn = np.asarray(steps.draw_pixels(levels, jax.random.key(0)))
    assert drawn.dtype == np.uint8 and set(np.unique(drawn)) == {0, 1}
    np.testing.assert_allclose(drawn.mean(axis=0), [0, 0.2, 128 / 255, 1], atol=0.01)
    assert not np.array_equal(drawn, np.asarray(steps.draw_pixels(levels, jax.random.key(1))))


def test_the_real_grayscale_digits_under_each_protocol():
    config = {"name": "digits", "loader": "digits", "validation_size": 300, "test_size": 300, "seed": 0,
              "threshold": 0.5, "binarize_seed": 0}
    by_threshold = data.load(OmegaConf.create({**config, "binarize": "threshold"}))
    old_style = data.load(OmegaConf.create({**config, "threshold": 8}))  # a config saved before the protocols
    assert by_threshold.fingerprint() == old_style.fingerprint()
    static = data.load(OmegaConf.create({**config, "binarize": "static"}))
    dynamic = data.load(OmegaConf.create({**config, "binarize": "dynamic"}))
    assert set(np.unique(static.train)) == {0, 1} and dynamic.train.max() == 255 and len(np.unique(dynamic.train)) == 17
    np.testing.assert_array_equal(dynamic.test, static.test)
    assert 0.02 < np.mean(static.test != by_threshold.test) < 0.2  # the grey pixels, drawn


def test_tfds_grayscale_sets_without_a_validation_split_on_mock_data(tmp_path, caplog):
    def mock_source(builder, split, **kwargs):
        if split == "validation":
            pytest.fail("the builder's info says there is no validation split: it must not be read")
        rng = np.random.default_rng(len(split))
        return [{"image": rng.integers(0, 256, (56, 42, 3), dtype=np.uint8)} for _ in range(20)]

    data_dir = tfds_metadata(tmp_path, "mnist", {"train": 20, "test": 20})  # as TFDS's mnist: no validation
    config = OmegaConf.create({"name": "tfds", "loader": "tfds", "tfds_name": "mnist", "image_key": "image",
                               "data_dir": data_dir, "image_size": [28, 21], "invert": True,
                               "validation_fraction": 0.25, "seed": 0, "binarize": None})
    with tfds.testing.mock_data(as_data_source_fn=mock_source, data_dir=data_dir):
        with pytest.raises(DgmError, match="choose how to binarise it with dataset.binarize"):
            data.load(config)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dgm_cli.data"):
            loaded = data.load(OmegaConf.merge(config, {"binarize": "dynamic"}))
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (15, 5, 20)
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "has no validation split: holding out 5 of its 20 train examples" in warning.getMessage()
    assert loaded.image_shape == (28, 21) and loaded.dynamic and set(np.unique(loaded.test)) == {0, 1}


PRESETS = Path(__file__).resolve().parents[1] / "configs" / "dataset"


@pytest.mark.parametrize("preset,sizes,image", [
    ("mnist_dynamic", {"train": 60000, "test": 10000}, (28, 28, 1)),  # TFDS's splits, as prepared
    ("fashion_mnist_dynamic", {"train": 60000, "test": 10000}, (28, 28, 1)),
    # TFDS's omniglot: the background and evaluation alphabets (its small1, small2 go unused); its
    # scans are 105×105, smaller here only to spare the memory of 32 460 copies
    ("omniglot_dynamic", {"train": 19280, "test": 13180, "small1": 2720, "small2": 3120}, (35, 35, 3)),
])
def test_the_dynamic_presets_split_as_their_comments_say(tmp_path, preset, sizes, image):
    text = (PRESETS / f"{preset}.yaml").read_text()
    stated = re.search(r"Splits \(train / validation / test\): ([\d,]+) / ([\d,]+) / ([\d,]+)", text)
    assert stated, f"{preset}.yaml must state the split sizes it produces"

    def mock_source(builder, split, **kwargs):  # as many (identical) records as the real split
        return [{"image": np.full(image, 200, np.uint8)}] * builder.info.splits[split].num_examples

    config = OmegaConf.load(PRESETS / f"{preset}.yaml")
    config.data_dir = tfds_metadata(tmp_path, config.tfds_name, sizes)
    with tfds.testing.mock_data(as_data_source_fn=mock_source, data_dir=config.data_dir):
        loaded = data.load(config)
    produced = (len(loaded.train), len(loaded.validation), len(loaded.test))
    assert produced == tuple(int(size.replace(",", "")) for size in stated.groups())
    assert loaded.dynamic and loaded.image_shape == (28, 28)
