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
from omegaconf import OmegaConf

from dgm_cli.errors import DgmError, choice, integer, positive_int, probability

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
    # dataset.binarize=dynamic: `train` holds grey levels 0..255, drawn afresh every epoch on the
    # device (validation and test were drawn once, with a fixed seed)
    dynamic: bool = False

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
    """`array` as [N, D] (its values as they are), or a DgmError that says what is wrong with it."""
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
    return array.reshape(len(array), -1)


def _is_binary(array: np.ndarray) -> bool:
    return bool(((array == 0) | (array == 1)).all())


def _grey_levels(array: np.ndarray, split: str, source: str) -> np.ndarray:
    """Grayscale pixels, [0, 1] or 0–255, as intensities in [0, 1] (float32)."""
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise DgmError(f"the {split} split of {source} has values in [{low:g}, {high:g}]; grayscale data must "
                       "lie in [0, 1] or 0–255")
    scale = 255.0 if high > 1 else 1.0
    return (array / scale).astype(np.float32)


BINARIZE = ("threshold", "static", "dynamic")


def _binarized(arrays: dict, config, source: str) -> tuple[dict, bool]:
    """Binary splits as uint8 in {0, 1} -> (the splits, whether `train` is left to the epochs).

    Binary data needs nothing, and takes no `dataset.binarize`. Grayscale data needs it:
    `threshold` (on where the intensity exceeds dataset.threshold), `static` (one Bernoulli draw
    per pixel, once, from dataset.binarize_seed) or `dynamic` (train: a fresh draw every epoch, on
    the device; it is kept as grey levels 0..255). Validation and test are drawn as `static` does
    in both random protocols, so test figures are comparable between runs and between the two."""
    protocol = config.get("binarize") if config is not None else None
    greys = [split for split, array in arrays.items() if not _is_binary(array)]
    if not greys:
        if protocol is not None:  # else the run would be recorded under a protocol it did not follow
            raise DgmError(f"{source} is binary already: drop dataset.binarize={protocol} (or set it to "
                           "null): it says how grayscale data become binary")
        return {split: array.astype(np.uint8) for split, array in arrays.items()}, False
    grey = greys[0]
    if protocol is None:
        value = arrays[grey][(arrays[grey] != 0) & (arrays[grey] != 1)].flat[0]
        raise DgmError(f"the {grey} split of {source} is not binary (it has values such as {value:g}): choose how "
                       f"to binarise it with dataset.binarize=threshold|static|dynamic")
    choice(protocol, dict.fromkeys(BINARIZE), "dataset.binarize")
    intensities = {split: _grey_levels(array, split, source) for split, array in arrays.items()}
    if protocol == "threshold":
        threshold = probability(config.get("threshold", 0.5), "dataset.threshold")
        return {split: (p > threshold).astype(np.uint8) for split, p in intensities.items()}, False
    seed = integer(config.get("binarize_seed", 0), "dataset.binarize_seed")
    drawn = {split: (np.random.default_rng([seed, SPLITS.index(split)]).random(p.shape, np.float32) < p).astype(np.uint8)
             for split, p in intensities.items()}
    if protocol == "static":
        return drawn, False
    return {**drawn, "train": np.rint(intensities["train"] * 255).astype(np.uint8)}, True


def _image_shape(dim: int, shape=None) -> tuple[int, int]:
    if shape is not None and len(shape) == 2 and shape[0] * shape[1] == dim:
        return int(shape[0]), int(shape[1])  # plain ints: the shape goes into JSON records
    side = math.isqrt(dim)
    return (side, side) if side * side == dim else (1, dim)


def _make_data(splits: dict, source: str, image_shape=None, config=None, **extra) -> Data:
    """`splits` checked and binarised as `config` (the dataset config) says."""
    arrays = {split: _checked(splits[split], split, source) for split in SPLITS}
    widths = {split: array.shape[1] for split, array in arrays.items()}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{split} {width}" for split, width in widths.items())
        raise DgmError(f"the splits of {source} have different widths: {listed}")
    arrays, dynamic = _binarized(arrays, config, source)
    return Data(**arrays, image_shape=_image_shape(widths["train"], image_shape), dynamic=dynamic, **extra)


