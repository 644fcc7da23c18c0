"""save_grid: tiles land where expected, captions and titles are drawn, bad input is refused."""

import cv2
import numpy as np
import pytest
import torch

from brainhpc.errors import BrainhpcError
from brainhpc.images import PAD, render_grid, save_grid


def test_grid_places_tiles_and_writes_png(tmp_path):
    imgs = np.stack([np.full((1, 16, 16), v, np.uint8) for v in (10, 60, 110, 160, 210)])
    path = save_grid(imgs, tmp_path / "g.png", ncols=3)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.shape == (PAD + 2 * (16 + PAD), PAD + 3 * (16 + PAD))
    assert back[PAD + 5, PAD + 5] == 10
    assert back[PAD + 5, PAD + 2 * (16 + PAD) + 5] == 110
    assert back[PAD + (16 + PAD) + 5, PAD + (16 + PAD) + 5] == 210
    assert back[-PAD - 5, -PAD - 5] == 0  # the missing sixth tile stays black
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_float_and_torch_inputs_scale_to_uint8():
    a = render_grid(torch.full((2, 1, 8, 8), 0.5), ncols=2)
    b = render_grid(np.full((2, 8, 8), 2.0), ncols=2)  # floats are clipped to [0, 1]
    assert a[PAD + 1, PAD + 1] == 128 and b[PAD + 1, PAD + 1] == 255


def test_captions_and_title_add_drawn_rows():
    imgs = np.zeros((4, 1, 32, 32), np.uint8)
    plain = render_grid(imgs, ncols=2)
    cap = render_grid(imgs, ncols=2, captions=["r=0.99", "b", "c", "a very long caption"],
                      title="samples")
    assert cap.shape[0] > plain.shape[0] and cap.shape[1] == plain.shape[1]
    assert cap.max() == 255  # text pixels were drawn on the black canvas


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 8, 8), np.uint8), "1 channel"),
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((0, 8, 8), np.uint8), "no images"),
])
def test_bad_images_are_refused(tmp_path, bad, match):
    with pytest.raises(BrainhpcError, match=match):
        save_grid(bad, tmp_path / "x.png")


def test_caption_count_must_match(tmp_path):
    with pytest.raises(BrainhpcError, match="2 captions for 3 images"):
        save_grid(np.zeros((3, 8, 8), np.uint8), tmp_path / "x.png", captions=["a", "b"])
