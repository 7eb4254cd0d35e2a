"""Data sets of binary images as uint8 arrays [N, D] in {0, 1}, from TFDS, scikit-learn's digits,
a synthetic bars generator, or a user's .npz file.

Every loader returns a `Data`; the runner puts its arrays on the device once.
"""

import hashlib
import logging
import math
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgm_cli.errors import DgmError, choice, positive_int, probability

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
OFFLINE_HINT = "train offline with dataset=digits, dataset=bars or dataset=numpy dataset.path=FILE.npz"


@dataclass(frozen=True)
class Spec:
    """What a model may know of its data."""

    num_train: int
    image_shape: tuple[int, int]  # H × W = D
    num_classes: int | None  # of the labels, if the data set has them

    @property
    def dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1]


@dataclass(frozen=True)
class Data:
    train: np.ndarray  # [N_train, D] uint8 in {0, 1}
    validation: np.ndarray  # [N_validation, D]
    test: np.ndarray  # [N_test, D]
    image_shape: tuple[int, int]  # H × W = D, for pictures
    true_test_nll: float | None = None  # −mean log p(x) under the generating process, if known
    labels: dict[str, np.ndarray] | None = None  # split -> [N] int32 class labels, if known

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    @property
    def spec(self) -> Spec:
        num_classes = int(self.labels["train"].max()) + 1 if self.labels else None
        return Spec(len(self.train), self.image_shape, num_classes)

    def fingerprint(self) -> str:
        """A digest of every array: a run goes on only with the data it began with."""
        digest = hashlib.blake2b(digest_size=16)
        for array in (self.train, self.validation, self.test, *(self.labels or {}).values()):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    def batches(self) -> dict[str, dict[str, np.ndarray]]:
        """split -> {"x": pixels, "labels": labels if known}, the form models take batches in."""
        return {
            split: {"x": getattr(self, split), **({"labels": self.labels[split]} if self.labels else {})}
            for split in SPLITS
        }


def load(config, cache_dir: Path | None = None) -> Data:
    """The data set `config` names; `cache_dir`, if given, keeps decoded copies of TFDS sets."""
    return choice(config.loader, LOADERS, "dataset loader")(config, cache_dir)


def _checked(array, split: str, source: str) -> np.ndarray:
    """`array` as uint8 [N, D], or a DgmError that says what is wrong with it."""
    array = np.asarray(array)
    if array.size == 0:
        raise DgmError(f"the {split} split of {source} is empty")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DgmError(f"the {split} split of {source} is not numeric (dtype {array.dtype})")
    if array.ndim not in (2, 3):
        raise DgmError(
            f"the {split} split of {source} has shape {array.shape}; expected [N, D] or [N, H, W]"
        )
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise DgmError(f"the {split} split of {source} contains NaN")
    outside = (array != 0) & (array != 1)
    if outside.any():
        value = array[outside].flat[0]
        raise DgmError(f"the {split} split of {source} has values outside {{0, 1}}, such as {value}")
    return array.reshape(len(array), -1).astype(np.uint8)


def _image_shape(dim: int, shape=None) -> tuple[int, int]:
    if shape is not None and len(shape) == 2 and shape[0] * shape[1] == dim:
        return int(shape[0]), int(shape[1])  # plain ints: the shape goes into JSON records
    side = math.isqrt(dim)
    return (side, side) if side * side == dim else (1, dim)


def _make_data(splits: dict, source: str, image_shape=None, **extra) -> Data:
    arrays = {split: _checked(splits[split], split, source) for split in SPLITS}
    widths = {split: array.shape[1] for split, array in arrays.items()}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{split} {width}" for split, width in widths.items())
        raise DgmError(f"the splits of {source} have different widths: {listed}")
    return Data(**arrays, image_shape=_image_shape(widths["train"], image_shape), **extra)


