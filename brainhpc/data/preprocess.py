"""Per-image pre-processing: decode, find the brain, crop, pad to a square, resize, fingerprint.

The steps (all OpenCV, one image at a time so threads can run them in parallel):

1. decode to 8-bit grayscale: RGB-encoded grayscale, palette, RGBA and CMYK collapse to one
   channel, EXIF orientation is applied, 16-bit images are scaled by their 0.5-99.5 percentiles;
   a layout may pick one channel instead (LGG ``.tif``: FLAIR is channel 1). A file that does not
   decode, a JPEG/PNG without its end marker (truncated download), a tiny or a blank (constant)
   image is rejected with a reason;
2. background: a white page or frame (median of a thin edge band >= 128) is cleared to black
   where it touches the border; then the band's level is shifted to 0 (grey or noisy scanner
   backgrounds turn into the common black one);
3. brain bounding box = the largest connected component of a blurred Otsu threshold, after a
   morphological opening that detaches thin text, rulers and markers from the head;
   a little margin is kept around it;
4. the crop is padded to a square on black, keeping the aspect ratio, and resized to ``size``
   (INTER_AREA when shrinking, INTER_CUBIC when growing); a mask beside the image follows the
   same crop, pad and (nearest-neighbour) resize;
5. a brain mask of the result: the head's filled largest component, eroded by ~8% of the side to
   drop the skull rim (anomaly scores are limited to it);
6. a 32 x 32 thumbnail of the padded square, taken before the resize so that it does not depend
   on ``size``: duplicate detection (``brainhpc.data.duplicates``) reads only this, so 64 px and
   128 px runs of one dataset get the same groups and the same split.

Output is uint8; scaling to [0, 1] happens when shards are read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from brainhpc.data import phantom

MARGIN = 0.02  # fraction of the bbox side kept around the brain
MIN_BRAIN_FRACTION = 0.01  # a "brain" smaller than 1% of the image means we found nothing
MIN_SIDE = 16
THUMB = 32  # side of the size-independent thumbnail
BRAIN_ERODE = 0.08  # brain-mask erosion, fraction of the image side (skull and scalp rim)


class BadImage(ValueError):
    """A file that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Geometry:
    """Where the crop came from, so masks can follow the image."""

    x0: int
    y0: int
    x1: int
    y1: int
    side: int  # side of the padded square before resizing
    off_x: int  # where the crop sits inside that square
    off_y: int

    @property
    def aspect(self) -> float:
        """Height / width of the brain crop (an image statistic of the confound check)."""
        return (self.y1 - self.y0) / max(1, self.x1 - self.x0)


