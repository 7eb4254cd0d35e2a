"""The data loaders: the real prepared binarized_mnist, TFDS through its mock, built-in sets, files."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from omegaconf import OmegaConf

from dgm_cli import data
from dgm_cli.errors import DgmError


def tfds_config(**overrides):
    config = {"name": "binarized_mnist", "loader": "tfds", "tfds_name": "binarized_mnist", "image_key": "image", "data_dir": None}
    return OmegaConf.create({**config, **overrides})


def numpy_config(path, **overrides):
    config = {"name": "numpy", "loader": "numpy", "path": str(path), "image_shape": None, "validation_fraction": 0.1, "seed": 0}
    return OmegaConf.create({**config, **overrides})


@pytest.mark.slow
def test_reads_the_prepared_binarized_mnist():
    mnist = data.load(tfds_config())
    assert (mnist.train.shape, mnist.validation.shape, mnist.test.shape) == ((50000, 784), (10000, 784), (10000, 784))
    assert mnist.train.dtype == np.uint8 and set(np.unique(mnist.test)) == {0, 1}
    assert mnist.image_shape == (28, 28)
    # Same images as the original files, whatever order TFDS keeps them in: ~13% of pixels are on.
    assert 0.12 < mnist.test.mean() < 0.14


@pytest.mark.slow
def test_the_decoded_copy_in_the_cache_reads_back_the_same(tmp_path):
    decoded = data.load(tfds_config(), tmp_path)
    [cached] = list(tmp_path.glob("binarized_mnist-*.npz"))
    again = data.load(tfds_config(), tmp_path)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(again, split), getattr(decoded, split))
    assert again.spec == decoded.spec
    json.dumps(dataclasses.asdict(again.spec))  # checkpoints record it as JSON
    cached.write_bytes(b"damaged")  # a damaged copy is decoded afresh and replaced
    assert data.load(tfds_config(), tmp_path).spec == decoded.spec and cached.stat().st_size > 1000


def test_tfds_code_path_on_mock_data(tmp_path):
    def mock_source(builder, split, **kwargs):
        rng = np.random.default_rng(len(split))
        return [{"image": rng.integers(0, 2, (28, 28, 1), dtype=np.uint8)} for _ in range(7)]

    # mock_data also stands in for download_and_prepare, so an empty data_dir works here.
    with tfds.testing.mock_data(as_data_source_fn=mock_source, data_dir=str(tmp_path)):
        mock = data.load(tfds_config(data_dir=str(tmp_path)))
    assert mock.train.shape == (7, 784) and mock.image_shape == (28, 28)
    assert set(np.unique(mock.train)) == {0, 1}


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
        ({"train": np.full((3, 4), 0.5), "test": np.zeros((3, 4))}, "outside \\{0, 1\\}, such as 0.5"),
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
