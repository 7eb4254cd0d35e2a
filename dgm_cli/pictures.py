"""PNG grids of binary images or pixel probabilities."""

from pathlib import Path

import numpy as np
from PIL import Image

MIN_WIDTH = 256  # small images (8×8 digits) are scaled up to stay legible
EMPTY = 0.5  # the grey of the borders: a cell without an image is all grey


def image_grid(images, image_shape: tuple[int, int], columns: int) -> np.ndarray:
    """images: [N, H·W] in [0, 1] -> one uint8 picture [rows·(H+1)+1, columns·(W+1)+1], ink dark
    on white, with a one-pixel grey border around every image. Fewer images than `columns` take
    one row of as many columns; none give one empty grey cell, so that there is still a picture."""
    height, width = image_shape
    images = np.asarray(images, dtype=np.float32).reshape(-1, height, width)
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1), EMPTY, np.float32)
    for index, image in enumerate(images):
        top, left = 1 + (index // columns) * (height + 1), 1 + (index % columns) * (width + 1)
        grid[top : top + height, left : left + width] = 1.0 - image
    return np.round(grid * 255).astype(np.uint8)


def save_grid(path: Path, images, image_shape: tuple[int, int], columns: int = 8) -> None:
    grid = image_grid(images, image_shape, columns)
    scale = max(1, -(-MIN_WIDTH // grid.shape[1]))
    picture = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def save_pairs(path: Path, originals, reconstructions, image_shape: tuple[int, int], columns: int = 8) -> None:
    """A grid in which each row of originals is followed by the row of their reconstructions; a
    short last row is filled up with empty cells."""
    dim = image_shape[0] * image_shape[1]
    originals = np.asarray(originals, dtype=np.float32).reshape(-1, dim)  # [N, D]
    reconstructions = np.asarray(reconstructions, dtype=np.float32).reshape(-1, dim)  # [N, D]
    if len(reconstructions) != len(originals):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    columns = max(1, min(columns, len(originals)))
    rows = -(-len(originals) // columns)
    padding = np.full((rows * columns - len(originals), dim), EMPTY, np.float32)  # renders as empty cells

    def in_rows(images):
        return np.concatenate([images, padding]).reshape(rows, columns, dim)

    pairs = np.stack([in_rows(originals), in_rows(reconstructions)], axis=1)  # [rows, 2, columns, D]
    save_grid(path, pairs.reshape(-1, dim), image_shape, columns)