def _split_off(array, size: int, seed: int):
    """A random `size` rows of `array`, and the rest."""
    order = np.random.default_rng(seed).permutation(len(array))
    return array[order[size:]], array[order[:size]]


def _hold_out_validation(train: np.ndarray, config, source) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): `dataset.validation_fraction` of a set without a validation split,
    drawn with `dataset.seed`."""
    fraction = probability(config.get("validation_fraction", 0.1), "dataset.validation_fraction")
    size = max(1, round(fraction * len(train)))
    if size >= len(train):
        raise DgmError(f"the train split of {source} is too small to hold out a validation split")
    # A warning: the training set is then smaller than the data set's own, which changes figures.
    log.warning("%s has no validation split: holding out %d of its %d train examples as validation "
                "(dataset.validation_fraction=%g)", source, size, len(train), fraction)
    return _split_off(train, size, config.get("seed", 0))


def load_tfds(config, cache_dir: Path | None) -> Data:
    """A TFDS image data set, read through `as_data_source` (no TensorFlow needed); downloaded
    and prepared first if it is not there (that needs TensorFlow and the network). Decoding its
    PNGs takes seconds, so the decoded images are kept in `cache_dir` for the next run. Colour
    images are averaged to grey, `dataset.image_size` resizes, `dataset.invert` turns dark
    strokes on light paper (Omniglot) into light on dark; without a validation split (by the
    builder's info), `dataset.validation_fraction` of train is held out."""
    import tensorflow_datasets as tfds

    data_dir = config.data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        builder = tfds.builder(config.tfds_name, data_dir=data_dir)
    except Exception as error:  # TFDS raises many types here; all mean the name is unusable
        raise DgmError(f"TFDS has no data set {config.tfds_name!r}: {_first_line(error)}") from None
    source = f"TFDS {config.tfds_name} in {builder.data_dir}"
    if not builder.is_prepared():
        _download_and_prepare(builder, config.tfds_name)
    splits = _splits_of(builder, source)
    cached = _cache_file(cache_dir, builder, config.image_key)
    images = _read_cached(cached, splits)
    if images is None:
        images = {split: _read_split(builder, split, config.image_key, source) for split in splits}
        _write_cached(cached, images)
    images = {split: _grey_images(array, config) for split, array in images.items()}  # [N, H, W]
    if "validation" not in images:
        images["train"], images["validation"] = _hold_out_validation(images["train"], config, source)
    return _make_data(images, source, image_shape=images["train"].shape[1:3], config=config)


def _download_and_prepare(builder, name: str) -> None:
    log.info("%s is not in %s: downloading and preparing it", name, builder.data_dir)
    try:
        _check_reachable(builder)
        builder.download_and_prepare()
    except Exception as error:  # no network, no TensorFlow, a full disk: all end here
        raise DgmError(
            f"{name} is not prepared in {builder.data_dir} and could not be downloaded "
            f"({_first_line(error)}); set TFDS_DATA_DIR (or dataset.data_dir) to a TFDS data "
            f"directory that holds it, or {OFFLINE_HINT}"
        ) from None


def _splits_of(builder, source: str) -> list[str]:
    """Which of SPLITS the prepared data set has, as its info records them. Asked, not tried: a
    split that is there but fails to load must stop the run, not be replaced by a hold-out of
    train (binarized_mnist's 50k / 10k would become 45k / 5k: another benchmark)."""
    available = list(builder.info.splits)
    for split in ("train", "test"):
        if split not in available:
            raise DgmError(f"{source} has no {split} split (it has: {', '.join(available) or 'none'})")
    return [split for split in SPLITS if split in available]


def _read_split(builder, split: str, image_key: str, source: str) -> np.ndarray:
    """The images of one split as stored, decoded: [N, H, W, C] or [N, H, W]."""
    try:
        images = [record[image_key] for record in builder.as_data_source(split=split)]
    except Exception as error:  # a missing or damaged shard, an undecodable image: TFDS raises many types
        raise DgmError(f"cannot read the {split} split of {source}: {type(error).__name__}: "
                       f"{_first_line(error)}") from None
    if not images:
        raise DgmError(f"the {split} split of {source} is empty")
    return np.stack(images)


def _read_cached(path: Path | None, splits: list[str]) -> dict | None:
    """The decoded arrays kept in `path`, if it holds exactly `splits`."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as file:
            if sorted(file.files) != sorted(splits):  # kept from other splits: decode afresh
                log.info("ignoring the cached copy %s: it holds the splits %s", path, ", ".join(file.files))
                return None
            return {split: file[split] for split in splits}
    except Exception:  # a damaged copy: decode afresh and replace it
        log.info("ignoring the unreadable cached copy %s", path)
        return None


def _write_cached(path: Path | None, images: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    np.savez(temporary, **images)
    os.replace(temporary, path)  # whole or not at all, even with runs side by side


def _grey_images(images: np.ndarray, config) -> np.ndarray:
    """[N, H, W, C] or [N, H, W] as stored -> [N, H', W']: grey, resized and inverted as the
    config asks. Binary images stay binary unless resized."""
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else images.mean(axis=-1)
    size = config.get("image_size")
    if size is not None:
        from PIL import Image

        height, width = (positive_int(side, "dataset.image_size") for side in size)
        images = np.stack([np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize(
            (width, height), Image.BILINEAR)) for image in images])
    if config.get("invert"):
        images = (1 if _is_binary(images) else 255) - images
    return images


def _cache_file(cache_dir: Path | None, builder, image_key: str) -> Path | None:
    """Where the decoded images of this prepared data set are kept, if they are kept at all."""
    if cache_dir is None or not builder.is_prepared():
        return None
    where = hashlib.sha1(f"{Path(builder.data_dir).resolve()}:{image_key}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{builder.name}-{builder.version}-{where}-images.npz"  # as decoded


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
    """scikit-learn's 1797 handwritten digits, 8×8 with intensities 0..16 (binarised as
    dataset.binarize says: thresholded by default), and their labels 0..9. Kept in `cache_dir`
    after the first read: importing scikit-learn takes longer than the rest of a short run's start."""
    import importlib.metadata

    cached = cache_dir and Path(cache_dir) / f"digits-scikit-learn-{importlib.metadata.version('scikit-learn')}.npz"
    digits = _read_cached(cached, ["images", "target"])
    if digits is None:
        from sklearn.datasets import load_digits as sklearn_digits

        loaded = sklearn_digits()
        digits = {"images": loaded.images, "target": loaded.target}
        _write_cached(cached, digits)
    images = digits["images"] / 16.0  # [1797, 8, 8] intensities in [0, 1]
    rest, test = _split_off(np.arange(len(images)), positive_int(config.test_size, "dataset.test_size"), config.seed)
    train, validation = _split_off(
        rest, positive_int(config.validation_size, "dataset.validation_size"), config.seed + 1
    )
    indices = {"train": train, "validation": validation, "test": test}
    labels = {split: digits["target"][rows].astype(np.int32) for split, rows in indices.items()}
    if config.get("binarize", "threshold") == "threshold" and config.threshold > 1:
        # Saved before dgm read the digits as intensities: thresholded, in their units 0..16.
        config = OmegaConf.create({**OmegaConf.to_container(config), "binarize": "threshold",
                                   "threshold": config.threshold / 16})
    return _make_data({split: images[rows] for split, rows in indices.items()}, "digits", (8, 8), config, labels=labels)


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
    [N, H, W]; binary, or grayscale with dataset.binarize); without `validation`, a fraction of
    `train` is held out."""
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
        arrays["train"], arrays["validation"] = _hold_out_validation(_checked(arrays["train"], "train", path), config, path)
    return _make_data(arrays, str(path), image_shape, config)


LOADERS = {"tfds": load_tfds, "digits": load_digits, "bars": load_bars, "numpy": load_numpy}
