"""PNG grids of binary images or pixel probabilities."""

from pathlib import Path

import numpy as np
from PIL import Image

MIN_WIDTH = 256  # small images (8×8 digits) are scaled up to stay legible


def image_grid(images, image_shape: tuple[int, int], columns: int) -> np.ndarray:
    """images: [N, H·W] in [0, 1] -> one uint8 picture [rows·(H+1)+1, columns·(W+1)+1], ink dark
    on white, with a one-pixel grey border around every image."""
    height, width = image_shape
    images = np.asarray(images, dtype=np.float32).reshape(-1, height, width)
    rows = -(-len(images) // columns)
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1), 0.5, np.float32)
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
    """A grid in which each row of originals is followed by the row of their reconstructions."""
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    rows = len(originals) // columns
    if rows == 0:  # fewer images than one row: one row of each
        columns, rows = len(originals), 1
    dim = originals.shape[1]
    pairs = np.stack(
        [originals[: rows * columns].reshape(rows, columns, dim),
         reconstructions[: rows * columns].reshape(rows, columns, dim)], axis=1
    )  # [rows, 2, columns, D]
    save_grid(path, pairs.reshape(-1, dim), image_shape, columns)
