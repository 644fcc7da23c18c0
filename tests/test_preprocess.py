"""Pre-processing on synthetic images with known bounding boxes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from brainhpc.data import preprocess as pp


def head(h=200, w=300, box=(60, 40, 200, 170), bg=0, text=True, seed=0):
    """A bright textured ellipse filling ``box`` (x0, y0, x1, y1) on a background level ``bg``."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), bg, np.uint8)
    x0, y0, x1, y1 = box
    cv2.ellipse(img, (((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0, y1 - y0), 0), 255, -1)
    inside = img == 255
    img[inside] = rng.integers(120, 200, inside.sum())
    for _ in range(3):  # some structure (ventricle-like dark blobs), so images differ by content
        cx = rng.uniform(x0 + 0.3 * (x1 - x0), x1 - 0.3 * (x1 - x0))
        cy = rng.uniform(y0 + 20, y1 - 20)
        cv2.ellipse(img, ((cx, cy), (rng.uniform(8, 30), rng.uniform(15, 40)), rng.uniform(0, 180)),
                    40, -1)
    if text:
        cv2.putText(img, "L 12mm", (w - 70, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    return img


@pytest.mark.parametrize("bg", [0, 60])
def test_bbox_finds_the_head_and_ignores_text(bg):
    box = (60, 40, 200, 170)
    x0, y0, x1, y1 = pp.brain_bbox(pp.remove_background(head(bg=bg, box=box)))
    tol = 0.04 * 140 + 2
    assert abs(x0 - box[0]) <= tol and abs(y0 - box[1]) <= tol
    assert abs(x1 - box[2]) <= tol and abs(y1 - box[3]) <= tol


def test_noisy_background():
    img = head(bg=0, text=False).astype(np.int16)
    img += np.random.default_rng(1).normal(0, 12, img.shape).astype(np.int16)
    x0, y0, x1, y1 = pp.brain_bbox(np.clip(img, 0, 255).astype(np.uint8))
    assert abs(x0 - 60) <= 10 and abs(x1 - 200) <= 10 and abs(y0 - 40) <= 10


def test_square_output_keeps_aspect_and_mask_follows():
    img = head(box=(20, 50, 280, 130), text=False)
    out, geom = pp.preprocess_array(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    rows = np.flatnonzero(out.max(1) > 0)
    # a 260 x 80 head padded to a square: ~80/260 of the rows hold it, centred
    assert 0.2 < len(rows) / 64 < 0.45 and abs(rows.mean() - 31.5) < 3
    mask = (img > 0).astype(np.uint8)
    moved = pp.apply_geometry(mask, geom, 64)
    assert ((moved > 0) == (out > 0)).mean() > 0.97


def test_thin_bright_frame_is_not_background():
    img = head(bg=0, text=False)
    img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = 255
    out, _ = pp.preprocess_array(img, 64)
    assert out.mean() > 40  # the head survives (shifting by the frame level would erase it)


def test_phash_stable_under_reencoding():
    img = head(text=False, seed=3)
    a, _ = pp.preprocess_array(img, 128)
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (450, 300)), [cv2.IMWRITE_JPEG_QUALITY, 70])
    b, _ = pp.preprocess_array(pp.decode_gray(buf.tobytes()), 128)
    other, _ = pp.preprocess_array(head(box=(30, 30, 120, 190), text=False, seed=5), 128)
    assert bin(pp.phash(a) ^ pp.phash(b)).count("1") <= 4
    assert bin(pp.phash(a) ^ pp.phash(other)).count("1") > 4


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not a decodable image"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 200, "truncated JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "truncated PNG"),
])
def test_bad_files_have_reasons(tmp_path, data, reason):
    path = tmp_path / "f.jpg"
    path.write_bytes(data)
    result = pp.process_file((0, str(path), 64))
    assert result.image is None and reason in result.error


def test_rgb_encoded_grayscale_decodes_to_one_channel():
    img = head(text=False)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    assert pp.decode_gray(buf.tobytes()).shape == img.shape
