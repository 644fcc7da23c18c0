"""Per-image pre-processing: decode, find the brain, crop, pad to a square, resize, hash.

The steps (all OpenCV, one image at a time so threads can run them in parallel):

1. decode as 8-bit grayscale (RGB-encoded grayscale collapses to one channel); a file that does
   not decode, or a JPEG/PNG without its end marker (truncated download), is rejected with a reason;
2. background level = median of a thin band along the edges; the image is shifted so that level
   becomes 0 (grey or noisy scanner backgrounds turn into the common black one);
3. brain bounding box = the largest connected component of a blurred Otsu threshold, after a
   morphological opening that detaches thin text, rulers and markers from the head;
   a little margin is kept around it;
4. the crop is padded to a square on black, keeping the aspect ratio, and resized to ``size``
   (INTER_AREA when shrinking, INTER_CUBIC when growing);
5. a 64-bit perceptual hash (DCT of the 32x32 image, sign of the 8x8 low frequencies against their
   median) of the result, used to find near-duplicates.

Output is uint8; scaling to [0, 1] happens when shards are read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from brainhpc.data import phantom

MARGIN = 0.02  # fraction of the bbox side kept around the brain
MIN_BRAIN_FRACTION = 0.01  # a "brain" smaller than 1% of the image means we found nothing


class BadImage(ValueError):
    """A file that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Geometry:
    """Where the crop came from, so masks can follow the image (phantom ground truth)."""

    x0: int
    y0: int
    x1: int
    y1: int
    side: int  # side of the padded square before resizing
    off_x: int  # where the crop sits inside that square
    off_y: int


def check_complete(data: bytes, name: str) -> None:
    """Reject truncated JPEG/PNG files, which OpenCV would silently decode with grey filler."""
    head = data[:8]
    if head.startswith(b"\xff\xd8"):
        if b"\xff\xd9" not in data[-64:]:
            raise BadImage("truncated JPEG (no end-of-image marker)")
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in data[-16:]:
            raise BadImage("truncated PNG (no IEND chunk)")
    elif not data:
        raise BadImage("empty file")


def decode_gray(data: bytes, name: str = "") -> np.ndarray:
    check_complete(data, name)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise BadImage("not a decodable image (OpenCV could not read it)")
    if min(img.shape) < 16:
        raise BadImage(f"image too small ({img.shape[1]}x{img.shape[0]}, need at least 16x16)")
    return img


def remove_background(img: np.ndarray) -> np.ndarray:
    """Shift intensities so the median border level becomes 0 and stretch back to 0..255.

    The level is the median of a band 4% wide around the edge, not of the outermost pixels, so a
    thin bright frame drawn around some scans does not pass for background.
    """
    b = max(2, round(0.04 * min(img.shape)))
    band = np.concatenate([img[:b].ravel(), img[-b:].ravel(), img[b:-b, :b].ravel(),
                           img[b:-b, -b:].ravel()])
    bg = int(np.median(band))
    if bg <= 2:
        return img
    out = (img.astype(np.int16) - bg).clip(0, None).astype(np.float32) * (255.0 / (255 - bg))
    return out.clip(0, 255).astype(np.uint8)


def brain_bbox(img: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the largest bright connected component, robust to text and noise."""
    h, w = img.shape
    blur = cv2.GaussianBlur(img, (5, 5), 0)
    _, fg = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    k = max(3, (min(h, w) // 64) | 1)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return 0, 0, w, h
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))
    if areas[best - 1] < MIN_BRAIN_FRACTION * h * w:
        return 0, 0, w, h
    x, y, bw, bh = (int(v) for v in stats[best, :4])
    # Dark brain parts (CSF, lesions) can split the head into pieces: keep every large component
    # that overlaps the main one's box, so the box spans the whole head.
    for j in range(1, n):
        if j != best and stats[j, cv2.CC_STAT_AREA] >= 0.05 * areas[best - 1]:
            jx, jy, jw, jh = (int(v) for v in stats[j, :4])
            if jx < x + bw and x < jx + jw and jy < y + bh and y < jy + jh:
                x0, y0 = min(x, jx), min(y, jy)
                bw, bh = max(x + bw, jx + jw) - x0, max(y + bh, jy + jh) - y0
                x, y = x0, y0
    m = int(round(MARGIN * max(bw, bh)))
    return max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m)


def crop_square(img: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    x0, y0, x1, y1 = brain_bbox(img)
    crop = img[y0:y1, x0:x1]
    ch, cw = crop.shape
    side = max(ch, cw)
    off_y, off_x = (side - ch) // 2, (side - cw) // 2
    square = np.zeros((side, side), np.uint8)
    square[off_y:off_y + ch, off_x:off_x + cw] = crop
    geom = Geometry(x0, y0, x1, y1, side, off_x, off_y)
    return resize(square, size), geom


def resize(square: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if square.shape[0] >= size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interp)


def apply_geometry(mask: np.ndarray, geom: Geometry, size: int) -> np.ndarray:
    """Move a mask (same canvas as the source image) exactly as the image was moved."""
    crop = mask[geom.y0:geom.y1, geom.x0:geom.x1]
    square = np.zeros((geom.side, geom.side), np.uint8)
    square[geom.off_y:geom.off_y + crop.shape[0], geom.off_x:geom.off_x + crop.shape[1]] = crop
    return resize(square, size, nearest=True)


def preprocess_array(img: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    return crop_square(remove_background(img), size)


def phash(img: np.ndarray) -> int:
    """64-bit DCT perceptual hash: stable under resampling, JPEG noise, small intensity changes."""
    small = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


@dataclass
class Processed:
    """What a worker sends back for one file."""

    index: int
    sha256: str
    image: np.ndarray | None = None
    phash: int = 0
    error: str | None = None


def process_file(task: tuple[int, str, int]) -> Processed:
    """Worker entry point: (index, absolute path, size) -> Processed (never raises on bad files)."""
    index, path, size = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Processed(index, "", error=f"unreadable: {e.strerror or e}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        out, _ = preprocess_array(decode_gray(data, path), size)
    except BadImage as e:
        return Processed(index, digest, error=str(e))
    return Processed(index, digest, out, phash(out))


def process_phantom(task: tuple[int, int, int]) -> tuple[Processed, np.ndarray, int, str]:
    """Worker entry point: (index, seed, size) -> (Processed, mask, label, name) of a phantom."""
    index, seed, size = task
    p = phantom.make_slice(index, seed)
    out, geom = preprocess_array(p.image, size)
    mask = apply_geometry(p.mask, geom, size)
    digest = hashlib.sha256(p.image.tobytes()).hexdigest()
    return Processed(index, digest, out, phash(out)), mask, p.label, p.name