def _split_off(array, size: int, seed: int):
    """A random `size` rows of `array`, and the rest."""
    order = np.random.default_rng(seed).permutation(len(array))
    return array[order[size:]], array[order[:size]]


def load_tfds(config, cache_dir: Path | None) -> Data:
    """A TFDS data set, read through `as_data_source` (no TensorFlow needed); downloaded and
    prepared first if it is not there (that needs TensorFlow and the network). Decoding its
    PNGs takes seconds, so the arrays are kept in `cache_dir` for the next run."""
    import tensorflow_datasets as tfds

    data_dir = config.data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        builder = tfds.builder(config.tfds_name, data_dir=data_dir)
    except Exception as error:  # TFDS raises many types here; all mean the name is unusable
        raise DgmError(f"TFDS has no data set {config.tfds_name!r}: {_first_line(error)}") from None
    source = f"TFDS {config.tfds_name} in {builder.data_dir}"
    cached = _cache_file(cache_dir, builder, config.image_key)
    if cached and cached.is_file():
        try:
            with np.load(cached) as file:
                arrays = {split: file[split] for split in SPLITS}
                return _make_data(arrays, source, image_shape=file["image_shape"])
        except Exception:  # a damaged copy: decode afresh below and replace it
            log.info("ignoring the unreadable cached copy %s", cached)
    if not builder.is_prepared():
        log.info("%s is not in %s: downloading and preparing it", config.tfds_name, builder.data_dir)
        try:
            _check_reachable(builder)
            builder.download_and_prepare()
        except Exception as error:  # no network, no TensorFlow, a full disk: all end here
            raise DgmError(
                f"{config.tfds_name} is not prepared in {builder.data_dir} and could not be "
                f"downloaded ({_first_line(error)}); set TFDS_DATA_DIR (or dataset.data_dir) to a "
                f"TFDS data directory that holds it, or {OFFLINE_HINT}"
            ) from None
    splits = {}
    for split in SPLITS:
        images = np.stack([record[config.image_key] for record in builder.as_data_source(split=split)])
        splits[split] = images.reshape(len(images), -1)  # [N, H, W, 1] -> [N, D]
    data = _make_data(splits, source, image_shape=images.shape[1:3])
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_name(cached.stem + f".{os.getpid()}.tmp.npz")
        np.savez(temporary, **{split: getattr(data, split) for split in SPLITS}, image_shape=data.image_shape)
        os.replace(temporary, cached)  # whole or not at all, even with runs side by side
    return data


