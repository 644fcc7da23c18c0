"""Image grids as PNG: sample sheets, real-vs-synthetic panels, memorisation pairs, previews.

One function, ``save_grid``, used by every stage that shows images. Drawing is done with cv2 on a
uint8 canvas (no matplotlib figure machinery: grids of thousands of tiles stay fast and exact),
and the PNG is written atomically through ``brainhpc.fsio``. Given tumour ``masks``, the grid is
drawn in colour with each mask's outline in red on its (upscaled) grayscale tile
(``outline_tiles``); without them it stays the grayscale grid it always was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_bytes

PAD = 2  # pixels between tiles
FONT = cv2.FONT_HERSHEY_SIMPLEX
OUTLINE = (0, 0, 255)  # BGR: mask outlines in red
OUTLINE_MIN_PX = 128  # outlined tiles are upscaled (nearest) to at least this, so a one-pixel
#                       outline does not hide a small lesion


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N,1,H,W) or (N,H,W) uint8, or float in [0, 1] -> (N,H,W) uint8 (floats are clipped)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy() if images.is_floating_point() \
            else images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise BrainhpcError(f"save_grid: expected 1 channel, got images of shape {a.shape}")
        a = a[:, 0]
    if a.ndim != 3:
        raise BrainhpcError(f"save_grid: expected (N,1,H,W) or (N,H,W) images, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return np.clip(a, 0, 255).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _text_scale(tile_w: int) -> tuple[float, int, int]:
    """Font scale, thickness and caption line height that fit small and large tiles."""
    scale = max(0.3, min(0.6, tile_w / 160))
    (_, h), base = cv2.getTextSize("Ag", FONT, scale, 1)
    return scale, 1, h + base + 4


def _fit(text: str, scale: float, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if cv2.getTextSize(text, FONT, scale, 1)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "..", FONT, scale, 1)[0][0] > width:
        text = text[:-1]
    return text + ".."


def outline_tiles(images, masks, colour: tuple[int, int, int] = OUTLINE,
                  min_px: int = OUTLINE_MIN_PX) -> np.ndarray:
    """(N, H', W', 3) uint8 BGR tiles: each image upscaled by an integer factor to at least
    ``min_px`` (nearest), its mask's outer contours (cv2.findContours) drawn one pixel wide."""
    tiles, marks = to_uint8(images), to_uint8(masks) > 0
    if marks.shape != tiles.shape:
        raise BrainhpcError(f"save_grid: masks {marks.shape} do not match images {tiles.shape}")
    scale = max(1, -(-min_px // tiles.shape[-1]))
    out = []
    for img, m in zip(tiles, marks, strict=True):
        big = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        mbig = cv2.resize(m.astype(np.uint8), None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mbig, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out.append(cv2.drawContours(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR), contours, -1, colour,
                                    1))
    return np.stack(out)


def render_grid(images, ncols: int = 8, captions: Sequence[str] | None = None,
                title: str | None = None, masks=None) -> np.ndarray:
    """The grid as an (H, W) uint8 array, or (H, W, 3) BGR with ``masks`` outlined (what
    ``save_grid`` writes)."""
    if masks is not None:
        tiles = outline_tiles(images, masks)
        return np.stack([render_grid(tiles[..., c], ncols, captions, title) for c in range(3)],
                        axis=-1)
    tiles = to_uint8(images)
    n, h, w = tiles.shape
    if n == 0:
        raise BrainhpcError("save_grid: no images to draw")
    if ncols < 1:
        raise BrainhpcError(f"save_grid: ncols must be >= 1, got {ncols}")
    if captions is not None and len(captions) != n:
        raise BrainhpcError(f"save_grid: {len(captions)} captions for {n} images")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    scale, thick, line_h = _text_scale(w)
    cap_h = line_h if captions is not None else 0
    title_h = line_h + 4 if title else 0
    H = title_h + nrows * (h + cap_h + PAD) + PAD
    W = ncols * (w + PAD) + PAD
    canvas = np.zeros((H, W), np.uint8)
    if title:
        text = _fit(title, scale, W - 2 * PAD)
        cv2.putText(canvas, text, (PAD, title_h - 6), FONT, scale, 255, thick, cv2.LINE_AA)
    for i in range(n):
        r, c = divmod(i, ncols)
        y = title_h + PAD + r * (h + cap_h + PAD)
        x = PAD + c * (w + PAD)
        canvas[y:y + h, x:x + w] = tiles[i]
        if captions is not None:
            text = _fit(str(captions[i]), scale, w)
            cv2.putText(canvas, text, (x, y + h + line_h - 5), FONT, scale, 255, thick,
                        cv2.LINE_AA)
    return canvas


def save_grid(images, path: str | os.PathLike, ncols: int = 8,
              captions: Sequence[str] | None = None, title: str | None = None,
              masks=None) -> Path:
    """Write ``images`` as a PNG grid of ``ncols`` columns, atomically; returns the path.

    ``images``: (N,1,H,W) or (N,H,W), uint8 or float in [0, 1] (numpy or torch). ``captions``:
    one short string per image, drawn under its tile; ``title``: one line above the grid.
    ``masks``: tumour masks shaped like ``images`` (> 0 is tumour), drawn as red outlines.
    """
    canvas = render_grid(images, ncols, captions, title, masks)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise BrainhpcError(f"{path}: cv2 could not encode the grid as PNG")
    write_bytes(path, buf.tobytes())
    return Path(path)
