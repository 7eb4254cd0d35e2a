"""PNG grids for any number of images, none and one included."""

import numpy as np
import pytest
from PIL import Image

from dgm_cli import pictures

SHAPE = (4, 3)  # H × W
GREY = 128  # the borders' and the empty cells' grey, as saved


def cells(picture, count, columns):
    """The H × W interiors of the first `count` cells of a saved grid, scaled back down."""
    height, width = SHAPE
    scale = picture.shape[1] // (columns * (width + 1) + 1)
    small = picture[::scale, ::scale]
    return [small[1 + (i // columns) * (height + 1):][:height, 1 + (i % columns) * (width + 1):][:, :width]
            for i in range(count)]


def load(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 9, 20])
def test_save_grid_shows_every_image_whatever_their_number(tmp_path, count):
    images = np.random.default_rng(count).random((count, 12)).round()  # [N, H·W] in {0, 1}
    pictures.save_grid(tmp_path / "grid.png", images, SHAPE, columns=8)
    picture = load(tmp_path / "grid.png")
    assert picture.shape[1] >= pictures.MIN_WIDTH
    columns = max(1, min(8, count))
    for image, cell in zip(images, cells(picture, count, columns), strict=True):
        np.testing.assert_array_equal(cell, 255 * (1 - image.reshape(SHAPE)))  # ink dark on white
    if count == 0:
        assert np.all(picture == GREY)  # one empty cell
    if count == 1:  # the image alone in its border, no empty cells beside it
        assert picture.shape[0] * (SHAPE[1] + 2) == picture.shape[1] * (SHAPE[0] + 2)


@pytest.mark.parametrize("count", [0, 1, 3, 8, 11])
def test_save_pairs_puts_each_reconstruction_under_its_original(tmp_path, count):
    rng = np.random.default_rng(count)
    originals, reconstructions = rng.random((count, 12)).round(), rng.random((count, 12)).round()
    pictures.save_pairs(tmp_path / "pairs.png", originals, reconstructions, SHAPE, columns=8)
    picture = load(tmp_path / "pairs.png")
    columns = max(1, min(8, count))
    rows = -(-count // columns)
    found = cells(picture, 2 * rows * columns, columns)
    for i in range(count):
        row, column = divmod(i, columns)
        np.testing.assert_array_equal(found[2 * row * columns + column], 255 * (1 - originals[i].reshape(SHAPE)))
        np.testing.assert_array_equal(found[(2 * row + 1) * columns + column], 255 * (1 - reconstructions[i].reshape(SHAPE)))
    for empty in range(count, rows * columns):  # a short last row ends in empty cells
        row, column = divmod(empty, columns)
        assert np.all(found[2 * row * columns + column] == GREY) and np.all(found[(2 * row + 1) * columns + column] == GREY)
    if count == 0:
        assert np.all(picture == GREY)