def check_complete(data: bytes, name: str = "") -> None:
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


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    lo, hi = np.percentile(img, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1
    return ((img.astype(np.float32) - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def decode_gray(data: bytes, name: str = "", channel: int | None = None) -> np.ndarray:
    """8-bit grayscale image of an encoded file; ``channel`` picks one channel of a colour file
    (OpenCV's BGR order: index 1, green, is the second channel either way)."""
    check_complete(data, name)
    buf = np.frombuffer(data, np.uint8)
    if channel is None:
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is not None and img.ndim == 3:
            if img.shape[2] <= channel:
                raise BadImage(f"has {img.shape[2]} channel(s); channel {channel} was expected")
            img = img[:, :, channel]
    if img is None:
        raise BadImage("not a decodable image (OpenCV could not read it)")
    if min(img.shape[:2]) < MIN_SIDE:
        raise BadImage(f"image too small ({img.shape[1]}x{img.shape[0]}, need at least "
                       f"{MIN_SIDE}x{MIN_SIDE})")
    img = _to_uint8(np.ascontiguousarray(img))
    if int(img.max()) - int(img.min()) < 4:
        raise BadImage(f"blank image (constant intensity {int(img.min())})")
    return img


def _edge_band(img: np.ndarray) -> np.ndarray:
    b = max(2, round(0.04 * min(img.shape)))
    return np.concatenate([img[:b].ravel(), img[-b:].ravel(), img[b:-b, :b].ravel(),
                           img[b:-b, -b:].ravel()])


def remove_background(img: np.ndarray) -> np.ndarray:
    """Make the background black: clear a white page/frame, then shift the border level to 0.

    The level is the median of a band 4% wide around the edge, not of the outermost pixels, so a
    thin bright frame drawn around some scans does not pass for background. A bright level
    (>= 128) means a white page or frame: the bright pixels connected to the border are set to
    0 first (shifting by a level near 255 would erase the head).
    """
    bg = int(np.median(_edge_band(img)))
    if bg >= 128:
        bright = (img >= bg - 30).astype(np.uint8)
        _, lab = cv2.connectedComponents(bright, connectivity=4)
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        img = np.where(np.isin(lab, edge[edge > 0]), 0, img).astype(np.uint8)
        bg = int(np.median(_edge_band(img)))
    if bg <= 2 or bg >= 255:
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


def square_crop(img: np.ndarray) -> tuple[np.ndarray, Geometry]:
    """The brain's box padded to a square on black, at the source resolution."""
    x0, y0, x1, y1 = brain_bbox(img)
    crop = img[y0:y1, x0:x1]
    ch, cw = crop.shape
    side = max(ch, cw)
    off_y, off_x = (side - ch) // 2, (side - cw) // 2
    square = np.zeros((side, side), np.uint8)
    square[off_y:off_y + ch, off_x:off_x + cw] = crop
    return square, Geometry(x0, y0, x1, y1, side, off_x, off_y)


def resize(square: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if square.shape[0] >= size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interp)


def apply_geometry(mask: np.ndarray, geom: Geometry, size: int) -> np.ndarray:
    """Move a 0/255 mask (same canvas as the source image) exactly as the image was moved.

    Shrinking keeps the pixels at least half covered by the mask (area interpolation), except
    that a mask never vanishes: a lesion smaller than a target pixel keeps the pixels it
    touches, so "the slice holds tumour" reads the same from the stored mask as from the file.
    """
    crop = mask[geom.y0:geom.y1, geom.x0:geom.x1]
    square = np.zeros((geom.side, geom.side), np.uint8)
    square[geom.off_y:geom.off_y + crop.shape[0], geom.off_x:geom.off_x + crop.shape[1]] = crop
    if geom.side <= size:
        return resize(square, size, nearest=True)
    area = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    out = np.where(area >= 128, 255, 0).astype(np.uint8)
    if square.any() and not out.any():
        out = np.where(area > 0, 255, 0).astype(np.uint8)
    return out


def preprocess_array(img: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """The pre-processed image and where its crop came from (what ``process_array`` stores)."""
    square, geom = square_crop(remove_background(img))
    return resize(square, size), geom


def thumbnail(square: np.ndarray) -> np.ndarray:
    """The 32 x 32 fingerprint image of a padded square (independent of the output size)."""
    return cv2.resize(square, (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def brain_mask(img: np.ndarray) -> np.ndarray:
    """0/255 mask of the brain in a pre-processed image: the filled largest component of a
    blurred threshold at half Otsu's level (dark CSF and lesions stay inside once filled),
    eroded by ``BRAIN_ERODE`` of the side so the bright skull and scalp rim falls outside."""
    h, w = img.shape
    out = np.zeros((h, w), np.uint8)
    blur = cv2.GaussianBlur(img, (5, 5), 0)
    if int(blur.max()) == 0:
        return out
    otsu, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (blur > max(4.0, otsu / 2)).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return out
    head = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8) * 255
    contours, _ = cv2.findContours(head, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, 255, thickness=cv2.FILLED)
    k = max(3, int(round(BRAIN_ERODE * min(h, w))) | 1)
    return cv2.erode(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))


def phash(img: np.ndarray) -> int:
    """64-bit DCT perceptual hash: stable under resampling, JPEG noise, small intensity changes."""
    small = img if img.shape == (THUMB, THUMB) else \
        cv2.resize(img, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small.astype(np.float32))[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


class FileTask(NamedTuple):
    """One file to pre-process (what a worker thread receives)."""

    index: int
    path: str
    size: int
    mask: str | None = None  # X_mask file beside X: follows the image, labels it when asked
    channel: int | None = None  # pick this channel of a colour file (LGG .tif: 1 = FLAIR)


@dataclass
class Processed:
    """What a worker sends back for one file (or phantom slice)."""

    index: int
    sha256: str
    image: np.ndarray | None = None  # size x size uint8
    thumb: np.ndarray | None = None  # THUMB x THUMB uint8, size-independent
    brain: np.ndarray | None = None  # size x size 0/255
    mask: np.ndarray | None = None  # size x size 0/255 tumour mask, when there is one
    mask_label: int | None = None  # 1 if the mask holds tumour, else 0
    aspect: float = 1.0
    error: str | None = None


def process_array(index: int, digest: str, img: np.ndarray, size: int,
                  mask: np.ndarray | None = None) -> Processed:
    """Pre-process a decoded image (and its mask, same canvas) into a ``Processed``."""
    square, geom = square_crop(remove_background(img))
    out = resize(square, size)
    if int(out.max()) == 0:
        raise BadImage("nothing left after background removal (no brain found)")
    result = Processed(index, digest, out, thumbnail(square), brain_mask(out), aspect=geom.aspect)
    if mask is not None:
        if mask.shape != img.shape:
            raise BadImage(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                           f"{img.shape[1]}x{img.shape[0]}")
        # 0/1 or 0/255 masks; a lossy (JPEG) 0/255 mask has noise near 0 and 255
        binary = (mask > (127 if mask.max() > 1 else 0)).astype(np.uint8) * 255
        result.mask = apply_geometry(binary, geom, size)
        result.mask_label = int(result.mask.any())  # what is stored: label and mask agree
    return result


def process_file(task: FileTask | tuple) -> Processed:
    """Worker entry point: a FileTask -> Processed (never raises on bad files)."""
    task = FileTask(*task)
    try:
        with open(task.path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Processed(task.index, "", error=f"unreadable: {e.strerror or e}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode_gray(data, task.path, task.channel)
        mask = None
        if task.mask is not None:
            try:
                with open(task.mask, "rb") as f:
                    mask = decode_mask(f.read(), unchanged=task.channel is not None)
            except OSError as e:
                raise BadImage(f"mask unreadable: {e.strerror or e}") from e
        return process_array(task.index, digest, img, task.size, mask)
    except BadImage as e:
        return Processed(task.index, digest, error=str(e))


def decode_mask(data: bytes, unchanged: bool = False) -> np.ndarray:
    """A mask file as 8-bit grayscale (all-black masks, i.e. healthy slices, are fine);
    ``unchanged`` decodes it as its image was (a picked channel: no EXIF turn for either)."""
    try:
        check_complete(data)
    except BadImage as e:
        raise BadImage(f"mask: {e}") from None
    flags = cv2.IMREAD_UNCHANGED if unchanged else cv2.IMREAD_GRAYSCALE
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise BadImage("mask: not a decodable image")
    return img[:, :, 0] if img.ndim == 3 else img


def process_phantom(task: tuple) -> tuple[Processed, int, str]:
    """Worker entry point: (index, seed, size[, lesions]) -> (Processed with mask, label, name)."""
    index, seed, size, *rest = task
    p = phantom.make_slice(index, seed, lesions=rest[0] if rest else "standard")
    digest = hashlib.sha256(p.image.tobytes()).hexdigest()
    return process_array(index, digest, p.image, size, p.mask), p.label, p.name