def _cache_file(cache_dir: Path | None, builder, image_key: str) -> Path | None:
    """Where the decoded arrays of this prepared data set are kept, if they are kept at all."""
    if cache_dir is None or not builder.is_prepared():
        return None
    where = hashlib.sha1(f"{Path(builder.data_dir).resolve()}:{image_key}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{builder.name}-{builder.version}-{where}.npz"


def _check_reachable(builder, timeout: float = 5.0) -> None:
    """Fail at once when the download hosts cannot be reached: offline, TFDS would retry each
    file with back-off for minutes before giving up."""
    try:
        urls = list(builder.url_infos or ())
    except Exception:  # TFDS cannot list them; download_and_prepare will say what is wrong
        return
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as error:
            raise ConnectionError(f"cannot reach {parts.hostname}: {error}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def load_digits(config, cache_dir: Path | None) -> Data:
    """scikit-learn's 1797 handwritten digits, 8×8 with intensities 0..16, thresholded, and their
    labels 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images > config.threshold).astype(np.uint8)  # [1797, 8, 8]
    rest, test = _split_off(np.arange(len(images)), positive_int(config.test_size, "dataset.test_size"), config.seed)
    train, validation = _split_off(
        rest, positive_int(config.validation_size, "dataset.validation_size"), config.seed + 1
    )
    indices = {"train": train, "validation": validation, "test": test}
    labels = {split: digits.target[rows].astype(np.int32) for split, rows in indices.items()}
    return _make_data({split: images[rows] for split, rows in indices.items()}, "digits", (8, 8), labels=labels)


def load_bars(config, cache_dir: Path | None) -> Data:
    size = positive_int(config.size, "dataset.size")
    bar_prob = probability(config.bar_prob, "dataset.bar_prob")
    vertical_prob = probability(config.vertical_prob, "dataset.vertical_prob")
    rng = np.random.default_rng(config.seed)
    splits = {
        split: sample_bars(rng, positive_int(config[f"{split}_size"], f"dataset.{split}_size"),
                           size, bar_prob, vertical_prob)
        for split in SPLITS
    }
    true_nll = -float(np.mean(bars_log_prob(splits["test"], size, bar_prob, vertical_prob)))
    return _make_data(splits, "bars", (size, size), true_test_nll=true_nll)


def sample_bars(rng, n: int, size: int, bar_prob: float, vertical_prob: float) -> np.ndarray:
    """Images of bars, as in the wake-sleep paper: pick vertical (or horizontal) bars, then turn
    each of the `size` bars on independently.  -> [n, size * size] uint8."""
    bars = rng.random((n, size)) < bar_prob  # [n, size]: which bars are on
    vertical = rng.random(n) < vertical_prob  # [n]
    images = np.where(vertical[:, None, None], bars[:, None, :], bars[:, :, None])  # [n, H, W]
    return images.reshape(n, -1).astype(np.uint8)


def bars_log_prob(x, size: int, bar_prob: float, vertical_prob: float) -> np.ndarray:
    """Exact log p(x) under `sample_bars`: Σ over both orientations of p(orientation) ×
    p(bars), where an image is possible under an orientation only if every bar is all on or
    all off.  x: [N, size * size] -> [N]."""
    images = np.asarray(x, dtype=bool).reshape(-1, size, size)

    def log_prob_given(bars_axis_images, orientation_prob):
        bars = bars_axis_images[:, 0, :]  # the first pixel of each bar says whether it is on
        consistent = (bars_axis_images == bars[:, None, :]).all(axis=(1, 2))
        on = bars.sum(axis=1)
        log_p = on * math.log(bar_prob) + (size - on) * math.log1p(-bar_prob)
        return np.where(consistent, math.log(orientation_prob) + log_p, -np.inf)

    vertical = log_prob_given(images, vertical_prob)
    horizontal = log_prob_given(images.transpose(0, 2, 1), 1 - vertical_prob)
    return np.logaddexp(vertical, horizontal)


def load_numpy(config, cache_dir: Path | None) -> Data:
    """A user's .npz with arrays `train`, `test` and optionally `validation` ([N, D] or
    [N, H, W], values in {0, 1}); without `validation`, a fraction of `train` is held out."""
    if not config.path:
        raise DgmError("dataset=numpy needs a file: add dataset.path=FILE.npz")
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise DgmError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {name: file[name] for name in file.files}
    except Exception as error:  # np.load raises many types for a file it cannot parse
        raise DgmError(f"cannot read {path} as a NumPy .npz file: {_first_line(error)}") from None
    for split in ("train", "test"):
        if split not in arrays:
            found = ", ".join(arrays) or "no arrays"
            raise DgmError(f"{path} has no {split!r} array (found: {found})")
    image_shape = config.image_shape or arrays["train"].shape[1:3]
    if "validation" not in arrays:
        fraction = probability(config.validation_fraction, "dataset.validation_fraction")
        train = _checked(arrays["train"], "train", path)
        size = max(1, round(fraction * len(train)))
        if size >= len(train):
            raise DgmError(f"the train split of {path} is too small to hold out a validation split")
        arrays["train"], arrays["validation"] = _split_off(train, size, config.seed)
        log.info("%s has no validation array: holding out %d train examples", path, size)
    return _make_data(arrays, str(path), image_shape)


LOADERS = {"tfds": load_tfds, "digits": load_digits, "bars": load_bars, "numpy": load_numpy}
